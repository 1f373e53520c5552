"""SEMI_LOSS_REGISTRY: the loss terms a semi-supervised run is composed of (``SEMI.LOSSES``)."""
from typing import Any, Dict, List, Optional

import torch
from detectron2.utils.registry import Registry
from torch import nn

from ..utils.rng import rng_untouched


class LossTermRegistry(Registry):
    """A Registry keyed by each term's ``name`` (the string used in ``SEMI.LOSSES``), not its class name."""

    def register_term(self, cls):
        if not getattr(cls, "name", ""):
            raise ValueError(f"{cls.__name__} must set a class attribute `name` to be registered")
        self._do_register(cls.name, cls)
        return cls


SEMI_LOSS_REGISTRY = LossTermRegistry("SEMI_LOSS")
SEMI_LOSS_REGISTRY.__doc__ = """
Loss terms of the semi-supervised engine, keyed by their ``SEMI.LOSSES`` name. Each is an ``nn.Module``
built with ``Term(cfg, spec)`` (``@configurable``, ``from_config(cls, cfg, spec)``: ``spec`` describes the student
outputs the term reads, :class:`~semiseg_d2.modeling.heads.spec.HeadSpec` for ``"sem_seg"``, as detectron2 builds a
head from ``from_config(cfg, input_shape)``) whose ``forward(step: SemiStep) -> dict[str, Tensor]`` returns named,
already-weighted scalar losses. Its keys ``SEMI.<TERM>.*`` are declared beside it (``add_<term>_config(cfg)``, called
by ``add_semiseg_config``). Register with ``@SEMI_LOSS_REGISTRY.register_term``. See :class:`SemiLossTerm`.
"""


class SemiLossTerm(nn.Module):
    """Base class of loss terms. Subclasses set ``name`` and implement ``forward``.

    Class attributes a term may set:
      needs_student_weak: the student also runs on the weak unlabeled views (e.g. DGCL anchors).
      needs_teacher_labeled: the teacher also runs on the labeled images -> ``step.teacher_labeled``
        (e.g. the memory bank of Alonso et al. is filled from teacher features of labeled pixels).
      needs_unlabeled: the term reads unlabeled data (False for ``supervised``): during burn-in only
        terms with ``needs_unlabeled = False`` run.
      needs_second_strong: the unlabeled mapper also makes a second strong view (``image_strong2``, its own
        photometric draw) that the engine mixes with its own CutMix boxes -> ``SemiStep.*_strong2``
        (UniMatch's dual streams); runs without such a term make and mix only one.
      feature_dropout: > 0 asks for the feature-perturbation stream (UniMatch ``fp``): the student's head also
        decodes Dropout2d(p)-perturbed backbone features of the weak views -> ``SemiStep.student_weak_fp``.
      complementary_dropout: not None (a fraction f of unperturbed pairs) asks for UniMatch V2's complementary
        channel dropout on the student's backbone features of the two strong streams (needs_second_strong).
      task: the step record the term reads: ``"sem_seg"`` (:class:`~semiseg_d2.losses.step.SemiStep`, built by
        ``SemiSegmentor``) or another task's (e.g. ``"instance"``: projects/SemiInstance's ``InstanceStep``).
        A model builds only the terms of its own task (:func:`build_loss_terms`).
    """

    name: str = ""
    task: str = "sem_seg"
    needs_student_weak: bool = False
    needs_teacher_labeled: bool = False
    needs_unlabeled: bool = True
    needs_second_strong: bool = False
    feature_dropout: float = 0.0
    complementary_dropout: Optional[float] = None

    def forward(self, step) -> Dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def update(self, step) -> None:
        """Called after the optimizer step with the same record (memory banks, flows). Default: nothing."""

    def params_with_own_optimizer(self) -> List[nn.Parameter]:
        """Parameters this term optimises itself (e.g. a flow): kept out of the model's optimizer."""
        return []

    def ema_pairs(self) -> List["EMAPair"]:  # noqa: F821  (layers.ema.EMAPair)
        """Modules this term averages (:class:`~semiseg_d2.layers.ema.EMAPair`: its EMA copy and the trained
        module): the engine's EMAHook updates them with the teacher's momentum, after :meth:`update`. Default: none."""
        return []

    @classmethod
    def config_from_datasets(cls, cfg) -> Dict[str, Any]:
        """Config values this term derives from the registered training sets (dotted key -> value), filled in by
        the trainer before it builds the model (:func:`config_with_dataset_values`), so that building a term reads
        no dataset. Default: none."""
        return {}


def known_loss_terms(task: Optional[str] = None) -> List[str]:
    """Registered term names (of one ``task`` when given)."""
    return sorted(name for name, cls in SEMI_LOSS_REGISTRY if task is None or getattr(cls, "task", "sem_seg") == task)


def terms_declare(cfg, attribute: str) -> bool:
    """Whether a term class of ``SEMI.LOSSES`` declares ``attribute`` (e.g. ``needs_second_strong``) true,
    without building the terms (the data side asks before the model exists). Unknown names are left to
    :func:`build_loss_terms`, which reports them."""
    return any(getattr(SEMI_LOSS_REGISTRY.get(n), attribute, False) for n in cfg.SEMI.LOSSES if n in SEMI_LOSS_REGISTRY)


def config_with_dataset_values(cfg):
    """``cfg``, or a copy of it with the values the ``SEMI.LOSSES`` terms derive from the training sets
    (:meth:`SemiLossTerm.config_from_datasets`) filled in: what the trainer builds its model from."""
    values = {}
    for name in cfg.SEMI.LOSSES:
        if name in SEMI_LOSS_REGISTRY:
            values.update(SEMI_LOSS_REGISTRY.get(name).config_from_datasets(cfg))
    if not values:
        return cfg
    out = cfg.clone()
    out.defrost()
    out.merge_from_list([x for key, value in values.items() for x in (key, value)])
    if cfg.is_frozen():
        out.freeze()
    return out


def build_loss_terms(cfg, spec, task: str = "sem_seg") -> nn.ModuleDict:
    """Build ``SEMI.LOSSES`` in order, each as ``Term(cfg, spec)``; ``spec`` describes the student outputs the terms
    read (for ``"sem_seg"`` the :class:`~semiseg_d2.modeling.heads.spec.HeadSpec` of the built student's head).
    Unknown or repeated names, and terms of another task (a term reads one task's step record), raise an error
    listing the known terms of ``task``.

    The terms initialise their parameters (projection heads, selectors, flows) from the global random streams but
    leave them as they found them: the draws training makes afterwards (dropout masks, ...) are then those of a run
    without these terms, so for one ``SEED`` the burn-in of every method is the supervised run, bit for bit, and a
    paired difference measures what the terms do after it (issue #16)."""
    with rng_untouched():
        return _build_loss_terms(cfg, spec, task)


def _build_loss_terms(cfg, spec, task: str) -> nn.ModuleDict:
    names = list(cfg.SEMI.LOSSES)
    if not names:
        example = ["supervised", "pseudo_label"] if task == "sem_seg" else known_loss_terms(task)[:2]
        raise ValueError(f"SEMI.LOSSES is empty: name at least one term, e.g. {example}")
    terms = nn.ModuleDict()
    for name in names:
        if name in terms:
            raise ValueError(f"SEMI.LOSSES: term '{name}' is listed twice in {names}")
        if name not in SEMI_LOSS_REGISTRY:
            raise KeyError(f"SEMI.LOSSES: unknown term '{name}'; known: {', '.join(known_loss_terms(task))}")
        cls = SEMI_LOSS_REGISTRY.get(name)
        term_task = getattr(cls, "task", "sem_seg")
        if term_task != task:
            raise ValueError(
                f"SEMI.LOSSES: term '{name}' is a '{term_task}' term but this model trains '{task}'; "
                f"known '{task}' terms: {', '.join(known_loss_terms(task))}"
            )
        terms[name] = cls(cfg, spec)
    return terms
