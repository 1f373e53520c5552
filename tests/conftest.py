"""Shared pytest fixtures."""
import pytest
from detectron2.utils.events import EventStorage


@pytest.fixture(autouse=True)
def training_event_storage():
    """detectron2 runs every training step inside the trainer's ``EventStorage``, and semi-supervised models read the
    step's iteration from it (``TeacherStudent.iteration``). A test that calls a model directly runs at iteration 0;
    ``with EventStorage(it):`` inside the test sets another iteration (the innermost storage is the current one)."""
    with EventStorage(0) as storage:
        yield storage
