"""CPU tests of the Python binding and of the conformance runner's GPU-free parts."""
import os
import pathlib
import unittest

import kjit
from kjit import conformance

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "data" / "definitions"
SHARED = ROOT.parent / "shared" / "definitions"


def has_gpu():
    try:
        kjit.Engine(disk_cache=False).get({"op": "rmsnorm", "hidden_size": 128, "dtype": "float16"})
        return True
    except kjit.UnavailableError:
        return False


class BindingTest(unittest.TestCase):
    def test_library_loads(self):
        self.assertRegex(kjit.version(), r"^\d+\.\d+\.\d+$")
        self.assertTrue(os.path.exists(kjit.library_path) or "/" not in kjit.library_path)

    def test_render_and_errors(self):
        engine = kjit.Engine(disk_cache=False, arch="sm_90a")
        source = engine.render({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"})
        self.assertIn('extern "C" __global__', source)
        with self.assertRaises(kjit.SpecError) as e:
            engine.render({"op": "rmsnorm", "hidden_size": 4096})
        self.assertIn('field "dtype" is missing', str(e.exception))
        with self.assertRaises(kjit.SpecError):
            kjit.Engine(arch="volta")
        self.assertTrue(issubclass(kjit.SpecError, ValueError))

    @unittest.skipIf(has_gpu(), "a GPU is present")
    def test_no_gpu_is_reported_cleanly(self):
        engine = kjit.Engine(disk_cache=False)
        with self.assertRaises(kjit.UnavailableError) as e:
            engine.get({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"})
        self.assertRegex(str(e.exception), "libcuda|GPU|cuInit")

    def test_definitions_are_specs(self):
        engine = kjit.Engine(disk_cache=False, arch="sm_90a")
        text = (FIXTURES / "rmsnorm" / "rmsnorm_h7168.json").read_text()
        self.assertIn("/*hidden=*/7168", engine.render(text))


class ConformanceTest(unittest.TestCase):
    def definitions(self):
        dirs = [FIXTURES] + ([SHARED] if SHARED.exists() else [])
        return conformance.load_definitions(*dirs)

    def test_finds_and_classifies_definitions(self):
        found = self.definitions()
        supported = [d for _, d in found if conformance.adapter_for(d)]
        self.assertGreaterEqual(len(supported), 9)
        if SHARED.exists():
            unsupported = {d["name"] for _, d in found if not conformance.adapter_for(d)}
            # listed in the report, not dropped: MLA; GQA decode and prefill run
            self.assertIn("mla_paged_decode_h16_ckv512_kpe64_ps1", unsupported)
            for name in ("gqa_paged_decode_h32_kv8_d128_ps1", "gqa_paged_prefill_causal_h32_kv8_d128_ps1",
                         "gqa_ragged_prefill_causal_h32_kv8_d128"):
                self.assertNotIn(name, unsupported)

    def test_prefill_cases_fill_every_axis(self):
        if not SHARED.exists():
            self.skipTest("no shared definitions")
        for _, d in self.definitions():
            adapter = conformance.adapter_for(d)
            if not isinstance(adapter, conformance.GqaPrefillAdapter):
                continue
            for axes in adapter.axis_choices(d):
                self.assertEqual(axes["len_indptr"], len(axes["qo_tokens"]) + 1)
                self.assertEqual(axes["total_q"], sum(axes["qo_tokens"]))
                self.assertTrue(set(conformance.var_axes(d)) - {"total_kv", "num_kv_indices", "num_pages"} <= set(axes))

    def test_axes_shapes_and_constraints(self):
        for path, d in self.definitions():
            if conformance.op_type(d) != "rmsnorm":
                continue
            adapter = conformance.adapter_for(d)
            for axes in adapter.axis_choices(d):
                self.assertEqual(set(axes), set(d["axes"]), path)
                plan = conformance.tensor_plan(d, axes)
                hidden = d["axes"]["hidden_size"]["value"]
                self.assertEqual(plan["hidden_states"][0], (axes["batch_size"], hidden))
                self.assertEqual(plan["weight"][0], (hidden,))
                self.assertEqual(plan["output"][0], (axes["batch_size"], hidden))
                self.assertEqual(conformance.check_constraints(d, axes), [], path)
            self.assertGreater(adapter.eps(d), 0)

    def test_constraints_are_evaluated(self):
        d = {"constraints": ["len_indptr == batch_size + 1", "num_kv_indices == kv_indptr[-1].item()"]}
        self.assertEqual(conformance.check_constraints(d, {"len_indptr": 5, "batch_size": 4}), [])
        self.assertEqual(conformance.check_constraints(d, {"len_indptr": 4, "batch_size": 4}),
                         ["len_indptr == batch_size + 1"])


@unittest.skipUnless(has_gpu(), "needs a GPU")
class AttentionTest(unittest.TestCase):
    def test_planned_and_forced_splits_match_torch(self):
        import torch
        torch.manual_seed(0)
        heads, kv_heads, dim, page = 8, 2, 128, 16
        lengths = [1, 300, 17, 0]
        pages = [(n + page - 1) // page for n in lengths]
        indptr = torch.tensor([0] + [sum(pages[:i + 1]) for i in range(len(pages))], dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * page if p else 1 for n, p in zip(lengths, pages)], dtype=torch.int32)
        indices = torch.randperm(int(indptr[-1])).to(torch.int32)
        k = torch.randn(int(indptr[-1]), page, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(len(lengths), heads, dim, dtype=torch.bfloat16, device="cuda")
        scale = dim ** -0.5
        decode = kjit.BatchDecode({"op": "batch_decode", "num_qo_heads": heads, "num_kv_heads": kv_heads,
                                   "head_dim": dim, "page_size": page, "dtype": "bfloat16"})
        for chunks in (0, 3):
            plan = decode.plan(indptr, last, num_chunks=chunks)
            if chunks:
                self.assertEqual(plan.num_chunks, chunks)
            out, _ = decode.run(q, k, v, indptr.cuda(), indices.cuda(), last.cuda(), scale,
                                out=torch.full_like(q, float("nan")))
            torch.cuda.synchronize()
            for b, n in enumerate(lengths):
                rows = indices[indptr[b]:indptr[b + 1]].long().cuda()
                keys = k[rows].reshape(-1, kv_heads, dim)[:n].float().repeat_interleave(heads // kv_heads, 1)
                values = v[rows].reshape(-1, kv_heads, dim)[:n].float().repeat_interleave(heads // kv_heads, 1)
                weights = torch.softmax(torch.einsum("hd,thd->ht", q[b].float(), keys) * scale, dim=-1)
                expected = torch.einsum("ht,thd->hd", weights, values) if n else torch.zeros_like(q[b].float())
                error = (out[b].float() - expected).norm() / max(expected.norm(), 1e-6)
                self.assertLess(error.item(), 1e-2, f"request {b} (length {n}), {plan.num_chunks} chunk(s)")
        with self.assertRaises(kjit.ArgumentError) as e:  # a host tensor where the kernel needs device memory
            decode.run(q, k, v, indptr, indices.cuda(), last.cuda(), scale)
        self.assertIn("kv_indptr is on cpu", str(e.exception))

    def test_prefill_work_list_matches_static_order_and_torch(self):
        import torch
        torch.manual_seed(1)
        heads, kv_heads, dim = 32, 8, 128
        lengths = [1000, 17, 0, 300, 2048, 129]  # queries = keys per request, causal
        indptr = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
        q = torch.randn(int(indptr[-1]), heads, dim, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(int(indptr[-1]), kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        scale = dim ** -0.5
        spec = {"op": "batch_prefill", "num_qo_heads": heads, "num_kv_heads": kv_heads, "head_dim": dim,
                "dtype": "bfloat16"}
        static, listed = kjit.default_engine().get(spec), kjit.default_engine().get({**spec, "work_list": True})
        # the output through shared memory and the bulk copy engine: the same arithmetic
        staged = kjit.default_engine().get({**spec, "work_list": True, "staged_output": True})
        work_list = kjit.plan_prefill_work(listed, indptr, indptr, device="cuda")
        d_indptr = indptr.cuda()
        outputs = []
        for kernel, extra in ((static, []), (listed, [work_list]), (staged, [work_list])):
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:2], float("nan"), device="cuda")
            kernel(q, k, v, d_indptr, d_indptr, out, lse, *extra, len(lengths), max(lengths), scale)
            outputs.append((out, lse))
        torch.cuda.synchronize()
        # the kernels took their items from the list's queue, and left it reset for the next launch
        self.assertEqual(work_list[1:3].tolist(), [0, 0])
        for other in outputs[1:]:  # the same tiles in the same order per item
            self.assertTrue(torch.equal(outputs[0][0], other[0]))
            self.assertTrue(torch.equal(outputs[0][1], other[1]))
        out = outputs[1][0]
        for b, n in enumerate(lengths):
            if n == 0:
                continue
            rows = slice(int(indptr[b]), int(indptr[b + 1]))
            query = q[rows].float().transpose(0, 1)
            keys = k[rows].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
            values = v[rows].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
            expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale)
            error = (out[rows].float().transpose(0, 1) - expected).norm() / expected.norm()
            self.assertLess(error.item(), 1e-2, f"request {b} (length {n})")
        with self.assertRaises(kjit.ArgumentError):  # a spec without "work_list"
            kjit.plan_prefill_work(static, indptr, indptr)


if __name__ == "__main__":
    unittest.main()
