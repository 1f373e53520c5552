"""The ``tools/train_net.py`` command line, reusable by projects that add config keys or loss terms.

    from semiseg_d2.engine.cli import cli
    cli(extra_config=(add_my_term_config,))   # keys declared before the YAML is merged

``extra_config`` functions take the config and add keys in place (Detectron2's ``add_*_config`` convention).
"""
import functools
from typing import Callable, Sequence

from detectron2.engine import default_argument_parser, default_setup, launch

from ..config import get_semiseg_cfg
from ..data.datasets import register_folder_datasets_from_cfg
from .checkpoint import SemiSegCheckpointer
from .trainer import SegTrainer, SemiSegTrainer, build_trainer

ConfigFn = Callable[[object], object]


def setup(args, extra_config: Sequence[ConfigFn] = ()):
    """semiseg_d2 defaults + ``extra_config`` keys, then the YAML and the ``KEY VALUE`` overrides."""
    cfg = get_semiseg_cfg()
    for add_config in extra_config:
        add_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_folder_datasets_from_cfg(cfg)  # DATASETS.FOLDERS: plain image/mask folders (docs/datasets.md)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args, extra_config: Sequence[ConfigFn] = ()):
    cfg = setup(args, extra_config)
    if args.eval_only:
        trainer_cls = SemiSegTrainer if cfg.MODEL.META_ARCHITECTURE == "SemiSegmentor" else SegTrainer
        model = trainer_cls.build_model(cfg)
        SemiSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return trainer_cls.test(cfg, model)
    trainer = build_trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None, extra_config: Sequence[ConfigFn] = ()):
    """Parse detectron2's standard arguments and run :func:`main` on ``--num-gpus`` processes."""
    args = default_argument_parser().parse_args(argv)
    return launch(
        functools.partial(main, extra_config=tuple(extra_config)),
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
