"""SemiInstanceTrainer: the engine's SemiSegTrainer with the instance loaders and COCO evaluation.

Everything else is the engine's: the training loop (autocast, non-finite check naming the term,
``after_optimizer_step``), ``EMAHook`` (teacher <- student), atomic ``SemiSegCheckpointer`` with RNG states and the
config check on resume, the seeded resumable data streams (``set_start``), student + teacher evaluation.
"""
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator

from semiseg_d2.engine.trainer import SemiSegTrainer

from .data import build_semi_instance_train_loader


class SemiInstanceTrainer(SemiSegTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_semi_instance_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOEvaluator on bbox (+ segm with MODEL.MASK_ON). ``use_fast_impl=False``: the fast COCOeval is
        detectron2's compiled ``_C``, which does not load with the sal-detectron2 wheel; pycocotools' COCOeval
        computes the same metrics (slower on full COCO val)."""
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_folder,
                             use_fast_impl=False)
