#!/usr/bin/env python3
"""FlashInfer beside kjit, at the attention shapes of docs/benchmarks.md (32/8 heads, d128,
bf16), timed as `kjit bench` times (CUDA events one launch at a time, median).

  python3 tools/peer_flashinfer.py prefill [--backend fa3]   causal ragged prefill, TFLOP/s
  python3 tools/peer_flashinfer.py prefill-paged              the same over a paged cache, page 16
  python3 tools/peer_flashinfer.py decode [--tensor-cores]   paged batch decode, page 16, GB/s

FlashInfer is not a dependency of kjit: put a flashinfer-python source tree on PYTHONPATH
(it JIT-compiles its kernels with nvcc on first use; FLASHINFER_WORKSPACE_BASE says where).
Its recent wheels (0.7.4: 101 MB) exceed what a device call carries; the 0.3.1.post1 source
distribution needs only its headers beside the package, about 40 MB:
  pip download --no-deps --no-binary :all: flashinfer-python==0.3.1.post1 -d /tmp/fi && tar -xzf /tmp/fi/*.tar.gz -C /tmp/fi
  S=/tmp/fi/flashinfer_python-0.3.1.post1 D=.peer/fi/flashinfer/data   # .peer/ ignored (.git/info/exclude)
  mkdir -p .peer/fi $D/cutlass/tools/util $D/spdlog && cp -r $S/flashinfer .peer/fi/ && cp -r $S/include $S/csrc $D/
  cp -r $S/3rdparty/cutlass/include $D/cutlass/ && cp -r $S/3rdparty/cutlass/tools/util/include $D/cutlass/tools/util/
  cp -r $S/3rdparty/spdlog/include $D/spdlog/
then on the device: PYTHONPATH=.peer/fi FLASHINFER_CUDA_ARCH_LIST=9.0a python3 tools/peer_flashinfer.py prefill
(the first prefill call compiles for ~75 s on 16 cores, the decode ~21 s).
FLOPs count the visible (query, key) pairs as kjit's bench does; decode bytes are K, V, q
and the output once.
"""
import argparse
import sys
import time

import torch

import flashinfer
from torch_baselines import bench  # (tools/ is this script's directory)

HEADS, KV_HEADS, DIM = 32, 8, 128
dev = "cuda"


def prefill(args, workspace):
    print(f"flashinfer {flashinfer.__version__} ragged causal prefill, backend {args.backend}, 32/8 heads d128 bf16")
    print(f"{'batch x seq':<14} {'median us':>10} {'TFLOP/s':>8}", flush=True)
    for batch, seq in ((1, 8192), (2, 4096), (4, 2048), (8, 1024), (32, 256)):
        indptr = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=dev)
        q = torch.randn(batch * seq, HEADS, DIM, dtype=torch.bfloat16, device=dev)
        k = torch.randn(batch * seq, KV_HEADS, DIM, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=args.backend)
        started = time.time()
        wrapper.plan(indptr, indptr, HEADS, KV_HEADS, DIM, causal=True, q_data_type=torch.bfloat16,
                     kv_data_type=torch.bfloat16)
        wrapper.run(q, k, v)
        torch.cuda.synchronize()
        first = time.time() - started
        t = bench(lambda: wrapper.run(q, k, v), iters=args.iters, warm=5)
        flops = 4 * DIM * HEADS * seq * (seq + 1) / 2 * batch
        print(f"{f'{batch} x {seq}':<14} {t:>10.1f} {flops / (t * 1e-6) / 1e12:>8.1f}   (first call {first:.1f} s)",
              flush=True)


def prefill_paged(args, workspace):
    page = 16
    print(f"flashinfer {flashinfer.__version__} paged causal prefill, page {page}, backend {args.backend}, 32/8 heads d128 bf16")
    print(f"{'batch x seq':<14} {'median us':>10} {'TFLOP/s':>8}", flush=True)
    for batch, seq in ((1, 8192), (2, 4096), (4, 2048), (8, 1024), (32, 256)):
        indptr = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=dev)
        pages_per = (seq + page - 1) // page
        page_indptr = torch.arange(0, (batch + 1) * pages_per, pages_per, dtype=torch.int32, device=dev)
        indices = torch.randperm(batch * pages_per, device=dev).to(torch.int32)
        last = torch.full((batch,), seq - (pages_per - 1) * page, dtype=torch.int32, device=dev)
        cache = torch.randn(batch * pages_per, 2, page, KV_HEADS, DIM, dtype=torch.bfloat16, device=dev)
        q = torch.randn(batch * seq, HEADS, DIM, dtype=torch.bfloat16, device=dev)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=args.backend)
        wrapper.plan(indptr, page_indptr, indices, last, HEADS, KV_HEADS, DIM, page, causal=True,
                     q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        t = bench(lambda: wrapper.run(q, cache), iters=args.iters, warm=5)
        flops = 4 * DIM * HEADS * seq * (seq + 1) / 2 * batch
        print(f"{f'{batch} x {seq}':<14} {t:>10.1f} {flops / (t * 1e-6) / 1e12:>8.1f}", flush=True)


def decode(args, workspace):
    page = 16
    print(f"flashinfer {flashinfer.__version__} paged batch decode, page {page}, NHD, 32/8 heads d128 bf16, "
          f"use_tensor_cores={args.tensor_cores}")
    print(f"{'batch x kv':<14} {'median us':>10} {'GB/s':>8}", flush=True)
    for batch, kv_len in ((64, 4096), (1, 32768), (16, 8192), (256, 1024)):
        pages_per = (kv_len + page - 1) // page
        indptr = torch.arange(0, (batch + 1) * pages_per, pages_per, dtype=torch.int32, device=dev)
        # pages in a shuffled order, as a server's allocator leaves them
        indices = torch.randperm(batch * pages_per, device=dev).to(torch.int32)
        last = torch.full((batch,), kv_len - (pages_per - 1) * page, dtype=torch.int32, device=dev)
        cache = torch.randn(batch * pages_per, 2, page, KV_HEADS, DIM, dtype=torch.bfloat16, device=dev)
        q = torch.randn(batch, HEADS, DIM, dtype=torch.bfloat16, device=dev)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=args.tensor_cores)
        started = time.time()
        wrapper.plan(indptr, indices, last, HEADS, KV_HEADS, DIM, page, q_data_type=torch.bfloat16,
                     kv_data_type=torch.bfloat16)
        wrapper.run(q, cache)
        torch.cuda.synchronize()
        first = time.time() - started
        t = bench(lambda: wrapper.run(q, cache), iters=args.iters, warm=5)
        nbytes = 2 * batch * kv_len * KV_HEADS * DIM * 2 + 2 * q.numel() * 2
        print(f"{f'{batch} x {kv_len}':<14} {t:>10.1f} {nbytes / (t * 1e-6) / 1e9:>8.0f}   (first call {first:.1f} s)",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["prefill", "prefill-paged", "decode"])
    parser.add_argument("--backend", default="fa3", help="prefill backend: fa2, fa3 or auto")
    parser.add_argument("--tensor-cores", action="store_true", help="decode through the prefill kernel (use_tensor_cores)")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    workspace = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    {"prefill": prefill, "prefill-paged": prefill_paged, "decode": decode}[args.what](args, workspace)


if __name__ == "__main__":
    sys.exit(main())
