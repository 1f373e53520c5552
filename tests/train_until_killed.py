"""``tools/train_net.py`` that kills itself with SIGKILL right after iteration ``--kill-after`` (a test helper of
tests/engine/test_train_e2e.py): the hook runs after every default hook of that step, so the periodic checkpoint of the
iteration is on disk, and the kill lands at the same point of the run on every machine, however loaded.

    python tests/train_until_killed.py --kill-after N --config-file cfg.yaml [train_net arguments]
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import HookBase  # noqa: E402

from semiseg_d2.engine.cli import cli  # noqa: E402
from semiseg_d2.engine.trainer import SemiSegTrainer  # noqa: E402


class KillAfterIteration(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    argv = sys.argv[1:]
    i = argv.index("--kill-after")
    iteration = int(argv[i + 1])
    del argv[i : i + 2]

    class KilledTrainer(SemiSegTrainer):
        def build_hooks(self):
            return super().build_hooks() + [KillAfterIteration(iteration)]

    cli(argv, trainer_cls=KilledTrainer)


if __name__ == "__main__":
    main()
