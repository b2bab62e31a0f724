"""GPU tests of the Python binding with PyTorch tensors (skipped without torch or a GPU)."""
import unittest

try:
    import torch
    HAVE_GPU = torch.cuda.is_available()
except ImportError:
    HAVE_GPU = False

import kjit


def reference_rmsnorm(x, w, eps):
    xf = x.double()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@unittest.skipUnless(HAVE_GPU, "needs torch with a CUDA GPU")
class TorchTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(torch.seed() & 0xFFFFFFFF)

    def check_close(self, got, ref, rtol):
        err = (got.double() - ref).abs()
        self.assertTrue(torch.isfinite(got.double()).all())
        self.assertTrue(bool((err <= 1e-3 + rtol * ref.abs()).all()), f"max err {float(err.max())}")

    def test_rmsnorm_helpers(self):
        for dtype, rtol in ((torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -9)):
            for rows, hidden in ((1, 4096), (37, 7168), (1000, 128), (5, 100)):
                x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
                w = torch.randn(hidden, dtype=dtype, device="cuda")
                y = kjit.rmsnorm(x, w, eps=1e-5)
                torch.cuda.synchronize()
                self.check_close(y, reference_rmsnorm(x, w, 1e-5), rtol)

    def test_fused_add_in_place(self):
        x = torch.randn(33, 4096, dtype=torch.bfloat16, device="cuda")
        r = torch.randn_like(x)
        w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
        expected_residual = x + r
        expected = reference_rmsnorm(expected_residual, w, 1e-6)
        kjit.fused_add_rmsnorm(x, r, w)
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(r, expected_residual))
        self.check_close(x, expected, 2 ** -7)

    def test_fp8_quant(self):
        x = torch.randn(64, 2048, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(2048, dtype=torch.bfloat16, device="cuda")
        q, scale = kjit.rmsnorm_fp8_quant(x, w)
        torch.cuda.synchronize()
        y = reference_rmsnorm(x, w, 1e-6)
        ref_scale = (y.abs().amax(-1) / 448).clamp_min(1 / (448 * 512))
        self.assertTrue(torch.allclose(scale.double(), ref_scale, rtol=1e-5))
        ref_q = (y / ref_scale[:, None]).float().to(torch.float8_e4m3fn)
        codes = (q.view(torch.uint8).int() & 0x7F) - (ref_q.view(torch.uint8).int() & 0x7F)
        self.assertLessEqual(int(codes.abs().max()), 1)

    def test_side_stream_and_raw_kernel(self):
        engine = kjit.Engine()
        k = engine.get({"op": "rmsnorm", "hidden_size": 512, "dtype": "float16"})
        self.assertEqual([p["name"] for p in k.params], ["input", "weight", "output", "batch_size", "eps"])
        x = torch.randn(300, 512, dtype=torch.float16, device="cuda")
        w = torch.randn(512, dtype=torch.float16, device="cuda")
        out = torch.full_like(x, float("nan"))
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            k(x, w, out, 300, 1e-6)  # torch's current stream: s
        s.synchronize()
        self.check_close(out, reference_rmsnorm(x, w, 1e-6), 2 ** -9)
        out2 = torch.full_like(x, float("nan"))
        k(x.data_ptr(), w.data_ptr(), out2.data_ptr(), 300, 1e-6)  # raw pointers work too
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(out, out2))

    def test_sampling_helpers(self):
        probs = torch.softmax(torch.randn(64, 32000, device="cuda") * 3, -1)
        sorted_p, _ = probs.double().sort(-1, descending=True)
        # top-k: never a token with k or more tokens strictly above it.
        for k in (1, 20, torch.randint(1, 100, (64,), device="cuda")):
            t = kjit.top_k_sampling_from_probs(probs, k, seed=5, offset=1).long()
            kk = k if isinstance(k, int) else k.long()
            above = (probs.double() > probs.double().gather(1, t[:, None])).sum(-1)
            self.assertTrue(bool((above < kk).all()))
        # top-p: the mass strictly above the token is below top_p.
        t = kjit.top_p_sampling_from_probs(probs, 0.5, seed=5, offset=2).long()
        p_t = probs.double().gather(1, t[:, None])
        mass_above = (probs.double() * (probs.double() > p_t)).sum(-1)
        self.assertTrue(bool((mass_above < 0.5 * probs.double().sum(-1)).all()))
        # min-p and plain sampling, and determinism in (seed, offset).
        t = kjit.min_p_sampling_from_probs(probs, 0.2, seed=1, offset=0).long()
        self.assertTrue(bool((probs.gather(1, t[:, None])[:, 0] >= 0.2 * probs.max(-1).values).all()))
        a = kjit.sampling_from_probs(probs, seed=9, offset=3)
        self.assertTrue(torch.equal(a, kjit.sampling_from_probs(probs, seed=9, offset=3)))
        self.assertEqual(a.dtype, torch.int32)
        j = kjit.top_k_top_p_sampling_from_probs(probs.half(), 10, torch.full((64,), 0.8, device="cuda"), seed=2)
        self.assertTrue(bool(((j >= 0) & (j < 32000)).all()))

    def test_renorm_and_mask(self):
        probs = torch.softmax(torch.randn(8, 5000, device="cuda") * 3, -1)
        r = kjit.top_k_renorm_probs(probs, 10)
        kth = probs.topk(10, -1).values[:, -1:]
        expected = torch.where(probs >= kth, probs, 0)
        expected = expected / expected.sum(-1, keepdim=True)
        self.assertTrue(torch.allclose(r, expected, rtol=1e-5, atol=1e-9))
        logits = torch.randn(8, 5000, device="cuda")
        m = kjit.top_k_mask_logits(logits, 7)
        kth = logits.topk(7, -1).values[:, -1:]
        self.assertTrue(torch.equal(m, torch.where(logits >= kth, logits, float("-inf"))))
        p = kjit.top_p_renorm_probs(probs, torch.full((8,), 0.5, device="cuda"))
        self.assertTrue(torch.allclose(p.sum(-1), torch.ones(8, device="cuda"), atol=1e-5))

    def test_errors_carry_kjit_messages(self):
        k = kjit.Engine().get({"op": "rmsnorm", "hidden_size": 512, "dtype": "float16"})
        x = torch.randn(4, 512, dtype=torch.float16, device="cuda")
        w32 = torch.randn(512, dtype=torch.float32, device="cuda")
        with self.assertRaisesRegex(kjit.ArgumentError, r"argument 1 \(weight\) expects dtype float16"):
            k(x, w32, x, 4, 1e-6)
        with self.assertRaisesRegex(kjit.ArgumentError, r"dim 0 \(batch_size\) must be 5, got 4"):
            k(x, x[0], x, 5, 1e-6)
        with self.assertRaisesRegex(kjit.ArgumentError, "expects 5 arguments"):
            k(x, x)
        with self.assertRaisesRegex(kjit.ArgumentError, "must be on a CUDA device"):
            k(x.cpu(), x[0], x, 4, 1e-6)
        with self.assertRaises(TypeError):
            kjit.rmsnorm(x.float(), w32)


if __name__ == "__main__":
    unittest.main()
