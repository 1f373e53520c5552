"""Pseudo-label diagnostics (``SEMI.DIAGNOSTICS``, off by default): how good the teacher's pseudo-labels are, measured
against ground truth of the unlabeled frames that training never reads (CamVid's unlabeled frames have it).

The ground truth travels as ``diagnostic_sem_seg`` (a key no loss term reads): loaded into the unlabeled records
from ``SEMI.DIAGNOSTICS.GT_DATASETS`` (:class:`WithDiagnosticGT`), carried through the same scale / crop / flip as
the weak and strong views by ``UnlabeledDatasetMapper`` and mixed (CutMix / ClassMix) with the mask and partner of
the teacher's maps, so it is pixel-aligned with ``step.teacher_strong["pseudo_label"]``. Per semi-supervised
step, :class:`PseudoLabelDiagnostics` logs into ``step.metrics`` (the trainer writes them to the event storage,
``metrics.json``), over the last ``window`` steps (per-class figures need more pixels than one step has):

- ``pl_diag/kept_fraction``: kept pixels / valid (non-padding) pixels of this step;
- ``pl_diag/kept_accuracy``: pseudo-label == ground truth over the kept pixels with ground truth;
- ``pl_diag/all_accuracy``: the same over every valid pixel with ground truth (what no filter would give);
- ``pl_diag/precision-<class>``: of the kept pixels pseudo-labelled <class>, the share whose ground truth is it;
- ``pl_diag/recall-<class>``: of the ground-truth <class> pixels, the share kept with that pseudo-label;
- ``pl_diag/kept_share-<class>``: share of the kept pixels pseudo-labelled <class> (class balance of the loss).

A ratio whose denominator is 0 over the window is NaN. "Kept" is the keep mask of the first of ``KEEP_MASK_TERMS``
the step has (``pseudo_label``, ``unimatch``, ``unimatch_v2``: each filters the teacher's maps of the first strong
stream), or every valid pixel when the run has none of them.
"""
from collections import deque
from typing import Dict, Mapping, Sequence, Tuple

import torch

from ..layers.perturbation import mix

__all__ = ["DIAGNOSTIC_GT_KEY", "PseudoLabelDiagnostics", "WithDiagnosticGT", "diagnostic_gt_files"]

DIAGNOSTIC_GT_KEY = "diagnostic_sem_seg"  # mapped unlabeled dict: long[H, W] ground truth (ignore on padding)
DIAGNOSTIC_GT_FILE_KEY = "diagnostic_sem_seg_file_name"  # unlabeled record: its ground-truth file ...
DIAGNOSTIC_GT_DATASET_KEY = "diagnostic_sem_seg_dataset"  # ... and the dataset whose label map reads it


class WithDiagnosticGT:
    """Unlabeled mapper wrapper: adds ``diagnostic_sem_seg_file_name`` / ``_dataset`` (looked up by ``file_name`` in
    ``gt_files``: file -> (label file, dataset name)) to every record before ``mapper``; a record without ground
    truth is an error naming the frame and ``source``."""

    def __init__(self, mapper, gt_files: Mapping[str, Tuple[str, str]], source: str):
        self.mapper = mapper
        self.gt_files = dict(gt_files)
        self.source = source

    def check(self, records: Sequence[Dict]) -> None:
        missing = [r["file_name"] for r in records if r["file_name"] not in self.gt_files]
        if missing:
            raise KeyError(
                f"SEMI.DIAGNOSTICS: {len(missing)} unlabeled frames have no ground truth in {self.source} "
                f"(first: {missing[0]}); name the labeled dataset that holds them in SEMI.DIAGNOSTICS.GT_DATASETS"
            )

    def __call__(self, record: Dict) -> Dict:
        if record["file_name"] not in self.gt_files:
            self.check([record])
        path, dataset = self.gt_files[record["file_name"]]
        return self.mapper({**record, DIAGNOSTIC_GT_FILE_KEY: path, DIAGNOSTIC_GT_DATASET_KEY: dataset})


def diagnostic_gt_files(records: Sequence[Dict]) -> Dict[str, Tuple[str, str]]:
    """file_name -> (sem_seg_file_name, dataset_name) of labeled records (``SEMI.DIAGNOSTICS.GT_DATASETS``)."""
    return {r["file_name"]: (r["sem_seg_file_name"], r.get("dataset_name")) for r in records if "sem_seg_file_name" in r}


KEEP_MASK_TERMS = ("pseudo_label", "unimatch", "unimatch_v2")


class PseudoLabelDiagnostics:
    """Windowed pseudo-label quality against ``diagnostic_sem_seg`` (see the module docstring)."""

    def __init__(self, class_names: Sequence[str], ignore_value: int, window: int = 20,
                 terms: Sequence[str] = KEEP_MASK_TERMS):
        if window < 1:
            raise ValueError(f"SEMI.DIAGNOSTICS.WINDOW must be >= 1, got {window}")
        self.class_names = list(class_names)
        self.ignore_value = int(ignore_value)
        self.terms = tuple(terms)
        self.counts = deque(maxlen=int(window))

    def ground_truth(self, unlabeled: Sequence[Dict], step, device) -> torch.Tensor:
        """The unlabeled batch's ground truth, mixed like the teacher's maps, ignore outside the valid pixels."""
        if any(DIAGNOSTIC_GT_KEY not in u for u in unlabeled):
            raise KeyError(
                f"SEMI.DIAGNOSTICS.ENABLED but an unlabeled input has no '{DIAGNOSTIC_GT_KEY}': build the loader "
                "with build_semi_train_loader(cfg) (it loads SEMI.DIAGNOSTICS.GT_DATASETS)"
            )
        gt = torch.stack([u[DIAGNOSTIC_GT_KEY] for u in unlabeled]).to(device=device, dtype=torch.long)
        gt = mix(gt, step.mix_mask, step.mix_partner)
        return torch.where(step.teacher_strong["valid"], gt, torch.full_like(gt, self.ignore_value))

    @torch.no_grad()
    def __call__(self, step, gt: torch.Tensor) -> Dict[str, torch.Tensor]:
        c = len(self.class_names)
        pseudo = step.teacher_strong["pseudo_label"]
        valid = step.teacher_strong["valid"]
        kept = next((step.keep_masks[t] for t in self.terms if t in step.keep_masks), valid) & valid
        has_gt = gt != self.ignore_value
        right = (pseudo == gt) & has_gt
        scored = kept & has_gt
        pl = pseudo.clamp(0, c - 1)
        per_class = torch.stack(
            [
                torch.bincount(pl[scored], minlength=c)[:c],  # kept, pseudo-labelled c, with GT
                torch.bincount(pl[scored & right], minlength=c)[:c],  # ... and GT is c
                torch.bincount(gt[has_gt].clamp(0, c - 1), minlength=c)[:c],  # GT is c
                torch.bincount(pl[kept & (pseudo != self.ignore_value)], minlength=c)[:c],  # kept, pseudo-labelled c
            ]
        ).double()
        totals = torch.stack([scored.sum(), (scored & right).sum(), has_gt.sum(), right.sum()]).double()
        self.counts.append((per_class, totals))
        per_class = sum(p for p, _ in self.counts)
        totals = sum(t for _, t in self.counts)
        out = {
            "pl_diag/kept_fraction": kept.sum().double() / valid.sum().clamp_min(1).double(),
            "pl_diag/kept_accuracy": _ratio(totals[1], totals[0]),
            "pl_diag/all_accuracy": _ratio(totals[3], totals[2]),
        }
        precision = _ratio(per_class[1], per_class[0])
        recall = _ratio(per_class[1], per_class[2])
        share = _ratio(per_class[3], per_class[3].sum().expand(c))
        for i, name in enumerate(self.class_names):
            out[f"pl_diag/precision-{name}"] = precision[i]
            out[f"pl_diag/recall-{name}"] = recall[i]
            out[f"pl_diag/kept_share-{name}"] = share[i]
        return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))
