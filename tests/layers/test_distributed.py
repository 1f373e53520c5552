"""layers/distributed.py: the flattened mean over ranks (two gloo processes) and the data-parallel unwrap."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from semiseg_d2.layers.distributed import mean_over_ranks, unwrap_model


def _rank_tensors(rank):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(2, 3, generator=g), torch.randn((), generator=g), torch.randn(4, generator=g)]


def _mean_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(mean_over_ranks(_rank_tensors(rank)), os.path.join(out_dir, f"mean{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mean_over_ranks_is_the_elementwise_mean_in_the_input_shapes(tmp_path):
    mp.spawn(_mean_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = [(a + b) / 2 for a, b in zip(_rank_tensors(0), _rank_tensors(1))]
    for rank in range(2):
        got = torch.load(tmp_path / f"mean{rank}.pt")
        assert [t.shape for t in got] == [t.shape for t in expected]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_mean_over_ranks_without_a_process_group_returns_the_inputs():
    tensors = _rank_tensors(0)
    assert all(a is b for a, b in zip(mean_over_ranks(tensors), tensors))


def test_unwrap_model_returns_the_wrapped_network():
    net = nn.Linear(2, 2)
    assert unwrap_model(net) is net
    assert unwrap_model(nn.DataParallel(net)) is net
