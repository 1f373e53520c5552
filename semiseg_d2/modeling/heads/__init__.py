from .aux_fcn import AuxFCNHead, build_aux_head
from .build import build_sem_seg_head_checked
from .deeplab_v2 import DeepLabV2Head
from .deeplab_v3plus import DeepLabV3PlusFeatHead
from .dpt import DPTHead
from .spec import HeadSpec
from .u2pl_deeplabv3plus import U2PLDeepLabV3PlusHead

__all__ = ["AuxFCNHead", "build_aux_head", "build_sem_seg_head_checked", "DeepLabV2Head", "DeepLabV3PlusFeatHead",
           "DPTHead", "HeadSpec", "U2PLDeepLabV3PlusHead"]
