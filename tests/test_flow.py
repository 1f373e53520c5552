import math
import unittest

import torch

from semiseg_d2.layers import CouplingFlow, nll_gradient_direction, nonfinite_log_det


class TestCouplingFlow(unittest.TestCase):
    def test_inverse(self):
        flow = CouplingFlow(dim=16, num_classes=3, n_blocks=3, hidden=(32, 32), init_std=0.2)
        x = torch.randn(64, 16)
        z, _ = flow(x)
        torch.testing.assert_close(flow.inverse(z), x, atol=1e-5, rtol=1e-5)

    def test_log_det_matches_jacobian(self):
        flow = CouplingFlow(dim=7, num_classes=2, n_blocks=2, hidden=(16, 16), init_std=0.3).double()
        x = torch.randn(5, 7, dtype=torch.float64)
        _, log_det = flow(x)
        self.assertEqual(log_det.dtype, torch.float64)
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
            # log|det|: the permutations may flip the sign of det
            torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-9, rtol=1e-9)

    def test_same_seed_same_flow(self):
        a, b = CouplingFlow(8, 2, seed=3), CouplingFlow(8, 2, seed=3)
        for k, v in a.state_dict().items():
            self.assertTrue(torch.equal(v, b.state_dict()[k]), k)

    def test_marginal_is_logsumexp_of_conditionals(self):
        flow = CouplingFlow(dim=6, num_classes=4, hidden=(16,))
        x = torch.randn(10, 6)
        cond = torch.stack([flow.log_prob(x, torch.full((10,), c)) for c in range(4)], 1)
        torch.testing.assert_close(flow.log_prob(x), torch.logsumexp(cond, 1) - math.log(4))
        # each class-conditional term is bounded by C times the marginal density
        self.assertTrue(bool((cond <= flow.log_prob(x)[:, None] + math.log(4) + 1e-5).all()))

    def test_fit_two_class_mixture(self):
        torch.manual_seed(0)
        D = 4
        centres = torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]])
        flow = CouplingFlow(dim=D, num_classes=2, n_blocks=2, hidden=(32, 32))
        opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
        for _ in range(300):
            y = torch.randint(0, 2, (128,))
            x = centres[y] + 0.5 * torch.randn(128, D)
            loss = -flow.log_prob(x, y).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flow.requires_grad_(False)
        y = torch.randint(0, 2, (256,))
        samples = centres[y] + 0.5 * torch.randn(256, D)
        far = torch.randn(256, D) * 0.5 + torch.tensor([0.0, 8.0, 0, 0])
        self.assertGreater(float(flow.log_prob(samples).min()), float(flow.log_prob(far).max()))
        # the class-conditional density prefers the right class
        right = flow.log_prob(samples, y)
        wrong = flow.log_prob(samples, 1 - y)
        self.assertGreater(float((right > wrong).float().mean()), 0.95)
        # density-descending direction points away from the class centre (on average)
        d = nll_gradient_direction(flow, samples, y)
        self.assertEqual(tuple(d.shape), (256, D))
        outward = ((samples - centres[y]) * d).sum(1)
        self.assertGreater(float((outward > 0).float().mean()), 0.8)

    def test_autocast_and_nonfinite(self):
        flow = CouplingFlow(dim=6, num_classes=2, hidden=(8,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, ld = flow(torch.randn(3, 6).bfloat16())
        self.assertEqual(z.dtype, torch.float32)
        self.assertEqual(ld.dtype, torch.float32)
        self.assertFalse(bool(nonfinite_log_det(ld)))
        self.assertTrue(bool(nonfinite_log_det(torch.tensor([0.0, float("nan")]))))
        self.assertTrue(bool(nonfinite_log_det(torch.tensor([float("inf")]))))


if __name__ == "__main__":
    unittest.main()
