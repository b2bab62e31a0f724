"""kjit from Python: JIT-generated GPU kernels over kjit's C ABI.

    import kjit
    engine = kjit.Engine()
    norm = engine.get({"op": "rmsnorm", "hidden_size": 4096, "dtype": "bfloat16"})
    norm(x, weight, out, x.shape[0], 1e-6)            # any DLPack tensors (torch, CuPy, JAX)

    y = kjit.rmsnorm(x, weight, eps=1e-6)             # FlashInfer-like helpers (need torch to allocate)

Tensors are passed through DLPack; no PyTorch build dependency. Launches go to
`stream` (a CUstream as int) or, for torch tensors, torch's current stream.
Errors from the library raise kjit.Error subclasses with kjit's message.
"""
import ctypes
import json

from . import _capi

__all__ = ["Engine", "Kernel", "Error", "SpecError", "TemplateError", "CompileError", "CacheError", "CudaError",
           "UnavailableError", "ArgumentError", "version", "default_engine",
           "rmsnorm", "fused_add_rmsnorm", "rmsnorm_fp8_quant", "fused_add_rmsnorm_fp8_quant",
           "sampling_from_probs", "top_k_sampling_from_probs", "top_p_sampling_from_probs", "min_p_sampling_from_probs",
           "top_k_top_p_sampling_from_probs", "top_k_renorm_probs", "top_p_renorm_probs", "top_k_mask_logits",
           "BatchDecode", "plan_prefill_work"]


class Error(RuntimeError):
    """A kjit failure; `status` is the C ABI's status code."""

    status = 8


class SpecError(Error, ValueError):
    status = 1


class TemplateError(Error):
    status = 2


class CompileError(Error):
    status = 3


class CacheError(Error):
    status = 4


class CudaError(Error):
    status = 5


class UnavailableError(Error):
    status = 6


class ArgumentError(Error, TypeError):
    status = 7


_ERRORS = {c.status: c for c in (SpecError, TemplateError, CompileError, CacheError, CudaError, UnavailableError,
                                 ArgumentError)}

_lib, library_path = _capi.load_library()


def _check(status):
    if status != _capi.KJIT_OK:
        message = _lib.kjit_last_error().decode(errors="replace")
        raise _ERRORS.get(status, Error)(message)


def version():
    return _lib.kjit_version().decode()


def _spec_text(spec):
    return spec if isinstance(spec, str) else json.dumps(spec)


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _current_torch_stream(tensor):
    import torch  # only reached for torch tensors
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object: ~1 us instead of ~5
    if raw is not None:
        return raw(tensor.device.index)
    return torch.cuda.current_stream(tensor.device).cuda_stream


class Kernel:
    """A loaded kernel. Call it with arguments in signature order (see `.params`)."""

    def __init__(self, handle):
        self._handle = ctypes.c_void_p(handle)
        self.info = json.loads(_lib.kjit_kernel_info(self._handle).decode())
        self.params = self.info["params"]
        self._kinds = [p["kind"] for p in self.params]

    def __del__(self):
        if getattr(self, "_handle", None) and _lib is not None:
            _lib.kjit_kernel_release(self._handle)
            self._handle = None

    def __repr__(self):
        signature = ", ".join(p["name"] for p in self.params)
        return f"<kjit.Kernel {self.info['entry']}({signature}) {self.info['arch']}>"

    def __call__(self, *args, stream=None):
        if len(args) != len(self.params):
            names = ", ".join(p["name"] for p in self.params)
            raise ArgumentError(f"{self.info['entry']}: expects {len(self.params)} arguments ({names}), got {len(args)}")
        if stream is None:
            stream = next((_current_torch_stream(a) for a in args if _is_torch(a) and a.is_cuda), 0)
        packed = (_capi.Arg * len(args))()
        keep = []  # capsules stay alive until the launch returns
        for i, (kind, a) in enumerate(zip(self._kinds, args)):
            slot = packed[i]
            if kind == "tensor":
                if hasattr(a, "__dlpack__"):
                    capsule = a.__dlpack__() if (_is_torch(a) or not stream) else a.__dlpack__(stream=stream)
                    keep.append(capsule)
                    slot.kind = _capi.ARG_TENSOR
                    slot.value.tensor = _capi.dltensor_address(capsule)
                elif isinstance(a, int):
                    slot.kind = _capi.ARG_POINTER
                    slot.value.pointer = a
                else:
                    raise ArgumentError(f"{self.info['entry']}: argument {i} ({self.params[i]['name']}) needs a "
                                        f"DLPack tensor or a device pointer, got {type(a).__name__}")
            elif kind == "int":
                slot.kind = _capi.ARG_INT
                slot.value.integer = int(a)
            else:
                slot.kind = _capi.ARG_FLOAT
                slot.value.real = float(a)
        _check(_lib.kjit_launch(self._handle, packed, len(args), ctypes.c_void_p(stream or None)))

    launch = __call__


class Engine:
    """Compiles and caches kernels. Options as in kjit::EngineOptions."""

    def __init__(self, cache_dir=None, disk_cache=None, cache_size_limit=None, bundle_dir=None, arch=None,
                 allow_nvrtc=None):
        options = {k: v for k, v in dict(cache_dir=cache_dir, disk_cache=disk_cache, cache_size_limit=cache_size_limit,
                                         bundle_dir=bundle_dir, arch=arch, allow_nvrtc=allow_nvrtc).items()
                   if v is not None}
        handle = ctypes.c_void_p()
        _check(_lib.kjit_engine_create(json.dumps(options).encode(), ctypes.byref(handle)))
        self._handle = handle
        self._kernels = {}

    def __del__(self):
        if getattr(self, "_handle", None) and _lib is not None:
            self._kernels.clear()
            _lib.kjit_engine_destroy(self._handle)
            self._handle = None

    def get(self, spec):
        """spec: a dict, JSON text, or a FlashInfer-Bench definition (dict or text)."""
        text = _spec_text(spec)
        kernel = self._kernels.get(text)
        if kernel is None:
            handle = ctypes.c_void_p()
            _check(_lib.kjit_get(self._handle, text.encode(), ctypes.byref(handle)))
            kernel = self._kernels[text] = Kernel(handle.value)
        return kernel

    def render(self, spec):
        text = _spec_text(spec).encode()
        size = ctypes.c_size_t(0)
        _check(_lib.kjit_render(self._handle, text, None, ctypes.byref(size)))
        buffer = ctypes.create_string_buffer(size.value)
        _check(_lib.kjit_render(self._handle, text, buffer, ctypes.byref(size)))
        return buffer.value.decode()


_default_engine = None


def default_engine():
    global _default_engine
    if _default_engine is None:
        _default_engine = Engine()
    return _default_engine


from .norm import rmsnorm, fused_add_rmsnorm, rmsnorm_fp8_quant, fused_add_rmsnorm_fp8_quant  # noqa: E402
from .sampling import (sampling_from_probs, top_k_sampling_from_probs, top_p_sampling_from_probs,  # noqa: E402
                       min_p_sampling_from_probs, top_k_top_p_sampling_from_probs, top_k_renorm_probs,
                       top_p_renorm_probs, top_k_mask_logits)
from .attention import BatchDecode, plan_prefill_work  # noqa: E402
