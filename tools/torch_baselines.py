# PyTorch baselines that kjit's gpu-check measures side by side, timed with CUDA events
# (median). GB/s counts one read of each input and one write of each output.
#   python3 tools/torch_baselines.py norm       RMSNorm forms, 16384 rows
#   python3 tools/torch_baselines.py sampling   sampling from 128256-wide softmax(3 N(0,1)) rows
#   python3 tools/torch_baselines.py attention  SDPA decode on contiguous KV
import statistics
import sys

import torch

dev = "cuda"
torch.manual_seed(0)


def bench(fn, iters=200, warm=20, back_to_back=False):
    """Median of calls timed one by one, or with back_to_back the per-call time of the calls
    queued one after another (one event pair around all of them)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    if back_to_back:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / iters
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def fp8_quant(y):
    amax = y.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.clamp(amax / 448.0, min=1.0 / (448.0 * 512.0))
    return (y.float() / scale).to(torch.float8_e4m3fn), scale


def top_p_sort(probs, p=0.9):
    sp, si = torch.sort(probs, descending=True, dim=-1)
    cs = torch.cumsum(sp, -1)
    sp = sp.masked_fill(cs - sp > p, 0)
    return si.gather(-1, torch.multinomial(sp, 1))


def top_k_topk(probs, k=50):
    v, i = torch.topk(probs, k, dim=-1)
    return i.gather(-1, torch.multinomial(v, 1))


def min_p_mask(probs, min_p=0.1):
    keep = probs >= min_p * probs.amax(-1, keepdim=True)
    return torch.multinomial(probs * keep, 1)


def top_k_top_p(probs, k=50, p=0.9):
    v, i = torch.topk(probs, k, dim=-1)
    cs = torch.cumsum(v, -1)
    v = v.masked_fill(cs - v > p * probs.sum(-1, keepdim=True), 0)
    return i.gather(-1, torch.multinomial(v, 1))



def norm():
    print(f"{'torch baseline':<60} {'rows':>6} {'median us':>10} {'GB/s':>8}")
    for hidden in (4096, 7168, 16384, 128):
        rows = 16384
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, device=dev)
        r = torch.randn_like(x)
        w = torch.randn(hidden, dtype=torch.bfloat16, device=dev)
        n = x.numel()
        cases = [("F.rms_norm", lambda: torch.nn.functional.rms_norm(x, (hidden,), w, 1e-6), 4 * n)]
        if hidden == 4096:
            def fused():
                s = x + r
                return torch.nn.functional.rms_norm(s, (hidden,), w, 1e-6), s
            cases.append(("add + F.rms_norm (unfused)", fused, 8 * n))
            cases.append(("F.rms_norm + fp8 quant (eager)", lambda: fp8_quant(torch.nn.functional.rms_norm(x, (hidden,), w, 1e-6)), 3 * n))
            try:
                compiled = torch.compile(fused)
                cases.append(("add + F.rms_norm (torch.compile)", compiled, 8 * n))
                cq = torch.compile(lambda: fp8_quant(torch.nn.functional.rms_norm(x, (hidden,), w, 1e-6)))
                cases.append(("F.rms_norm + fp8 quant (torch.compile)", cq, 3 * n))
            except Exception as e:  # compile is optional
                print("torch.compile failed:", repr(e)[:200])
        for name, fn, nbytes in cases:
            try:
                t = bench(fn)
            except Exception as e:
                print(f"{name}: failed {repr(e)[:200]}")
                continue
            print(f"{name + f' h{hidden} bf16':<60} {rows:>6} {t:>10.2f} {nbytes / (t * 1e-6) / 1e9:>8.0f}")


def sampling():
    print(f"{'torch baseline':<44} {'batch':>6} {'median us':>10} {'GB/s':>8}")
    for batch in (1, 16, 128, 512):
        probs = torch.softmax(torch.randn(batch, 128256, device=dev) * 3, -1)
        nbytes = probs.numel() * 4
        for name, fn in (("multinomial", lambda: torch.multinomial(probs, 1)), ("top-p (sort + cumsum)", lambda: top_p_sort(probs)),
                         ("top-k (torch.topk)", lambda: top_k_topk(probs)), ("min-p (mask)", lambda: min_p_mask(probs)),
                         ("top-k + top-p (topk + cumsum)", lambda: top_k_top_p(probs))):
            t = bench(fn, iters=50, warm=5)
            print(f"{name + ' 128256 fp32':<44} {batch:>6} {t:>10.1f} {nbytes / (t * 1e-6) / 1e9:>8.0f}")


def attention():
    import torch.nn.functional as F
    print(f"{'torch SDPA decode (contiguous KV), 32/8 heads d128 bf16':<60} {'median us':>10} {'GB/s':>8}"
          f" {'back to back us':>16} {'GB/s':>8}")
    for batch, kv_len in ((64, 4096), (1, 32768), (16, 8192), (256, 1024)):
        q = torch.randn(batch, 32, 1, 128, dtype=torch.bfloat16, device=dev)
        k = torch.randn(batch, 8, kv_len, 128, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        t = bench(sdpa, iters=50, warm=10)
        tb = bench(sdpa, iters=50, warm=10, back_to_back=True)
        nbytes = 2 * k.numel() * 2 + 2 * q.numel() * 2
        print(f"{f'batch {batch} kv {kv_len}':<60} {t:>10.1f} {nbytes / (t * 1e-6) / 1e9:>8.0f}"
              f" {tb:>16.1f} {nbytes / (tb * 1e-6) / 1e9:>8.0f}")


def prefill():
    import torch.nn.functional as F
    print(f"{'torch SDPA causal prefill, 32/8 heads d128 bf16':<60} {'median us':>10} {'TFLOP/s':>8}"
          f" {'back to back us':>16} {'TFLOP/s':>8}")
    for batch, seq in ((1, 8192), (2, 4096), (4, 2048), (8, 1024), (1, 2048), (32, 256)):
        q = torch.randn(batch, 32, seq, 128, dtype=torch.bfloat16, device=dev)
        k = torch.randn(batch, 8, seq, 128, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        t = bench(sdpa, iters=20, warm=5)
        tb = bench(sdpa, iters=20, warm=5, back_to_back=True)
        flops = 4 * 128 * 32 * seq * (seq + 1) / 2 * batch
        print(f"{f'batch {batch} seq {seq}':<60} {t:>10.1f} {flops / (t * 1e-6) / 1e12:>8.1f}"
              f" {tb:>16.1f} {flops / (tb * 1e-6) / 1e12:>8.1f}")
    # Append attention: 16 new queries per request over 4096 keys (contiguous), the mask
    # aligned to the last key as kjit's; GB/s counts q, output, K and V once.
    batch, new, kv_len = 64, 16, 4096
    q = torch.randn(batch, 32, new, 128, dtype=torch.bfloat16, device=dev)
    k = torch.randn(batch, 8, kv_len, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    mask = torch.ones(new, kv_len, dtype=torch.bool, device=dev).tril(kv_len - new)
    t = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), iters=20, warm=5)
    nbytes = 2 * q.numel() * 2 + 2 * k.numel() * 2
    print(f"{f'append: batch {batch}, {new} queries over {kv_len} keys (GB/s)':<60} {t:>10.1f} {nbytes / (t * 1e-6) / 1e9:>8.0f}")


if __name__ == "__main__":
    {"norm": norm, "sampling": sampling, "attention": attention, "prefill": prefill}[sys.argv[1] if len(sys.argv) > 1 else "norm"]()
