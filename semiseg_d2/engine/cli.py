"""The ``tools/train_net.py`` command line, reusable by projects that add config keys, loss terms or a task.

    from semiseg_d2.engine.cli import cli
    cli(extra_config=(add_my_term_config,))   # keys declared before the YAML is merged
    cli(base_config=get_semi_instance_cfg, register=(register_datasets_for_config,),
        trainer_cls=SemiInstanceTrainer)      # another task (projects/SemiInstance/train_net.py)

``extra_config`` functions add keys in place (Detectron2's ``add_*_config`` convention); ``register``
functions register the datasets the merged config names; ``trainer_cls`` defaults to the trainer the
config's META_ARCHITECTURE asks for.
"""
import functools
from typing import Callable, Sequence

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

from ..config import get_semiseg_cfg
from ..data.datasets import register_folder_datasets_from_cfg
from ..modeling import is_semi_supervised
from ..utils.run_logging import setup_run_logging
from .checkpoint import SemiSegCheckpointer
from .predictor import check_weights_file
from .trainer import SegTrainer, SemiSegTrainer, write_results_file

ConfigFn = Callable[[object], object]


def merge_overrides(cfg, opts) -> None:
    """``cfg.merge_from_list(opts)`` for the ``KEY VALUE`` pairs at the end of the command line, with errors that say
    what went wrong: options (``--resume``, ``--eval-only``, ``--num-gpus``) must come BEFORE the pairs, since every
    word after the first pair is read as a key or a value."""
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ValueError(
            f"{' '.join(flags)} came after the KEY VALUE config overrides, where it is read as a config key or value: "
            f"put options first, e.g. `tools/train_net.py --config-file C {' '.join(flags)} KEY VALUE ...`"
        )
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as e:
        if "odd length" not in str(e):
            raise
        raise ValueError(
            f"the KEY VALUE config overrides have odd length ({len(opts)} words: {' '.join(map(str, opts))}): every "
            "key needs exactly one value (a list is one word, e.g. \"[1, 2]\"), and options such as --resume / "
            "--eval-only go before the overrides"
        ) from None


def setup(args, extra_config: Sequence[ConfigFn] = (), base_config: Callable = get_semiseg_cfg,
          register: Sequence[ConfigFn] = (register_folder_datasets_from_cfg,)):
    """``base_config()`` + ``extra_config`` keys, then the YAML and the ``KEY VALUE`` overrides; ``register``
    functions then see the merged config (default: DATASETS.FOLDERS, plain image/mask folders, docs/datasets.md)."""
    cfg = base_config()
    for add_config in extra_config:
        add_config(cfg)
    cfg.merge_from_file(args.config_file)
    merge_overrides(cfg, args.opts)
    for register_datasets in register:
        register_datasets(cfg)
    cfg.freeze()
    setup_run_logging(cfg.OUTPUT_DIR, comm.get_rank())  # before default_setup: plain log.txt, semiseg_d2's lines
    default_setup(cfg, args)
    return cfg


def main(args, trainer_cls=None, **setup_kwargs):
    cfg = setup(args, **setup_kwargs)
    if trainer_cls is None:
        trainer_cls = SemiSegTrainer if is_semi_supervised(cfg) else SegTrainer
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        checkpointer = SemiSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            weights = checkpointer.get_checkpoint_file()
        else:
            weights = cfg.MODEL.WEIGHTS
            check_weights_file(weights)
        checkpointer.load(weights, checkpointables=[], strict=True)  # never evaluate a partly random model
        results = trainer_cls.test(cfg, model)
        write_results_file(cfg, trainer_cls.results_by_network(results), weights=weights)
        return results
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None, **main_kwargs):
    """Parse detectron2's standard arguments and run :func:`main` (with ``main_kwargs``) on ``--num-gpus``
    processes."""
    args = default_argument_parser().parse_args(argv)
    return launch(
        functools.partial(main, **main_kwargs),
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
