"""Trainers: ``SegTrainer`` (supervised Segmentor) and ``SemiSegTrainer`` (SemiSegmentor).

Both are Detectron2 ``DefaultTrainer`` subclasses: same hooks, writers, evaluation and checkpoint
conventions, with these changes:
- a deterministic, resumable data stream (``data/stream.py``): a resumed run sees the same batches;
- bf16/fp16 autocast from ``SOLVER.AMP`` (no grad scaler for bf16), fp32 master weights;
- a non-finite loss stops training naming the iteration, the loss and the term that produced it;
- unlabeled files skipped as unreadable (``DATALOADER.UNREADABLE_UNLABELED "skip"``) are counted in the metric
  ``data/unreadable`` and kept in the checkpoint;
- checkpoints written atomically with RNG states and the config; resuming refuses another config
  and any missing/unexpected key;
- SGD with backbone/head LR multipliers, parameters a loss term optimises itself left out;
- ``SemiSegTrainer`` adds the EMA hook (the teacher and the modules loss terms average), evaluates student and teacher, and runs stateful
  loss-term updates (memory banks, flows) after each optimizer step;
- MODEL.WEIGHTS must fill the backbone (MODEL.WEIGHTS_REQUIRED_PREFIXES / MODEL.WEIGHTS_NEW_KEYS);
- every printed evaluation names its network; the last one is written to OUTPUT_DIR/results.json.
"""
import json
import logging
import math
import os
import time
import weakref
from collections import OrderedDict
from typing import Dict, Mapping, Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from ..config import check_semiseg_config, lookup, schedule_keys
from ..data.build import build_sem_seg_test_loader, build_sem_seg_train_loader, build_semi_train_loader
from ..evaluation import build_sem_seg_evaluator
from ..losses.registry import config_with_dataset_values
from ..modeling import TeacherStudent, is_semi_supervised
from ..utils.profiling import hook_scope_name, scope
from ..utils.rng import capture_rng_state, restore_rng_state
from .checkpoint import SemiSegCheckpointer, atomic_write_text
from .hooks import build_ema_hook, build_precise_bn_hook, unwrap_model
from .optimizer import build_optimizer

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(cfg):
    """The autocast dtype of ``SOLVER.AMP`` (None when disabled)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    name = cfg.SOLVER.AMP.PRECISION
    if name not in _AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION: unknown '{name}'; known: {', '.join(_AMP_DTYPES)}")
    return _AMP_DTYPES[name]


RESULTS_FILE = "results.json"


def log_results_csv(results: Mapping, dataset_name: str, network: str) -> None:
    """detectron2's ``copypaste:`` lines (summary metrics, no per-class ones), naming the evaluated network."""
    logger.info("Evaluation results of the %s on %s in csv format:", network, dataset_name)
    for task, res in results.items():
        summary = [(k, v) for k, v in res.items() if "-" not in k]
        logger.info("copypaste: Task: %s (%s, %s)", task, network, dataset_name)
        logger.info("copypaste: " + ",".join(k for k, _ in summary))
        logger.info("copypaste: " + ",".join(f"{v:.4f}" for _, v in summary))


def _class_names(dataset_name: str):
    meta = MetadataCatalog.get(dataset_name)
    return list(meta.get("stuff_classes", None) or meta.get("thing_classes", None) or [])


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def split_per_class(metrics: Mapping[str, float], classes) -> Dict:
    """``{"mIoU": .., ..., "per_class": {class: {"IoU": .., "ACC": ..}}}`` from an evaluator's flat
    ``"<metric>-<class>"`` keys (longest matching class name wins; NaN -> null)."""
    by_length = sorted(classes, key=len, reverse=True)
    out, per_class = {}, OrderedDict((c, {}) for c in classes)
    for key, value in metrics.items():
        name = next((c for c in by_length if key.endswith("-" + c)), None)
        if name is None:
            out[key] = _finite(value)
        else:
            per_class[name][key[: -len(name) - 1]] = _finite(value)
    if any(per_class.values()):
        out["per_class"] = per_class
    return out


def results_record(cfg, by_network: Mapping) -> Dict:
    """results.json's content: per network, per dataset, per task the summary metrics and ``per_class``.

    ``by_network``: network name -> its :meth:`SegTrainer.test` results (one TEST dataset's results are not keyed
    by dataset, detectron2's convention). ``default_network`` is the one predictors, demos and exports use."""
    default = cfg.SEMI.WEIGHTS_FOR_EXPORT if "SEMI" in cfg else None
    record = OrderedDict(
        default_network=default if default in by_network else next(iter(by_network)),
        datasets=list(cfg.DATASETS.TEST), networks=OrderedDict(),
    )
    for network, res in by_network.items():
        by_dataset = res if len(cfg.DATASETS.TEST) > 1 else {cfg.DATASETS.TEST[0]: res}
        record["networks"][network] = OrderedDict(
            (name, {task: split_per_class(m, _class_names(name)) for task, m in by_dataset[name].items()})
            for name in cfg.DATASETS.TEST
        )
    return record


def write_results_file(cfg, by_network: Mapping, **extra) -> Optional[str]:
    """Write results.json (:func:`results_record` + ``extra``) into OUTPUT_DIR on the main process; its path."""
    if not by_network or not comm.is_main_process() or not cfg.OUTPUT_DIR:
        return None
    record = results_record(cfg, by_network)
    record.update(extra)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    path = os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE)
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)
    logger.info("evaluation results of the %s written to %s", " and the ".join(by_network), path)
    return path


class SemiSegTrainLoop(SimpleTrainer):
    """One optimisation step: forward (autocast), backward, finiteness check, step, term updates.

    The step has one host synchronisation: after the backward has been queued, every loss and logged metric
    is copied to the host in one transfer (:meth:`_losses_to_host`); the finiteness check and the event
    storage read those host values. A non-finite loss still stops training before the optimizer step (the
    backward only writes gradients), so the weights and the last checkpoint stay untouched.
    """

    def __init__(self, model, data_loader, optimizer, amp_dtype=None, check_finite: bool = True):
        super().__init__(model, data_loader, optimizer)
        self.amp_dtype = amp_dtype
        self.check_finite = check_finite
        self.grad_scaler = (
            torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and torch.cuda.is_available() else None
        )

    @staticmethod
    def _losses_to_host(loss_dict, metrics):
        """(losses, metrics) as dicts of CPU scalar tensors (float64), copied in ONE device->host transfer."""
        tensors = list(loss_dict.values()) + list(metrics.values())
        if not tensors:
            return {}, {}
        flat = torch.stack([v.detach().reshape(()).double() for v in tensors]).cpu()
        values = dict(zip(list(loss_dict) + [f"metric:{k}" for k in metrics], flat.unbind()))
        return ({k: values[k] for k in loss_dict}, {k: values[f"metric:{k}"] for k in metrics})

    def _raise_if_not_finite(self, loss_dict, module):
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        if bool(torch.isfinite(values).all()):
            return
        owners = module.loss_owner if isinstance(module, TeacherStudent) else {}
        bad = [
            f"{k} (term '{owners[k]}')" if k in owners else k
            for k, v in loss_dict.items()
            if not bool(torch.isfinite(v).all())
        ]
        raise FloatingPointError(
            f"non-finite loss at iteration {self.iter}: {', '.join(bad)}; training stopped, "
            "the last checkpoint on disk is untouched"
        )

    def run_step(self):
        assert self.model.training, "[SemiSegTrainLoop] model was changed to eval mode!"
        module = unwrap_model(self.model)
        semi = isinstance(module, TeacherStudent)  # the model reads the step's iteration from the event storage
        start = time.perf_counter()
        with scope("data"):
            data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if getattr(self.data_loader, "skips_unreadable", False):
            get_event_storage().put_scalar("data/unreadable", len(self.data_loader.unreadable))

        device_type = "cuda" if next(module.parameters()).is_cuda else "cpu"
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with scope("forward"):
                loss_dict = self.model(data)
        metrics = module.pop_metrics() if semi else {}
        losses = sum(loss_dict.values())
        with scope("zero_grad"):
            self.optimizer.zero_grad(set_to_none=True)
        with scope("backward"):
            if self.grad_scaler is not None:
                self.grad_scaler.scale(losses).backward()
            else:
                losses.backward()
        self.after_backward()
        with scope("host_sync"):
            host_losses, host_metrics = self._losses_to_host(loss_dict, metrics)  # the step's one host sync
        if self.check_finite and host_losses:
            with scope("finite_check"):
                self._raise_if_not_finite(host_losses, module)
        with scope("metrics"):
            self._write_metrics(host_losses, data_time)
        if host_metrics and comm.is_main_process():
            get_event_storage().put_scalars(**{k: float(v) for k, v in host_metrics.items()})
        with scope("optimizer"):
            if self.grad_scaler is not None:
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                self.optimizer.step()
        if semi:
            with scope("term_updates"):
                module.after_optimizer_step()

    def after_step(self):
        for h in self._hooks:  # detectron2's TrainerBase.after_step, each hook a named scope ("ema", "hook:<Name>")
            with scope(hook_scope_name(h)):
                h.after_step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        if getattr(self.data_loader, "skips_unreadable", False):  # skipped files keep counting after a resume
            ret["unreadable"] = dict(self.data_loader.unreadable)
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "unreadable" in state_dict and hasattr(self.data_loader, "unreadable"):
            self.data_loader.unreadable = dict(state_dict["unreadable"])


class SegTrainer(DefaultTrainer):
    """Supervised training of a ``Segmentor`` (and the base of ``SemiSegTrainer``)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_semiseg_config(cfg)
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = dict(broadcast_buffers=False, find_unused_parameters=self._find_unused(cfg))
        if not next(model.parameters()).is_cuda:
            ddp_kwargs["device_ids"] = None  # CPU (gloo) processes
        model = create_ddp_model(model, **ddp_kwargs)
        self._trainer = SemiSegTrainLoop(
            model, data_loader, optimizer, amp_dtype=autocast_dtype(cfg), check_finite=self._check_finite(cfg)
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SemiSegCheckpointer(model, cfg.OUTPUT_DIR, cfg=cfg, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    after_step = SemiSegTrainLoop.after_step  # its hooks are named profiling scopes too

    @staticmethod
    def _find_unused(cfg) -> bool:
        return False

    @staticmethod
    def auto_scale_workers(cfg, num_workers: int):
        """detectron2's ``SOLVER.REFERENCE_WORLD_SIZE`` scaling (labeled batch, LR, MAX_ITER, warm-up, periods),
        extended to the unlabeled batch and to the iteration counts semiseg_d2 and its terms declare
        (:func:`~semiseg_d2.config.schedule_keys`: burn-in, term start iterations, ramp-ups), so a recipe keeps its
        per-GPU batch and its schedule in images seen. Logs the effective global batch."""
        old = cfg.SOLVER.REFERENCE_WORLD_SIZE
        scaled = DefaultTrainer.auto_scale_workers(cfg, num_workers)
        if old not in (0, num_workers):
            unl = cfg.SOLVER.IMS_PER_BATCH_UNLABELED
            if unl % old != 0:
                raise ValueError(
                    f"SOLVER.IMS_PER_BATCH_UNLABELED={unl} is not divisible by SOLVER.REFERENCE_WORLD_SIZE={old}"
                )
            scale = num_workers / old
            frozen = scaled.is_frozen()
            scaled.defrost()
            scaled.SOLVER.IMS_PER_BATCH_UNLABELED = int(round(unl * scale))
            for key in schedule_keys(scaled):
                *path, last = key.split(".")
                node = lookup(scaled, ".".join(path))
                node[last] = int(round(node[last] / scale))
            if frozen:
                scaled.freeze()
        logger.info(
            "effective global batch: %d labeled + %d unlabeled images per iteration on %d process(es); "
            "BASE_LR %g, MAX_ITER %d",
            scaled.SOLVER.IMS_PER_BATCH, scaled.SOLVER.IMS_PER_BATCH_UNLABELED, num_workers,
            scaled.SOLVER.BASE_LR, scaled.SOLVER.MAX_ITER,
        )
        return scaled

    @staticmethod
    def _check_finite(cfg) -> bool:
        return cfg.SEMI.NONFINITE_CHECK

    def resume_or_load(self, resume: bool = True):
        """Resume everything from OUTPUT_DIR's last checkpoint, or load MODEL.WEIGHTS into the network."""
        if resume and self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            self.checkpointer.check_config(path, self.cfg)
            rest = self.checkpointer.load(path, strict=True)
            if "rng" in rest:
                restore_rng_state(rest["rng"])
            self.start_iter = self.iter + 1
        else:
            self.load_initial_weights(self.cfg.MODEL.WEIGHTS)
            self.start_iter = 0
        self.data_loader.set_start(self.start_iter)

    def load_initial_weights(self, path: str) -> None:
        """MODEL.WEIGHTS into the network; the backbone must load completely (MODEL.WEIGHTS_REQUIRED_PREFIXES)."""
        if path:
            SemiSegCheckpointer(unwrap_model(self.model)).load_pretrained(path, self.cfg)

    @staticmethod
    def results_by_network(results: Mapping) -> Mapping:
        """:meth:`test`'s results keyed by the evaluated network (results.json's "networks")."""
        return {"segmentor": results} if results else {}

    def train(self):
        """detectron2's training; then results.json (the last evaluation) in OUTPUT_DIR; returns those results
        (None without TEST datasets)."""
        super().train()
        results = getattr(self, "_last_eval_results", None)
        if results and self.cfg.DATASETS.TEST:  # a semi-supervised test() without TEST datasets: empty per network
            write_results_file(self.cfg, self.results_by_network(results), iteration=self.iter)
        return results

    @classmethod
    def test(cls, cfg, model, evaluators=None, network: str = "segmentor"):
        """detectron2's evaluation (``DefaultTrainer.test``) with the evaluated ``network`` named in the log,
        leaving every random generator as it found it: building test loaders draws from the global torch
        generator, so evaluating mid-training would otherwise change the rest of the run (mixing masks, dropout,
        samplers) and a run with EVAL_PERIOD would differ from one without."""
        state = capture_rng_state()
        try:
            return cls._evaluate(cfg, model, evaluators, network)
        finally:
            restore_rng_state(state)

    @classmethod
    def _evaluate(cls, cfg, model, evaluators, network: str):
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} DATASETS.TEST")
        results = OrderedDict()
        for idx, dataset_name in enumerate(cfg.DATASETS.TEST):
            logger.info("evaluating the %s on %s", network, dataset_name)
            loader = cls.build_test_loader(cfg, dataset_name)
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, dataset_name)
            results[dataset_name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                log_results_csv(results[dataset_name], dataset_name, network)
        return list(results.values())[0] if len(results) == 1 else results

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_deeplab_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        """detectron2's default hooks, with its ``PreciseBN`` (which forwards the whole model on the training loader
        and draws from the run's random generators) replaced by :class:`~semiseg_d2.engine.hooks.PreciseBNHook`
        in the same place: after the LR scheduler, before checkpointing and evaluation."""
        ret = super().build_hooks()
        slot = next((i for i, h in enumerate(ret) if isinstance(h, d2_hooks.PreciseBN)), None)
        if slot is not None:
            ret[slot] = build_precise_bn_hook(self.cfg)
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        return build_sem_seg_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_sem_seg_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_sem_seg_evaluator(cfg, dataset_name, output_folder)


class SemiSegTrainer(SegTrainer):
    """Semi-supervised training of a ``SemiSegmentor`` (student + EMA teacher + loss terms)."""

    @staticmethod
    def _find_unused(cfg) -> bool:
        # Burn-in steps and terms switched off early leave some parameters without gradient.
        return True

    @classmethod
    def build_train_loader(cls, cfg):
        return build_semi_train_loader(cfg)

    @classmethod
    def build_model(cls, cfg):
        """The model of ``cfg`` with the values its terms derive from the training sets filled in
        (e.g. SEMI.MEMORY_CONTRAST.NUM_LABELED): building a term reads no dataset."""
        return super().build_model(config_with_dataset_values(cfg))

    def load_initial_weights(self, path: str) -> None:
        """MODEL.WEIGHTS initialise the student (e.g. ImageNet backbone); the teacher starts as its copy."""
        if path:
            model = unwrap_model(self.model)
            SemiSegCheckpointer(model.student).load_pretrained(path, self.cfg)
            if model.teacher is not None:  # SEMI.TEACHER_MODE "student" has none
                model.teacher.load_state_dict(model.student.state_dict())

    def build_hooks(self):
        ret = super().build_hooks()
        cfg = self.cfg
        # The averaged modules must be updated before checkpointing/evaluation of the same iteration.
        ret.insert(2, build_ema_hook(cfg))
        return ret

    @staticmethod
    def results_by_network(results: Mapping) -> Mapping:
        return results  # test() keys them by network already

    @classmethod
    def test(cls, cfg, model, evaluators=None, network: Optional[str] = None):
        """Evaluate the networks named by TEST.EVAL_STUDENT / TEST.EVAL_TEACHER; results keyed by network."""
        module = unwrap_model(model)
        if not isinstance(module, TeacherStudent):
            return super().test(cfg, model, evaluators, network or "segmentor")
        results = OrderedDict()
        previous = module.eval_network
        try:
            for name, enabled in (("student", cfg.TEST.EVAL_STUDENT), ("teacher", cfg.TEST.EVAL_TEACHER)):
                if enabled:
                    module.eval_network = name
                    results[name] = super().test(cfg, model, evaluators, name)
        finally:
            module.eval_network = previous
        return results


def build_trainer(cfg):
    """The trainer class the config asks for."""
    return SemiSegTrainer(cfg) if is_semi_supervised(cfg) else SegTrainer(cfg)
