# PyTorch baselines for the normalization family, timed with CUDA events (median),
# for the same shapes kjit's gpu-check benchmarks. GB/s counts one read of each input
# and one write of each output.
import statistics
import torch

dev = "cuda"
torch.manual_seed(0)


def bench(fn, iters=200, warm=20):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
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
