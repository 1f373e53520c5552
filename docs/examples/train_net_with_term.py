#!/usr/bin/env python
"""``tools/train_net.py`` with the ``prob_consistency`` term of ``consistency_term.py`` available.

    python docs/examples/train_net_with_term.py --config-file docs/examples/prob_consistency_camvid.yaml

The same arguments as tools/train_net.py (``--resume``, ``--eval-only``, ``--num-gpus``, ``KEY VALUE``).
A project of your own does the same: import the module that registers its terms, add their config keys,
then build the trainer as usual.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # this folder, the repository root

from consistency_term import add_prob_consistency_config  # noqa: E402  (registers "prob_consistency")
from semiseg_d2.engine.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli(extra_config=(add_prob_consistency_config,))  # SEMI.PROB_CONSISTENCY declared before the YAML is read
