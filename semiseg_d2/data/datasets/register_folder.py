"""Your own data, no code: register plain folders of images (and masks) as semantic-segmentation datasets.

    register_folder_dataset("my_labeled", "data/images", "data/masks", classes=["road", "car"])
    register_folder_dataset("my_unlabeled", "data/unlabeled", classes=["road", "car"])

or, with the same keys in a config (``tools/train_net.py`` calls :func:`register_folder_datasets_from_cfg`)::

    DATASETS:
      FOLDERS:
        my_labeled:   {IMAGE_DIR: data/images, MASK_DIR: data/masks, CLASSES: [road, car]}
        my_unlabeled: {IMAGE_DIR: data/unlabeled, CLASSES: [road, car]}
      TRAIN_LABELED: ("my_labeled",)
      TRAIN_UNLABELED: ("my_unlabeled",)

Conventions (docs/datasets.md, "Your own data"):
- images: the files of ``image_dir`` itself (sub-folders are not searched) whose extension is one of
  :data:`IMAGE_EXTS` (any case), sorted by name; ``image_id`` is the file stem, which must be unique.
- masks: ``<mask_dir>/<image stem><mask_suffix>.png``, single-channel PNG (mode L or P) holding the class index
  of ``classes`` per pixel and ``ignore_label`` for unannotated pixels; no raw-id mapping (``label_id_map`` None).
- relative paths (folders and ``list_file``) are taken relative to the current working directory, like
  detectron2's OUTPUT_DIR and MODEL.WEIGHTS, and made absolute at registration; ``~`` and ``$VARS`` expand.
- ``list_file``: a split list (any format of :mod:`..splits.splits`, e.g. plain stems, as ``tools/make_splits.py``
  writes them) selecting, in its order, which images of the folder the dataset holds.
- ``select``: with masks, ``"all"`` (every image needs a mask), ``"with_mask"`` (only images that have one: a
  folder where a few images are annotated) or ``"without_mask"`` (the others, as an unlabeled set).

Registration is lazy, as for the builtin datasets: the spec is validated at once, the folders are read at
``DatasetCatalog.get(name)``. With ``check_masks`` (default) that first ``get`` also reads every mask once per
process and raises, naming each file, on values outside ``range(len(classes))`` and ``ignore_label`` or on a
mask whose size differs from its image, so a run fails before its first iteration, never on garbage; every
later read goes through :func:`..label_io.load_sem_seg`, which checks the values again.
"""
import difflib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..io import decode_errors
from ..label_io import load_sem_seg
from ..splits.splits import entry_id, read_list

__all__ = [
    "IMAGE_EXTS",
    "MASK_EXT",
    "SELECT_MODES",
    "FOLDER_KEYS",
    "register_folder_dataset",
    "register_folder_datasets_from_cfg",
    "folder_spec_from_cfg_node",
    "mask_histogram",
    "check_folder_masks",
    "default_colors",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXT = ".png"  # lossless only: JPEG compression changes class indices at region borders
SELECT_MODES = ("all", "with_mask", "without_mask")
_SHOW = 5  # how many file names an error lists

# config key -> keyword of register_folder_dataset
FOLDER_KEYS = {
    "IMAGE_DIR": "image_dir",
    "MASK_DIR": "mask_dir",
    "CLASSES": "classes",
    "IGNORE_LABEL": "ignore_label",
    "COLORS": "colors",
    "MASK_SUFFIX": "mask_suffix",
    "LIST": "list_file",
    "SELECT": "select",
    "CHECK_MASKS": "check_masks",
}


def default_colors(n: int) -> List[List[int]]:
    """``n`` distinct RGB colours: the bit-interleaved PASCAL palette, skipping its black entry 0 (black is the
    colour visualisers give ignored pixels)."""
    colors = []
    for i in range(1, n + 1):
        rgb, c = [0, 0, 0], i
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        colors.append(rgb)
    return colors


def _resolve(path: str) -> str:
    return os.path.abspath(os.path.expandvars(os.path.expanduser(path)))


def _is_str_seq(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _normalise_spec(
    where: str,
    image_dir,
    mask_dir=None,
    classes=(),
    ignore_label=255,
    colors=None,
    mask_suffix="",
    list_file=None,
    select="all",
    check_masks=True,
) -> Dict:
    """Validate the arguments (types, class list, ignore label, colours) and return the canonical spec dict."""
    if not isinstance(image_dir, str) or not image_dir:
        raise ValueError(f"{where}: IMAGE_DIR (image_dir) must be a non-empty folder path, got {image_dir!r}")
    if mask_dir is not None and not isinstance(mask_dir, str):
        raise ValueError(f"{where}: MASK_DIR (mask_dir) must be a folder path or empty, got {mask_dir!r}")
    if not _is_str_seq(classes) or not classes:
        raise ValueError(
            f"{where}: CLASSES (classes) must be a non-empty list of class names, got {classes!r} (in YAML, quote names "
            "such as 'no', 'on' or '1' that would read as booleans or numbers)"
        )
    dup = sorted({c for c in classes if list(classes).count(c) > 1})
    if dup:
        raise ValueError(f"{where}: CLASSES has duplicate name(s) {dup}")
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int) or not 0 <= ignore_label <= 255:
        raise ValueError(f"{where}: IGNORE_LABEL (ignore_label) must be an int in [0, 255], got {ignore_label!r}")
    if ignore_label < len(classes):
        raise ValueError(
            f"{where}: IGNORE_LABEL {ignore_label} is the index of class '{classes[ignore_label]}'; masks store class "
            f"indices 0..{len(classes) - 1}, so the ignore value must be >= {len(classes)} (usually 255)"
        )
    if colors is None or (isinstance(colors, (list, tuple)) and len(colors) == 0):
        colors = default_colors(len(classes))
    if not isinstance(colors, (list, tuple)) or len(colors) != len(classes):
        raise ValueError(f"{where}: COLORS (colors) needs one [r, g, b] per class ({len(classes)}), got {colors!r}")
    for i, c in enumerate(colors):
        if (
            not isinstance(c, (list, tuple))
            or len(c) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
        ):
            raise ValueError(f"{where}: COLORS[{i}] (class '{classes[i]}') must be [r, g, b] ints in 0..255, got {c!r}")
    if not isinstance(mask_suffix, str):
        raise ValueError(f"{where}: MASK_SUFFIX (mask_suffix) must be a string, got {mask_suffix!r}")
    if list_file is not None and not isinstance(list_file, str):
        raise ValueError(f"{where}: LIST (list_file) must be a file path or empty, got {list_file!r}")
    if select not in SELECT_MODES:
        raise ValueError(f"{where}: SELECT (select) must be one of {list(SELECT_MODES)}, got {select!r}")
    if not isinstance(check_masks, bool):
        raise ValueError(f"{where}: CHECK_MASKS (check_masks) must be true or false, got {check_masks!r}")
    mask_dir = _resolve(mask_dir) if mask_dir else None
    if mask_dir is None and (select != "all" or mask_suffix):
        what = f"SELECT '{select}'" if select != "all" else f"MASK_SUFFIX '{mask_suffix}'"
        raise ValueError(f"{where}: {what} needs MASK_DIR (mask_dir); without it the dataset is unlabeled")
    image_dir = _resolve(image_dir)
    if mask_dir == image_dir and not mask_suffix:
        raise ValueError(
            f"{where}: IMAGE_DIR and MASK_DIR are the same folder {image_dir}: set MASK_SUFFIX (e.g. '_mask') so "
            "that masks can be told from images"
        )
    return dict(
        image_dir=image_dir,
        mask_dir=mask_dir,
        classes=list(classes),
        ignore_label=int(ignore_label),
        colors=[list(map(int, c)) for c in colors],
        mask_suffix=mask_suffix,
        list_file=_resolve(list_file) if list_file else None,
        select=select,
        check_masks=check_masks,
    )


def _is_labeled(spec: Dict) -> bool:
    return spec["mask_dir"] is not None and spec["select"] != "without_mask"


def _list_images(spec: Dict, where: str) -> Dict[str, str]:
    """``{stem: image path}`` of the image folder (mask files excluded when both share one folder)."""
    image_dir = spec["image_dir"]
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{where}: image folder not found: {image_dir} (a relative IMAGE_DIR is taken from "
                                "the working directory at registration)")
    same_dir = spec["mask_dir"] == image_dir
    images: Dict[str, str] = {}
    subdirs = 0
    for fname in sorted(os.listdir(image_dir)):
        path = os.path.join(image_dir, fname)
        if os.path.isdir(path):
            subdirs += 1
            continue
        stem, ext = os.path.splitext(fname)
        if fname.startswith(".") or ext.lower() not in IMAGE_EXTS:
            continue
        if same_dir and ext.lower() == MASK_EXT and stem.endswith(spec["mask_suffix"]):
            continue
        if stem in images:
            raise ValueError(
                f"{where}: two images share the stem '{stem}': {images[stem]} and {path}; image ids (and mask names) "
                "come from the stem, rename one"
            )
        images[stem] = path
    if not images:
        hint = f" ({subdirs} sub-folder(s) are not searched: point IMAGE_DIR at the files' folder)" if subdirs else ""
        raise FileNotFoundError(f"{where}: no images ({', '.join(IMAGE_EXTS)}) in {image_dir}{hint}")
    return images


def _mask_path(spec: Dict, stem: str) -> str:
    return os.path.join(spec["mask_dir"], stem + spec["mask_suffix"] + MASK_EXT)


def _missing_mask_hint(spec: Dict, stem: str) -> str:
    """Why ``stem`` has no mask when a file of the same name with another extension exists."""
    base = os.path.join(spec["mask_dir"], stem + spec["mask_suffix"])
    for ext in (".PNG", ".jpg", ".jpeg", ".JPG", ".bmp", ".tif", ".tiff"):
        if os.path.isfile(base + ext):
            return f" (found {base + ext}: masks must be '{MASK_EXT}' files, lossless)"
    return ""


def _select_stems(spec: Dict, images: Dict[str, str], where: str) -> List[str]:
    if spec["list_file"] is None:
        return list(images)
    if not os.path.isfile(spec["list_file"]):
        raise FileNotFoundError(f"{where}: LIST file not found: {spec['list_file']}")
    stems = [entry_id(e) for e in read_list(spec["list_file"])]
    if not stems:
        raise ValueError(f"{where}: LIST file {spec['list_file']} has no entries")
    seen, dups = set(), []
    for s in stems:
        if s in seen:
            dups.append(s)
        seen.add(s)
    if dups:
        raise ValueError(f"{where}: LIST file {spec['list_file']} names {dups[:_SHOW]} more than once")
    missing = [s for s in stems if s not in images]
    if missing:
        raise FileNotFoundError(
            f"{where}: {len(missing)} entr(y/ies) of LIST {spec['list_file']} have no image in {spec['image_dir']}: "
            f"{missing[:_SHOW]}{' ...' if len(missing) > _SHOW else ''}"
        )
    return stems


def _folder_records(name: str, spec: Dict, where: str) -> List[Dict]:
    """The dataset dicts (structure only: no mask is read)."""
    images = _list_images(spec, where)
    stems = _select_stems(spec, images, where)
    if spec["mask_dir"] is not None and not os.path.isdir(spec["mask_dir"]):
        raise FileNotFoundError(f"{where}: mask folder not found: {spec['mask_dir']} (a relative MASK_DIR is taken "
                                "from the working directory at registration)")
    labeled = _is_labeled(spec)
    records = []
    unmasked = []
    for stem in stems:
        rec = {"file_name": images[stem], "image_id": stem, "dataset_name": name}
        if spec["mask_dir"] is not None:
            has_mask = os.path.isfile(_mask_path(spec, stem))
            if spec["select"] == "all" and not has_mask:
                unmasked.append(stem)
                continue
            if spec["select"] != "all" and (spec["select"] == "with_mask") != has_mask:
                continue
            if labeled:
                rec["sem_seg_file_name"] = _mask_path(spec, stem)
        records.append(rec)
    if unmasked:
        shown = "; ".join(f"{images[s]} -> {_mask_path(spec, s)}{_missing_mask_hint(spec, s)}" for s in unmasked[:_SHOW])
        raise FileNotFoundError(
            f"{where}: {len(unmasked)} of {len(stems)} image(s) have no mask (expected <MASK_DIR>/<stem>"
            f"{spec['mask_suffix']}{MASK_EXT}): {shown}{' ...' if len(unmasked) > _SHOW else ''}. Use SELECT "
            "'with_mask' to train on the annotated images only (and 'without_mask' for the rest as unlabeled data)"
        )
    if not records:
        raise FileNotFoundError(
            f"{where}: no image of {spec['image_dir']} is selected (SELECT '{spec['select']}', MASK_DIR "
            f"{spec['mask_dir']}, LIST {spec['list_file']})"
        )
    return records


# (path, mtime_ns, size) -> 256-bin histogram of raw mask values; a mask is read once per process
_HIST_CACHE: Dict[Tuple[str, int, int], np.ndarray] = {}


def mask_histogram(path: str) -> np.ndarray:
    """``int64[256]`` pixel count of every raw value of the single-channel mask ``path`` (cached per file version)."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    hist = _HIST_CACHE.get(key)
    if hist is None:
        hist = np.bincount(load_sem_seg(path, None).ravel(), minlength=256).astype(np.int64)
        _HIST_CACHE[key] = hist
    return hist


def _image_size(path: str, dataset: Optional[str] = None) -> Tuple[int, int]:
    """``(height, width)`` of an image as detectron2's read_image returns it (EXIF rotation applied), from its
    header only; :class:`..io.UnreadableFileError` naming ``path`` and ``dataset`` when it is no image."""
    with decode_errors("image", path, dataset), Image.open(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001  unreadable EXIF: read_image ignores it too
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _listing(head: str, lines: Sequence[str]) -> str:
    shown = lines[: _SHOW * 2]
    return f"{len(lines)} {head}:\n  " + "\n  ".join(shown) + ("\n  ..." if len(lines) > len(shown) else "")


def check_folder_masks(records: Sequence[Dict], classes: Sequence[str], ignore_label: int, where: str,
                       check_sizes: bool = True) -> np.ndarray:
    """Read every mask of ``records`` (and each image's header); raise ValueError listing each bad file (a mask or
    image that cannot be read, a value outside the classes and the ignore label, a mask whose size differs from
    its image). Returns the summed ``int64[256]`` value histogram of the readable masks."""
    allowed = np.zeros(256, dtype=bool)
    allowed[: len(classes)] = True
    allowed[ignore_label] = True
    total = np.zeros(256, dtype=np.int64)
    unreadable, bad_values, bad_sizes = [], [], []
    for rec in records:
        path = rec.get("sem_seg_file_name")
        if path is None:
            continue
        try:
            hist = mask_histogram(path)
            image_size = _image_size(rec["file_name"], rec.get("dataset_name")) if check_sizes else None
        except (ValueError, OSError) as e:  # UnreadableFileError, a mask of the wrong mode, a file gone meanwhile
            unreadable.append(str(e))
            continue
        total += hist
        wrong = np.nonzero((hist > 0) & ~allowed)[0]
        if wrong.size:
            vals = ", ".join(f"{int(v)} ({int(hist[v])} px)" for v in wrong[:10]) + (" ..." if wrong.size > 10 else "")
            bad_values.append(f"{path}: value(s) {vals}")
        if check_sizes:
            with Image.open(path) as m:  # labels are read without EXIF rotation (label_io)
                mw, mh = m.size
            ih, iw = image_size
            if (mh, mw) != (ih, iw):
                bad_sizes.append(f"{path} is {mw}x{mh} but {rec['file_name']} is {iw}x{ih} (WxH)")
    msgs = []
    if unreadable:
        msgs.append(_listing("file(s) cannot be read", unreadable))
    if bad_values:
        msgs.append(_listing(f"mask(s) hold values that are neither a class index in [0, {len(classes)}) "
                             f"({len(classes)} CLASSES) nor IGNORE_LABEL {ignore_label}", bad_values))
    if bad_sizes:
        msgs.append(_listing("mask(s) differ in size from their image", bad_sizes))
    if msgs:
        raise ValueError(f"{where}: " + "\n".join(msgs))
    return total


def _make_loader(name: str, spec: Dict, where: str):
    def load():
        records = _folder_records(name, spec, where)
        if spec["check_masks"] and _is_labeled(spec):
            check_folder_masks(records, spec["classes"], spec["ignore_label"], where)
        return records

    return load


def _register_spec(name: str, spec: Dict, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: dataset name must be a non-empty string, got {name!r}")
    if name in DatasetCatalog:
        existing = MetadataCatalog.get(name).get("folder_spec", None)
        if existing == spec:
            return name  # same spec again (setup() of every process, demo + train): nothing to do
        if existing is None:
            raise ValueError(f"{where}: dataset name '{name}' is already registered (a builtin or code-registered "
                             "dataset); pick another name")
        diff = [f"{k}: {existing.get(k)!r} -> {v!r}" for k, v in spec.items() if existing.get(k) != v]
        raise ValueError(
            f"{where}: folder dataset '{name}' is already registered with a different spec ({'; '.join(diff)}); "
            "pick another name"
        )
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)  # stale metadata without a dataset (e.g. a lookup of a then-unknown name)
    DatasetCatalog.register(name, _make_loader(name, spec, where))
    MetadataCatalog.get(name).set(
        stuff_classes=list(spec["classes"]),
        stuff_colors=[list(c) for c in spec["colors"]],
        ignore_label=spec["ignore_label"],
        evaluator_type="sem_seg",
        label_id_map=None,
        dataset_root=os.path.commonpath([spec["image_dir"], spec["mask_dir"] or spec["image_dir"]]),
        image_root=spec["image_dir"],
        sem_seg_root=spec["mask_dir"] if _is_labeled(spec) else None,
        folder_spec=spec,
    )
    return name


def register_folder_dataset(
    name: str,
    image_dir: str,
    mask_dir: Optional[str] = None,
    classes: Sequence[str] = (),
    ignore_label: int = 255,
    colors: Optional[Sequence[Sequence[int]]] = None,
    mask_suffix: str = "",
    list_file: Optional[str] = None,
    select: str = "all",
    check_masks: bool = True,
) -> str:
    """Register a folder of images (+ masks) as the sem-seg dataset ``name``; returns ``name``.

    Args:
        image_dir: folder of images (relative to the working directory; not searched recursively).
        mask_dir: folder of ``<stem><mask_suffix>.png`` class-index masks; None: an unlabeled dataset.
        classes: class names; mask value ``i`` is ``classes[i]``.
        ignore_label: mask value of unannotated pixels, >= ``len(classes)``.
        colors: one ``[r, g, b]`` per class (visualisation); None: a fixed palette.
        mask_suffix: text between the image stem and ``.png`` in mask names (``"_mask"``: ``a.jpg`` -> ``a_mask.png``).
        list_file: split list selecting (and ordering) the images; None: every image of the folder.
        select: ``"all"`` / ``"with_mask"`` / ``"without_mask"`` (the last gives an unlabeled dataset).
        check_masks: validate every mask's values and size at the first ``DatasetCatalog.get(name)``.
    Raises:
        ValueError naming the argument at fault; ValueError when ``name`` is taken by another dataset or spec
        (registering the same spec again is a no-op).
    """
    where = f"folder dataset '{name}'"
    spec = _normalise_spec(where, image_dir, mask_dir, classes, ignore_label, colors, mask_suffix, list_file, select,
                           check_masks)
    return _register_spec(name, spec, where)


def folder_spec_from_cfg_node(name: str, node, where: Optional[str] = None) -> Dict:
    """Keyword arguments of :func:`register_folder_dataset` from one ``DATASETS.FOLDERS.<name>`` node (strict keys)."""
    where = where or f"DATASETS.FOLDERS.{name}"
    if not hasattr(node, "items"):
        raise ValueError(f"{where}: expected a mapping of keys {sorted(FOLDER_KEYS)}, got {node!r}")
    kwargs = {}
    for key, value in node.items():
        if key not in FOLDER_KEYS:
            close = difflib.get_close_matches(str(key), list(FOLDER_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KeyError(f"{where}: unknown key '{key}'{hint}; known keys: {', '.join(FOLDER_KEYS)}")
        kwargs[FOLDER_KEYS[key]] = value
    for required in ("IMAGE_DIR", "CLASSES"):
        if required not in node:
            raise KeyError(f"{where}: missing key {required}")
    if isinstance(kwargs.get("classes"), tuple):
        kwargs["classes"] = list(kwargs["classes"])
    for key in ("mask_dir", "list_file"):
        if kwargs.get(key) == "":
            kwargs[key] = None
    return kwargs


def register_folder_datasets_from_cfg(cfg) -> List[str]:
    """Register every dataset of ``cfg.DATASETS.FOLDERS`` (idempotent); returns their names.

    Also checks that a folder dataset the config trains or tests on agrees with the model:
    ``len(CLASSES) == MODEL.SEM_SEG_HEAD.NUM_CLASSES`` and ``IGNORE_LABEL == MODEL.SEM_SEG_HEAD.IGNORE_VALUE``.
    """
    folders = cfg.DATASETS.get("FOLDERS", None)
    if not folders:
        return []
    used = {}
    for key in ("TRAIN", "TRAIN_LABELED", "TRAIN_UNLABELED", "TEST"):
        for n in cfg.DATASETS.get(key, ()):
            used.setdefault(n, f"DATASETS.{key}")
    names = []
    for name, node in folders.items():
        where = f"DATASETS.FOLDERS.{name}"
        spec = _normalise_spec(where, **folder_spec_from_cfg_node(name, node, where))
        if name in used:
            head = cfg.MODEL.SEM_SEG_HEAD
            if len(spec["classes"]) != head.NUM_CLASSES:
                raise ValueError(
                    f"{where} has {len(spec['classes'])} CLASSES but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
                    f"{head.NUM_CLASSES} ({used[name]} uses '{name}')"
                )
            if spec["ignore_label"] != head.IGNORE_VALUE:
                raise ValueError(
                    f"{where}: IGNORE_LABEL {spec['ignore_label']} differs from MODEL.SEM_SEG_HEAD.IGNORE_VALUE "
                    f"{head.IGNORE_VALUE} ({used[name]} uses '{name}'); the loss would train on the ignore value"
                )
        names.append(_register_spec(name, spec, where))
    return names
