import unittest

import torch
import torch.nn.functional as F

from semiseg_d2.layers import knn_density, knn_density_grouped, knn_density_per_class


def _brute(q, k, ks):
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    out = []
    for i in range(q.shape[0]):
        sims = sorted((q[i] @ k.t()).tolist(), reverse=True)
        out.append(sum(sum(sims[:min(kk, len(sims))]) / min(kk, len(sims)) for kk in ks) / len(ks))
    return torch.tensor(out, dtype=torch.float32)


class TestKnnDensity(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.q = torch.randn(37, 16, generator=g)
        self.k = torch.randn(90, 16, generator=g)

    def test_brute_force(self):
        ks = (8, 16, 32)
        torch.testing.assert_close(knn_density(self.q, self.k, ks), _brute(self.q, self.k, ks), atol=1e-5, rtol=1e-5)

    def test_chunk_invariant(self):
        ref = knn_density(self.q, self.k, max_elements=10 ** 9)
        for m in (1, 90, 95, 1000):
            torch.testing.assert_close(knn_density(self.q, self.k, max_elements=m), ref, atol=1e-6, rtol=0)

    def test_cluster_beats_outlier(self):
        g = torch.Generator().manual_seed(1)
        centre = torch.randn(8, generator=g)
        keys = centre + 0.05 * torch.randn(64, 8, generator=g)
        inside = centre[None] + 0.01 * torch.randn(1, 8, generator=g)
        outlier = -centre[None]
        d = knn_density(torch.cat([inside, outlier]), keys)
        self.assertGreater(float(d[0]), float(d[1]))

    def test_ks_larger_than_m_and_empty(self):
        keys = self.k[:5]
        torch.testing.assert_close(knn_density(self.q, keys, (8, 16)), _brute(self.q, keys, (5, 5)), atol=1e-5, rtol=1e-5)
        self.assertTrue(torch.equal(knn_density(self.q, self.k[:0]), torch.zeros(37)))

    def test_autocast_bf16_in_fp32(self):
        qb, kb = self.q.bfloat16(), self.k.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = knn_density(qb, kb)
        self.assertEqual(d.dtype, torch.float32)
        torch.testing.assert_close(d, _brute(qb.float(), kb.float(), (8, 16, 32)), atol=1e-5, rtol=1e-5)

    def test_per_class_matches_per_class_calls(self):
        g = torch.Generator().manual_seed(2)
        C, N, D = 4, 40, 12
        bank = torch.randn(C, N, D, generator=g)
        count = torch.tensor([40, 10, 0, 3])
        q = torch.randn(50, D, generator=g)
        cls = torch.randint(0, C, (50,), generator=g)
        cls[:5] = 2  # empty class
        ks = (4, 8, 16)
        ref = torch.stack([knn_density(q[i:i + 1], bank[c, :count[c]], ks)[0] for i, c in enumerate(cls.tolist())])
        for m in (10 ** 9, 7):
            out = knn_density_per_class(q, cls, bank, count, ks, max_elements=m)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        self.assertTrue(torch.equal(out[:5], torch.zeros(5)))
        grouped = knn_density_grouped(q[:C * 3].view(C, 3, D), bank, count, ks)
        ref = torch.stack([knn_density(q[c * 3:c * 3 + 3], bank[c, :count[c]], ks) for c in range(C)])
        torch.testing.assert_close(grouped, ref, atol=1e-5, rtol=1e-5)

    def test_grouped_cpu_paths_padded_bank_and_partial_mask(self):
        """The CPU-only paths of the grouped density: a bank of 1024 <= N < 2048 entries padded for the faster
        top-k, similarity chunks below max_elements, and the mask applied from the smallest count on."""
        g = torch.Generator().manual_seed(3)
        C, N, D, ks = 3, 1100, 8, (8, 16, 32)
        bank = torch.randn(C, N, D, generator=g)
        q = torch.randn(C, 5, D, generator=g)
        for count in (torch.tensor([1100, 1100, 1100]), torch.tensor([1100, 700, 20]), torch.tensor([0, 1100, 31])):
            ref = torch.stack([knn_density(q[c], bank[c, :count[c]], ks) for c in range(C)])
            for m in (10 ** 9, 1):
                torch.testing.assert_close(knn_density_grouped(q, bank, count, ks, max_elements=m), ref,
                                           atol=1e-6, rtol=0)


if __name__ == "__main__":
    unittest.main()
