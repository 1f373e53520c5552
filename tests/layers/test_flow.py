import math
import unittest

import FrEIA.framework as Ff  # test-only dependency (requirements-test.txt): the official DDFP flow library
import FrEIA.modules as Fm
import torch
from torch import nn

from semiseg_d2.layers import CouplingFlow, nll_gradient_direction, nonfinite_log_det
from semiseg_d2.layers.flow import GLOWCoupling


def _copy_subnet(ours: nn.Sequential, freia: nn.Sequential) -> None:
    """Copy our subnet's Linear weights into FrEIA's (same Linear-ReLU-...-Linear layout)."""
    ours_lin = [m for m in ours if isinstance(m, nn.Linear)]
    freia_lin = [m for m in freia if isinstance(m, nn.Linear)]
    assert len(ours_lin) == len(freia_lin)
    for a, b in zip(ours_lin, freia_lin):
        b.weight.data.copy_(a.weight.data)
        b.bias.data.copy_(a.bias.data)


def _freia_subnet(hidden):
    def build(c_in, c_out):  # the official model/flow/model.py::subnet_fc for hidden = (h, h)
        layers, width = [], c_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, c_out))
    return build


class TestAgainstFrEIA(unittest.TestCase):
    """Parity with FrEIA 0.2 (the official DDFP code's GLOWCouplingBlock + PermuteRandom) in float64, with
    weights copied from ours and large init so that the soft clamp is far from linear."""

    def _block_pair(self, dim, clamp=2.0, hidden=(16, 16)):
        torch.manual_seed(0)
        ours = GLOWCoupling(dim, hidden, clamp).double()
        for p in ours.parameters():
            p.data.normal_(0.0, 0.5)
        freia = Fm.GLOWCouplingBlock([(dim,)], subnet_constructor=_freia_subnet(hidden), clamp=clamp).double()
        _copy_subnet(ours.net1, freia.subnet1)
        _copy_subnet(ours.net2, freia.subnet2)
        return ours, freia

    def test_one_block_forward_log_det_inverse(self):
        for dim in (8, 7):  # odd D: FrEIA splits round(D / 2) channels first
            ours, freia = self._block_pair(dim)
            x = 3.0 * torch.randn(32, dim, dtype=torch.float64)
            y, log_det = ours(x)
            (y_ref,), log_det_ref = freia([x])
            # the clamp saturates: log-scales reach well beyond the linear range of atan
            self.assertGreater(float(ours._st(ours.net2, x[:, ours.len1:], ours.len1)[0].detach().abs().max()), 1.5)
            torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(log_det, log_det_ref, atol=1e-12, rtol=1e-12)
            (x_ref,), _ = freia([y_ref], rev=True)
            torch.testing.assert_close(ours.inverse(y), x_ref, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(ours.inverse(y), x, atol=1e-9, rtol=1e-9)

    def test_whole_flow_equals_official_graph(self):
        """CouplingFlow(seed=0) = the official RNVP graph: GLOW block k then PermuteRandom(seed=k)."""
        dim, hidden, n_blocks = 10, (16, 16), 2
        ours = CouplingFlow(dim, num_classes=3, n_blocks=n_blocks, hidden=hidden, clamp=2.0, init_std=0.5).double()
        nodes = [Ff.InputNode(dim, name="input")]
        for k in range(n_blocks):
            nodes.append(Ff.Node(nodes[-1], Fm.GLOWCouplingBlock,
                                 {"subnet_constructor": _freia_subnet(hidden), "clamp": 2.0}, name=f"coupling_{k}"))
            nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": k}, name=f"permute_{k}"))
        nodes.append(Ff.OutputNode(nodes[-1], name="output"))
        ref = Ff.GraphINN(nodes, verbose=False).double()
        blocks = [m for m in ref.module_list if isinstance(m, Fm.GLOWCouplingBlock)]
        for a, b in zip(ours.blocks, blocks):
            _copy_subnet(a.net1, b.subnet1)
            _copy_subnet(a.net2, b.subnet2)
        x = 2.0 * torch.randn(16, dim, dtype=torch.float64)
        z, log_det = ours(x)
        z_ref, log_det_ref = ref(x)
        torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(log_det, log_det_ref, atol=1e-12, rtol=1e-12)
        x_ref, _ = ref(z_ref, rev=True)
        torch.testing.assert_close(ours.inverse(z), x_ref, atol=1e-12, rtol=1e-12)


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
