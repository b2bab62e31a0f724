"""Batch decode over a paged KV cache with a plan/run split, and the work list of a batch
prefill (kjit/attention.hpp).

    decode = kjit.BatchDecode({"op": "batch_decode", "num_qo_heads": 32, "num_kv_heads": 8,
                               "head_dim": 128, "page_size": 16, "dtype": "bfloat16"})
    decode.plan(kv_indptr, kv_last_page_len)      # once per batch composition (host copies made here)
    out, lse = decode.run(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale)
"""
import ctypes

from . import ArgumentError, _check, _lib, _spec_text, default_engine


class DecodePlan(ctypes.Structure):
    _fields_ = [("batch_size", ctypes.c_int64), ("num_chunks", ctypes.c_int64), ("chunk_size", ctypes.c_int64),
                ("workspace_bytes", ctypes.c_uint64)]


def _declare():
    P = ctypes.POINTER
    vp = ctypes.c_void_p
    _lib.kjit_batch_decode_create.argtypes = [vp, ctypes.c_char_p, P(vp)]
    _lib.kjit_batch_decode_create.restype = ctypes.c_int
    _lib.kjit_batch_decode_destroy.argtypes = [vp]
    _lib.kjit_batch_decode_destroy.restype = None
    _lib.kjit_batch_decode_plan.argtypes = [vp, P(ctypes.c_int32), P(ctypes.c_int32), ctypes.c_int64, P(DecodePlan)]
    _lib.kjit_batch_decode_plan.restype = ctypes.c_int
    _lib.kjit_batch_decode_plan_chunks.argtypes = [vp, P(ctypes.c_int32), P(ctypes.c_int32), ctypes.c_int64, ctypes.c_int64,
                                                   P(DecodePlan)]
    _lib.kjit_batch_decode_plan_chunks.restype = ctypes.c_int
    _lib.kjit_batch_decode_run.argtypes = [vp, P(DecodePlan)] + [vp] * 9 + [ctypes.c_double] * 3 + [vp]
    _lib.kjit_batch_decode_run.restype = ctypes.c_int
    _lib.kjit_plan_prefill_work.argtypes = [vp, P(ctypes.c_int32), P(ctypes.c_int32), P(ctypes.c_int32), ctypes.c_int64,
                                            ctypes.c_int, P(ctypes.c_int32), P(ctypes.c_size_t)]
    _lib.kjit_plan_prefill_work.restype = ctypes.c_int


_declare()


class BatchDecode:
    """torch tensors in, torch tensors out; launches on torch's current stream."""

    def __init__(self, spec, engine=None):
        self._engine = engine or default_engine()  # kept alive with the handle
        handle = ctypes.c_void_p()
        _check(_lib.kjit_batch_decode_create(self._engine._handle, _spec_text(spec).encode(), ctypes.byref(handle)))
        self._handle = handle
        self._plan = None
        self._workspace = None

    def __del__(self):
        if getattr(self, "_handle", None) and _lib is not None:
            _lib.kjit_batch_decode_destroy(self._handle)
            self._handle = None

    def plan(self, kv_indptr, kv_last_page_len, num_chunks=0):
        """num_chunks > 0 fixes the KV split per request instead of the planner's choice."""
        import torch
        indptr = kv_indptr.to("cpu", torch.int32).contiguous()
        last = kv_last_page_len.to("cpu", torch.int32).contiguous()
        plan = DecodePlan()
        as_int32 = ctypes.POINTER(ctypes.c_int32)
        _check(_lib.kjit_batch_decode_plan_chunks(self._handle, ctypes.cast(indptr.data_ptr(), as_int32),
                                                  ctypes.cast(last.data_ptr(), as_int32), last.numel(), num_chunks,
                                                  ctypes.byref(plan)))
        self._plan = plan
        return plan

    def run(self, q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale, out=None, lse=None,
            k_scale=1.0, v_scale=1.0):
        """v_cache is None for a combined [pages, 2, ...] cache passed as k_cache; k_scale and
        v_scale dequantize an fp8 cache."""
        import torch
        tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "kv_indptr": kv_indptr, "kv_indices": kv_indices,
                   "kv_last_page_len": kv_last_page_len, "out": out, "lse": lse}
        for name, t in tensors.items():
            if t is not None and t.device != q.device:
                raise ArgumentError(f"BatchDecode.run: {name} is on {t.device}, q on {q.device}; all must be on one GPU")
        if not q.is_cuda:
            raise ArgumentError(f"BatchDecode.run: the tensors must be on a GPU, got {q.device}")
        if self._plan is None:
            self.plan(kv_indptr, kv_last_page_len)
        # On q's device (plan may have been given host copies), grown as plans need.
        needed = max(self._plan.workspace_bytes, 1)
        if self._workspace is None or self._workspace.device != q.device or self._workspace.numel() < needed:
            self._workspace = torch.empty(needed, dtype=torch.uint8, device=q.device)
        if out is None:
            out = torch.empty_like(q)
        if lse is None:
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        stream = torch.cuda.current_stream(q.device).cuda_stream
        ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else None)  # noqa: E731
        _check(_lib.kjit_batch_decode_run(self._handle, ctypes.byref(self._plan), ptr(q), ptr(k_cache), ptr(v_cache),
                                          ptr(kv_indptr), ptr(kv_indices), ptr(kv_last_page_len), ptr(out), ptr(lse),
                                          ptr(self._workspace), float(sm_scale), float(k_scale), float(v_scale),
                                          ctypes.c_void_p(stream or None)))
        return out, lse


def plan_prefill_work(kernel, qo_indptr, kv_indptr, kv_last_page_len=None, device=None):
    """The work list of a batch_prefill kernel whose spec has "work_list": true: a queue of
    the work items, longest first, that the kernel's blocks take from as they finish
    (kjit::plan_prefill_work). Once per batch composition; pass the int32 tensor it returns
    (on `device`, default kv_indptr's) as the kernel's work_list argument. The kernel keeps
    its queue position in it and resets it at the end: one launch at a time per tensor.
    kv_last_page_len: for a paged spec."""
    import torch
    as_int32 = ctypes.POINTER(ctypes.c_int32)
    host = [None if t is None else t.to("cpu", torch.int32).contiguous() for t in (qo_indptr, kv_indptr, kv_last_page_len)]
    pointers = [None if t is None else ctypes.cast(t.data_ptr(), as_int32) for t in host]
    batch_size = host[0].numel() - 1
    size = ctypes.c_size_t(0)
    _check(_lib.kjit_plan_prefill_work(kernel._handle, *pointers, batch_size, 0, None, ctypes.byref(size)))
    work_list = torch.empty(size.value, dtype=torch.int32)
    _check(_lib.kjit_plan_prefill_work(kernel._handle, *pointers, batch_size, 0,
                                       ctypes.cast(work_list.data_ptr(), as_int32), ctypes.byref(size)))
    return work_list.to(kv_indptr.device if device is None else device)
