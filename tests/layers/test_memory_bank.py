import os
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semiseg_d2.layers import ClassMemoryBank, gather_for_enqueue, topk_per_class_per_image


def _enqueue_ids(bank, ids, labels):
    """Enqueue entries whose feat is the id repeated, proj is -id, density is id / 10."""
    ids = torch.as_tensor(ids, dtype=torch.float32)
    bank.enqueue({"feat": ids[:, None].repeat(1, 3), "proj": -ids[:, None].repeat(1, 2), "density": ids / 10},
                 torch.as_tensor(labels, dtype=torch.long))


def _newest_first_ids(bank, c):
    n = int(bank.counts[c])
    return bank.newest_first("feat")[c, :n, 0].long().tolist()


class TestClassMemoryBank(unittest.TestCase):
    def _bank(self, n=4):
        return ClassMemoryBank(3, n, fields={"feat": 3, "proj": 2, "density": 0})

    def test_fifo_and_counts(self):
        bank = self._bank()
        _enqueue_ids(bank, [1, 2, 3], [0, 1, 0])
        self.assertEqual(bank.counts.tolist(), [2, 1, 0])
        self.assertEqual(_newest_first_ids(bank, 0), [3, 1])
        self.assertEqual(_newest_first_ids(bank, 1), [2])
        self.assertEqual(bank.get("feat")[0, :2, 0].tolist(), [1, 3])  # raw slots in arrival order
        self.assertEqual(bank.valid_mask().sum(1).tolist(), [2, 1, 0])

    def test_wrap_around_over_calls(self):
        bank = self._bank(4)
        for chunk in ([1, 2, 3], [4, 5], [6, 7, 8]):
            _enqueue_ids(bank, chunk, [2] * len(chunk))
        self.assertEqual(bank.counts.tolist(), [0, 0, 4])
        self.assertEqual(_newest_first_ids(bank, 2), [8, 7, 6, 5])
        # 8 writes into 4 slots: slot = (id - 1) % 4, so the raw buffer is [5, 6, 7, 8]; next write is slot 0
        self.assertEqual(bank.get("feat")[2, :, 0].tolist(), [5, 6, 7, 8])
        self.assertEqual(int(bank.ptr[2]), 0)
        _enqueue_ids(bank, [9], [2])
        self.assertEqual(bank.get("feat")[2, :, 0].tolist(), [9, 6, 7, 8])  # the oldest (5) went first

    def test_more_than_n_in_one_call(self):
        bank = self._bank(4)
        _enqueue_ids(bank, [100], [1])
        ids = list(range(1, 12))
        labels = [1 if i % 2 else 0 for i in ids]  # class 1: 1,3,5,7,9,11; class 0: 2,4,6,8,10
        _enqueue_ids(bank, ids, labels)
        self.assertEqual(_newest_first_ids(bank, 1), [11, 9, 7, 5])
        self.assertEqual(_newest_first_ids(bank, 0), [10, 8, 6, 4])
        self.assertEqual(bank.counts.tolist(), [4, 4, 0])
        # same final state as enqueuing one entry at a time
        seq = self._bank(4)
        _enqueue_ids(seq, [100], [1])
        for i, c in zip(ids, labels):
            _enqueue_ids(seq, [i], [c])
        for k, v in seq.state_dict().items():
            self.assertTrue(torch.equal(v, bank.state_dict()[k]), k)

    def test_fields_aligned(self):
        bank = self._bank(5)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            ids = torch.randint(1, 1000, (9,), generator=g)
            _enqueue_ids(bank, ids.tolist(), torch.randint(0, 3, (9,), generator=g).tolist())
        feat, proj, dens = bank.get("feat"), bank.get("proj"), bank.get("density")
        valid = bank.valid_mask()
        self.assertTrue(torch.equal(proj[valid], -feat[valid][:, :2]))
        self.assertTrue(torch.allclose(dens[valid], feat[valid][:, 0] / 10))

    def test_state_dict_round_trip_and_reset(self):
        bank = self._bank()
        _enqueue_ids(bank, [1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 0, 0])
        other = self._bank()
        other.load_state_dict(bank.state_dict())
        self.assertEqual(_newest_first_ids(other, 0), [6, 5, 2, 1])
        self.assertEqual(other.counts.tolist(), [4, 1, 1])
        _enqueue_ids(other, [7], [0])
        self.assertEqual(_newest_first_ids(other, 0), [7, 6, 5, 2])
        other.reset()
        self.assertEqual(other.counts.tolist(), [0, 0, 0])
        self.assertEqual(int(other.valid_mask().sum()), 0)

    def test_bad_fields(self):
        bank = self._bank()
        with self.assertRaises(KeyError):
            bank.enqueue({"feat": torch.zeros(1, 3)}, torch.zeros(1, dtype=torch.long))
        with self.assertRaises(ValueError):
            bank.enqueue({"feat": torch.zeros(1, 4), "proj": torch.zeros(1, 2), "density": torch.zeros(1)},
                         torch.zeros(1, dtype=torch.long))


class TestTopkPerGroup(unittest.TestCase):
    def test_keeps_highest(self):
        scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4])
        labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0, 255])
        images = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1, 0])
        keep = topk_per_class_per_image(scores, labels, images, 2, num_classes=2, num_images=2)
        # (img0, cls0): 0.1, 0.9, 0.5 -> 0.9, 0.5; (img1, cls0): 0.7, 0.6 -> both; (img0, cls1): 0.3, 0.8, 0.2
        # -> 0.8, 0.3; label 255 never kept
        self.assertEqual(keep.tolist(), [False, True, True, True, True, True, False, True, False])


def _rank_data(rank, it):
    g = torch.Generator().manual_seed(100 * rank + it)
    k = 2 + 3 * rank + it  # different sizes per rank
    values = {"feat": torch.randn(k, 2, generator=g), "density": torch.rand(k, generator=g)}
    return values, torch.randint(0, 3, (k,), generator=g)


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank = ClassMemoryBank(3, 5, fields={"feat": 2, "density": 0})
        for it in range(3):
            values, labels = gather_for_enqueue(*_rank_data(rank, it))
            bank.enqueue(values, labels)
        torch.save(bank.state_dict(), os.path.join(out_dir, f"bank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class TestDistributedEnqueue(unittest.TestCase):
    def test_same_bank_on_every_rank(self):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
            a = torch.load(os.path.join(tmp, "bank0.pt"))
            b = torch.load(os.path.join(tmp, "bank1.pt"))
        self.assertGreater(int(a["count"].sum()), 0)
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        # both equal one process enqueuing the rank-major concatenation
        ref = ClassMemoryBank(3, 5, fields={"feat": 2, "density": 0})
        for it in range(3):
            parts = [_rank_data(r, it) for r in range(2)]
            ref.enqueue({f: torch.cat([p[0][f] for p in parts]) for f in ("feat", "density")},
                        torch.cat([p[1] for p in parts]))
        for k, v in ref.state_dict().items():
            self.assertTrue(torch.equal(a[k], v), k)

    def test_not_distributed_is_noop(self):
        v = {"feat": torch.randn(4, 2)}
        lab = torch.arange(4)
        v2, lab2 = gather_for_enqueue(v, lab)
        self.assertIs(v2["feat"], v["feat"])
        self.assertIs(lab2, lab)


if __name__ == "__main__":
    unittest.main()


def test_class_row_blocks_cover_every_row_once_in_single_class_blocks():
    from semiseg_d2.layers.memory_bank import class_row_blocks

    g = torch.Generator().manual_seed(0)
    for R, C, B in [(37, 4, 5), (12, 3, 100), (50, 5, 1), (9, 6, 4), (0, 3, 4)]:
        labels = torch.randint(0, C, (R,), generator=g)
        if R:
            labels[: R // 2] = 1  # one crowded class spanning several blocks
        rows, ok, block_class, slot = class_row_blocks(labels, C, B)
        Bc = max(1, min(B, R))
        assert rows.shape == ok.shape == ((-(-R // Bc) + C) if R else 0, Bc) and block_class.shape == rows.shape[:1]
        assert torch.equal(torch.sort(rows[ok]).values, torch.arange(R))  # every row exactly once
        if R == 0:
            continue
        assert torch.equal(labels[rows][ok], block_class[:, None].expand_as(rows)[ok])  # one class per block
        assert torch.equal(rows.view(-1)[slot], torch.arange(R)) and bool(ok.view(-1)[slot].all())
        for c in range(C):  # a class's rows keep their original order
            mine = rows[ok][labels[rows][ok] == c]
            assert torch.equal(mine, torch.sort(mine).values)
