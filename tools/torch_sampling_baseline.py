# PyTorch baselines for sampling (what users do without sorting-free kernels), timed with
# CUDA events (median), on the shapes kjit's gpu-check benchmarks: softmax(3 N(0,1)) rows.
import statistics
import torch

dev = "cuda"
torch.manual_seed(0)


def bench(fn, iters=50, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


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


print(f"{'torch baseline':<44} {'batch':>6} {'median us':>10} {'GB/s':>8}")
for batch in (1, 16, 128, 512):
    probs = torch.softmax(torch.randn(batch, 128256, device=dev) * 3, -1)
    nbytes = probs.numel() * 4
    for name, fn in (("multinomial", lambda: torch.multinomial(probs, 1)), ("top-p (sort + cumsum)", lambda: top_p_sort(probs)),
                     ("top-k (torch.topk)", lambda: top_k_topk(probs)), ("min-p (mask)", lambda: min_p_mask(probs)),
                     ("top-k + top-p (topk + cumsum)", lambda: top_k_top_p(probs))):
        t = bench(fn)
        print(f"{name + ' 128256 fp32':<44} {batch:>6} {t:>10.1f} {nbytes / (t * 1e-6) / 1e9:>8.0f}")
