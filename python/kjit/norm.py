"""FlashInfer-like normalization helpers over torch tensors (torch is needed only to allocate outputs)."""
from . import default_engine


def _dtype_name(t):
    name = str(t.dtype).replace("torch.", "")
    if name not in ("bfloat16", "float16"):
        raise TypeError(f"kjit normalization supports float16 and bfloat16 tensors, got {name}")
    return name


def _kernel(op, x, engine):
    if x.dim() != 2:
        raise ValueError(f"{op}: input must be 2-D [rows, hidden], got shape {tuple(x.shape)}")
    return (engine or default_engine()).get({"op": op, "hidden_size": int(x.shape[1]), "dtype": _dtype_name(x)})


def rmsnorm(input, weight, eps=1e-6, out=None, engine=None):
    """out = input * rsqrt(mean(input^2) + eps) * weight, row by row."""
    if out is None:
        out = input.new_empty(input.shape)
    _kernel("rmsnorm", input, engine)(input, weight, out, input.shape[0], eps)
    return out


def fused_add_rmsnorm(input, residual, weight, eps=1e-6, engine=None):
    """In place, as FlashInfer: residual += input; input = rmsnorm(residual) * weight."""
    _kernel("fused_add_rmsnorm", input, engine)(input, residual, weight, input, input.shape[0], eps)


def _fp8_outputs(input, out, scale):
    import torch
    if out is None:
        out = torch.empty(input.shape, dtype=torch.float8_e4m3fn, device=input.device)
    if scale is None:
        scale = torch.empty(input.shape[0], dtype=torch.float32, device=input.device)
    # DLPack producers may not export float8: the kernel takes the bytes as uint8.
    return out, out.view(torch.uint8), scale


def rmsnorm_fp8_quant(input, weight, eps=1e-6, out=None, scale=None, engine=None):
    """Returns (e4m3 output, per-row float32 scale): scale = max(max|y| / 448, 1/(448*512)), q = y / scale."""
    out, out_bytes, scale = _fp8_outputs(input, out, scale)
    _kernel("rmsnorm_fp8_quant", input, engine)(input, weight, out_bytes, scale, input.shape[0], eps)
    return out, scale


def fused_add_rmsnorm_fp8_quant(input, residual, weight, eps=1e-6, out=None, scale=None, engine=None):
    """residual += input (in place); returns (e4m3 rmsnorm(residual) * weight, per-row scale)."""
    out, out_bytes, scale = _fp8_outputs(input, out, scale)
    _kernel("fused_add_rmsnorm_fp8_quant", input, engine)(input, residual, weight, out_bytes, scale, input.shape[0], eps)
    return out, scale
