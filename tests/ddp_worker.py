"""Worker for tests/engine/test_ddp.py: trains a few semi-supervised steps on one rank, saves its state."""
import os

import torch
from detectron2.utils import comm

from semiseg_d2.layers.distributed import unwrap_model
from semiseg_d2.engine.trainer import SemiSegTrainer


def train_and_dump(cfg, out_dir):
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = unwrap_model(trainer.model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))
