"""Precise BN for one network of a run (student, EMA teacher or a supervised segmentor).

During training a BN layer's running statistics are an exponential average (momentum 0.1, i.e. the last ~10
batches) of batch statistics taken while the weights moved, and for a semi-supervised student over whatever views
its training pass normalised together; the EMA teacher's are an average of the student's. Precise BN (detectron2's
``TEST.PRECISE_BN``, fvcore's ``update_bn_stats``; Wu & Johnson, "Rethinking Batch in BatchNorm", Sec. 3) replaces
them, with the weights fixed, by the population average of ``num_iters`` batches' statistics. Here the batches are
those of the run's labeled training stream (``DATASETS.TRAIN_LABELED``, or ``DATASETS.TRAIN``, through the
training mapper: the supervised loader's augmentation and ``SOLVER.IMS_PER_BATCH``), so student and teacher are
normalised by statistics of their own weights on the same images and can be compared weight for weight.

Used by ``tools/eval_checkpoints.py --precise-bn N``; training is unchanged by this module.
"""
from typing import Iterable, Iterator, List

import torch
import torch.nn as nn
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

from ..data.build import build_sem_seg_train_loader, semi_dataset_names
from ..modeling import is_semi_supervised
from ..utils.rng import capture_rng_state, restore_rng_state


def labeled_batches(cfg) -> Iterable[List[dict]]:
    """The labeled training stream of ``cfg`` as the supervised loader yields it (batches of
    ``SOLVER.IMS_PER_BATCH`` dicts with ``image`` and ``sem_seg``). For a semi-supervised config these are the
    labeled sets (several labeled sources are drawn as one set: ``DATASETS.TRAIN_LABELED_RATIOS`` is not applied)."""
    c = cfg.clone()
    c.defrost()
    if is_semi_supervised(cfg):
        c.DATASETS.TRAIN = tuple(semi_dataset_names(cfg)[0])
    return build_sem_seg_train_loader(c)


def recompute_bn_stats(network: nn.Module, batches: Iterable[List[dict]], num_iters: int, seed: int = 0) -> int:
    """Replace the running mean / var of every BN layer ``network`` trains (``network.train()``; frozen BN,
    ``MODEL.FREEZE_BN``, stays frozen) by their population average over the first ``num_iters`` of ``batches``
    (each a list of dataset dicts, as ``network(batch)`` takes in training mode), weights unchanged. The network's
    training mode and ``num_batches_tracked`` are restored. Returns the number of BN layers recomputed.

    The training-mode forward draws random numbers (the head's dropout before the decoder's BN): they come from
    torch's generator seeded with ``seed`` for the call, so the statistics are a function of the weights and the
    batches only, and two networks recomputed with the same batches see the same dropout masks; every random
    generator is left as it was found."""
    if num_iters < 1:
        raise ValueError(f"recompute_bn_stats: num_iters must be >= 1, got {num_iters}")
    was_training = network.training
    state = capture_rng_state()
    torch.manual_seed(seed)
    network.train()
    try:
        layers = get_bn_modules(network)
        if layers:
            tracked = [None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone() for bn in layers]
            stream: Iterator = iter(batches)
            update_bn_stats(network, stream, num_iters)  # raises if the stream ends early
            for bn, count in zip(layers, tracked):  # these forwards were no training batches
                if count is not None:
                    bn.num_batches_tracked.copy_(count)
        return len(layers)
    finally:
        network.train(was_training)
        restore_rng_state(state)
