from . import segmentor  # noqa: F401  registers Segmentor
from . import semi  # noqa: F401  registers SemiSegmentor
from .segmentor import Segmentor
from .semi import SemiSegmentor
from .teacher_student import TeacherStudent, is_semi_supervised

__all__ = ["Segmentor", "SemiSegmentor", "TeacherStudent", "is_semi_supervised"]
