import math
import unittest

import torch
from torch import nn

from semiseg_d2.layers import ema_momentum, ema_update_


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


class TestEMAMomentum(unittest.TestCase):
    def test_schedules(self):
        self.assertEqual(ema_momentum("constant", 0.99, 5, 100), 0.99)
        self.assertEqual(ema_momentum("warm_start", 0.99, 0, 100), 0.0)
        self.assertAlmostEqual(ema_momentum("warm_start", 0.99, 9, 100), 0.9)
        self.assertEqual(ema_momentum("warm_start", 0.99, 10_000, 100), 0.99)
        self.assertAlmostEqual(ema_momentum("cosine", 0.99, 0, 100), 0.99)
        self.assertAlmostEqual(ema_momentum("cosine", 0.99, 50, 100), 1 - 0.01 * 0.5)
        self.assertAlmostEqual(ema_momentum("cosine", 0.99, 100, 100), 1.0)
        self.assertAlmostEqual(ema_momentum("cosine", 0.99, 30, 100), 1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2)

    def test_unknown(self):
        with self.assertRaisesRegex(ValueError, "known: constant, warm_start, cosine"):
            ema_momentum("linear", 0.99, 0, 10)


class TestEMAUpdate(unittest.TestCase):
    def test_params_averaged_buffers_copied(self):
        teacher, student = _net(0), _net(1)
        student[1].running_mean.fill_(3.0)
        student[1].num_batches_tracked.fill_(7)
        t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
        s0 = {k: v.clone() for k, v in student.state_dict().items()}
        ema_update_(teacher, student, 0.9)
        for name, _ in teacher.named_parameters():
            torch.testing.assert_close(teacher.state_dict()[name], 0.9 * t0[name] + 0.1 * s0[name])
        for name, _ in teacher.named_buffers():
            torch.testing.assert_close(teacher.state_dict()[name], s0[name])
        self.assertEqual(int(teacher[1].num_batches_tracked), 7)

    def test_ema_buffers_flag(self):
        teacher, student = _net(0), _net(1)
        student[1].running_var.fill_(3.0)
        student[1].num_batches_tracked.fill_(7)
        ema_update_(teacher, student, 0.5, ema_buffers=True)
        torch.testing.assert_close(teacher[1].running_var, torch.full((4,), 2.0))
        self.assertEqual(int(teacher[1].num_batches_tracked), 7)

    def test_wrapped_student_and_mismatch(self):
        teacher, student = _net(0), _net(1)
        ema_update_(teacher, nn.DataParallel(student), 0.0)
        for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
            torch.testing.assert_close(t, s)
        with self.assertRaisesRegex(ValueError, "shape"):
            ema_update_(teacher, nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)), 0.5)
        with self.assertRaisesRegex(ValueError, "differ"):
            ema_update_(teacher, nn.Sequential(nn.Conv2d(3, 4, 3)), 0.5)


if __name__ == "__main__":
    unittest.main()
