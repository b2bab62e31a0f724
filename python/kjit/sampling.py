"""FlashInfer-like sampling helpers over torch tensors (torch is needed only to allocate outputs).

Each takes probabilities [batch, vocab] (float32, float16 or bfloat16) and returns int32
token ids [batch]. Filter parameters are a Python number (one for every row) or a tensor
with one value per row. `seed` and `offset` pick the random numbers: the same pair gives
the same tokens; advance `offset` between steps.
"""
from . import default_engine


def _kernel_and_params(op, x, params, engine, **fields):
    """The kernel for a [batch, vocab] input, and its filter arguments: Python numbers as
    scalars, or (when any is a tensor) one int32 / float32 value per row each."""
    import torch
    if x.dim() != 2:
        raise ValueError(f"{op}: input must be 2-D [batch, vocab], got shape {tuple(x.shape)}")
    per_row = any(isinstance(v, torch.Tensor) for v in params.values())
    spec = {"op": op, "vocab_size": int(x.shape[1]), "dtype": str(x.dtype).replace("torch.", "")}
    if per_row:
        spec["per_row_params"] = True
    spec.update(fields)
    args = []
    for name, value in params.items():
        if per_row:
            dtype = torch.int32 if name == "top_k" else torch.float32
            value = value if isinstance(value, torch.Tensor) else torch.full((x.shape[0],), value, device=x.device)
            value = value.to(device=x.device, dtype=dtype).contiguous()
        args.append(value)
    return (engine or default_engine()).get(spec), args


def _sample(op, probs, params, seed, offset, engine, **fields):
    import torch
    kernel, args = _kernel_and_params(op, probs, params, engine, **fields)
    samples = torch.empty(probs.shape[0], dtype=torch.int32, device=probs.device)
    kernel(probs, samples, *args, probs.shape[0], seed, offset)
    return samples


def sampling_from_probs(probs, seed=0, offset=0, engine=None):
    return _sample("sampling_from_probs", probs, {}, seed, offset, engine)


def top_k_sampling_from_probs(probs, top_k, seed=0, offset=0, engine=None):
    return _sample("top_k_sampling_from_probs", probs, {"top_k": top_k}, seed, offset, engine)


def top_p_sampling_from_probs(probs, top_p, seed=0, offset=0, engine=None):
    return _sample("top_p_sampling_from_probs", probs, {"top_p": top_p}, seed, offset, engine)


def min_p_sampling_from_probs(probs, min_p, seed=0, offset=0, engine=None):
    return _sample("min_p_sampling_from_probs", probs, {"min_p": min_p}, seed, offset, engine)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, seed=0, offset=0, engine=None, filter_apply_order="top_k_first"):
    """filter_apply_order "top_k_first": top-p over the renormalized top-k tokens (FlashInfer's
    default); "joint": tokens inside both the top-k and the top-p set of the original distribution."""
    return _sample("top_k_top_p_sampling_from_probs", probs, {"top_k": top_k, "top_p": top_p}, seed, offset, engine,
                   filter_apply_order=filter_apply_order)


def _rewrite(op, x, params, engine):
    import torch
    kernel, args = _kernel_and_params(op, x, params, engine)
    out = torch.empty_like(x)
    kernel(x, out, *args, x.shape[0])
    return out


def top_k_renorm_probs(probs, top_k, engine=None):
    """Probabilities outside the top-k set zeroed, the rest renormalized (tie-inclusive set)."""
    return _rewrite("top_k_renorm_probs", probs, {"top_k": top_k}, engine)


def top_p_renorm_probs(probs, top_p, engine=None):
    """Probabilities outside the top-p set zeroed, the rest renormalized."""
    return _rewrite("top_p_renorm_probs", probs, {"top_p": top_p}, engine)


def top_k_mask_logits(logits, top_k, engine=None):
    """Logits outside the top-k set replaced by -inf."""
    return _rewrite("top_k_mask_logits", logits, {"top_k": top_k}, engine)
