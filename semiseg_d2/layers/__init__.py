"""Reusable math of the methods: EMA, class memory banks, class-batched selectors, label ops and pseudo-label
filters, the training step's mixing / channel-dropout masks, kNN density, coupling flows and
the Adam of parameters a term trains itself."""
from .class_attention import ClassAttentionSelectors, ClassBatchNorm
from .density import class_density_blocked, knn_density, knn_density_grouped, knn_density_per_class
from .distributed import all_gather_variable, gather_for_enqueue, unwrap_model
from .ema import EMA_SCHEDULES, ema_momentum, ema_update_
from .flow import CouplingFlow, GLOWCoupling, nll_gradient_direction, nonfinite_log_det
from .label_ops import entropy_keep_mask, resize_labels, softmax_entropy, threshold_keep_mask
from .memory_bank import ClassMemoryBank, class_row_blocks, topk_per_class_per_image
from .online_adam import OnlineAdam
from .perturbation import classmix_masks, complementary_channel_masks, cutmix_masks, mix, shifted_partner_index

__all__ = [
    "ClassAttentionSelectors", "ClassBatchNorm",
    "class_density_blocked",
    "knn_density", "knn_density_grouped", "knn_density_per_class",
    "all_gather_variable", "gather_for_enqueue", "unwrap_model",
    "EMA_SCHEDULES", "ema_momentum", "ema_update_",
    "entropy_keep_mask", "resize_labels", "softmax_entropy", "threshold_keep_mask",
    "CouplingFlow", "GLOWCoupling", "nll_gradient_direction", "nonfinite_log_det",
    "ClassMemoryBank", "class_row_blocks", "topk_per_class_per_image",
    "OnlineAdam",
    "classmix_masks", "complementary_channel_masks", "cutmix_masks", "mix", "shifted_partner_index",
]
