"""Conformance of kjit against FlashInfer-Bench definitions.

    python -m kjit.conformance DIR [DIR ...] --out docs/conformance.md --plot docs/conformance.svg

For every definition file under DIR whose op type kjit supports: build the kjit kernel
from the definition itself, draw valid random inputs for several values of the variable
axes (the definition's constraints checked), run the definition's PyTorch `reference`
and kjit on the same inputs (kjit's outputs poisoned first), compare with dtype-aware
tolerances, time both with CUDA events, and write a Markdown report and a plot of the
speed-ups. Definitions of other op types are listed as unsupported.

The parts that need no GPU (finding definitions, choosing axes, shapes, constraints)
work without torch, so they are tested in CI.
"""
import argparse
import json
import math
import os
import pathlib
import re
import statistics
import sys

# ---------------------------------------------------------------- definitions (no torch)


def op_type(definition):
    return definition.get("op_type") or definition.get("type") or "?"


def load_definitions(*dirs):
    """(path, definition) for every *.json under the directories that looks like a definition."""
    found = []
    for d in dirs:
        for path in sorted(pathlib.Path(d).rglob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "axes" in data and "inputs" in data:
                found.append((path, data))
    return found


def const_axes(definition):
    return {k: v["value"] for k, v in definition["axes"].items() if v.get("type") == "const"}


def var_axes(definition):
    return [k for k, v in definition["axes"].items() if v.get("type") == "var"]


def resolve_shape(shape, axes):
    if shape is None:
        return ()
    return tuple(axes[a] if isinstance(a, str) else int(a) for a in shape)


def tensor_plan(definition, axes):
    """name -> (shape, dtype) for every input and output, given a value for every axis."""
    plan = {}
    for group in ("inputs", "outputs"):
        for name, t in definition.get(group, {}).items():
            plan[name] = (resolve_shape(t.get("shape"), axes), t["dtype"])
    return plan


def check_constraints(definition, env):
    """Evaluates each constraint in env; returns the ones that are false. A constraint that
    names something env lacks (a tensor, before inputs exist) is skipped."""
    failed = []
    for c in definition.get("constraints", []):
        try:
            if not eval(c, {"__builtins__": {}}, dict(env)):  # noqa: S307 - definition files are trusted data
                failed.append(c)
        except NameError:
            continue
    return failed


def batch_axis_choices(definition, batch_sizes):
    """The const axes with each batch size: the axis choices of batch-major op types."""
    return [dict(const_axes(definition), batch_size=b) for b in batch_sizes]


class RmsNormAdapter:
    """op type "rmsnorm": hidden_states [batch, hidden] (+ residual), weight [hidden] -> output."""

    batch_sizes = (1, 7, 128, 4097)

    def axis_choices(self, definition):
        return batch_axis_choices(definition, self.batch_sizes)

    def eps(self, definition):
        m = re.search(r"\beps\s*=\s*([0-9.eE+-]+)", definition.get("reference", ""))
        return float(m.group(1)) if m else 1e-6

    def make_inputs(self, definition, axes, torch, device):
        plan = tensor_plan(definition, axes)
        inputs = {}
        for name in definition["inputs"]:
            shape, dtype = plan[name]
            dt = getattr(torch, dtype)
            if name == "weight":
                inputs[name] = (torch.rand(shape, device=device) * 4 - 2).to(dt)
            else:
                inputs[name] = torch.randn(shape, device=device).to(dt)
        return inputs

    def run_kjit(self, definition, kernel, inputs, outputs, keep_inputs=True):
        x = inputs["hidden_states"]
        eps = self.eps(definition)
        out = outputs["output"]
        if "residual" in inputs:
            # The kernel updates the residual in place; timing runs may let it.
            residual = inputs["residual"].clone() if keep_inputs else inputs["residual"]
            kernel(x, residual, inputs["weight"], out, x.shape[0], eps)
        else:
            kernel(x, inputs["weight"], out, x.shape[0], eps)
        return {"output": out}


class GqaPagedDecodeAdapter:
    """op type "gqa", paged decode (no qo_indptr): q [batch, heads, dim], k_cache/v_cache
    [pages, page_size, kv_heads, dim], kv_indptr, kv_indices, last_page_len, sm_scale ->
    output, lse (base 2). Requests get random lengths, some empty; pages are shuffled."""

    batch_sizes = (1, 7, 64)

    def supports(self, definition):
        return "qo_indptr" not in definition["inputs"] and "kv_indices" in definition["inputs"]

    def build(self, engine, definition):
        import kjit
        return kjit.BatchDecode(definition, engine)

    def axis_choices(self, definition):
        return batch_axis_choices(definition, self.batch_sizes)

    def make_inputs(self, definition, axes, torch, device):
        b, ps = axes["batch_size"], axes["page_size"]
        lengths = torch.randint(1, 700, (b,))
        lengths[1::5] = 0  # empty requests
        pages = (lengths + ps - 1) // ps
        indptr = torch.zeros(b + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(pages, 0)
        total = int(indptr[-1])
        axes.update(num_pages=total + 3, len_indptr=b + 1, num_kv_indices=total)
        plan = tensor_plan(definition, axes)
        inputs = {}
        for name, (shape, dtype) in plan.items():
            if name not in definition["inputs"]:
                continue
            if name in ("q", "k_cache", "v_cache"):
                inputs[name] = torch.randn(shape, device=device).to(getattr(torch, dtype))
        inputs["kv_indptr"] = indptr.to(device)
        inputs["kv_indices"] = torch.randperm(total + 3, dtype=torch.int32)[:total].to(device)
        last = torch.where(pages > 0, lengths - (pages - 1) * ps, torch.ones_like(lengths))
        inputs["last_page_len"] = last.to(torch.int32).to(device)
        self._sm_scale = 1.0 / math.sqrt(axes["head_dim"])  # a host float: reading the tensor back would sync
        inputs["sm_scale"] = torch.tensor(self._sm_scale, dtype=torch.float32, device=device)
        self._planned = None
        return inputs

    def reference_inputs(self, definition, inputs):
        return reference_arguments(definition, inputs)

    def run_kjit(self, definition, kernel, inputs, outputs, keep_inputs=True):
        if self._planned is not inputs["kv_indptr"]:  # plan once per batch, as a server would
            kernel.plan(inputs["kv_indptr"], inputs["last_page_len"])
            self._planned = inputs["kv_indptr"]
        kernel.run(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["kv_indptr"], inputs["kv_indices"],
                   inputs["last_page_len"], self._sm_scale, out=outputs["output"], lse=outputs["lse"])
        return {"output": outputs["output"], "lse": outputs["lse"]}


def reference_arguments(definition, inputs):
    """The inputs the reference's run() takes (kjit may need more, e.g. kv_last_page_len)."""
    import inspect
    wanted = inspect.signature(load_reference(definition)).parameters
    return {k: v for k, v in inputs.items() if k in wanted}


class GqaPrefillAdapter:
    """op type "gqa" with qo_indptr: ragged prefill (k, v [total_kv, kv_heads, dim] by kv_indptr)
    or paged prefill (k_cache, v_cache [pages, page_size, kv_heads, dim], kv_indptr over
    kv_indices), causal when the name says so, sm_scale -> output, lse (base 2). Each case is a
    list of (query tokens, KV tokens) per request: a single prompt, append-like requests with
    more keys than queries, an empty request, more queries than keys. Kept small: the
    reference loops over every query and head in Python."""

    cases = (((37, 37),), ((1, 100), (16, 16), (40, 200)), ((5, 5), (0, 9), (64, 64), (3, 130), (20, 19)))

    def supports(self, definition):
        return "qo_indptr" in definition["inputs"]

    def axis_choices(self, definition):
        choices = []
        for lengths in self.cases:
            axes = dict(const_axes(definition), len_indptr=len(lengths) + 1, total_q=sum(q for q, _ in lengths))
            axes["kv_tokens"] = tuple(kv for _, kv in lengths)  # not an axis: read by make_inputs
            axes["qo_tokens"] = tuple(q for q, _ in lengths)
            choices.append(axes)
        return choices

    def make_inputs(self, definition, axes, torch, device):
        paged = "k_cache" in definition["inputs"]
        qo, kv = axes["qo_tokens"], axes["kv_tokens"]
        qo_indptr = torch.tensor([0] + list(qo), dtype=torch.int32).cumsum(0).to(torch.int32)
        inputs = {"qo_indptr": qo_indptr.to(device)}
        if paged:
            ps = axes["page_size"]
            pages = torch.tensor([(n + ps - 1) // ps for n in kv])
            kv_indptr = torch.zeros(len(kv) + 1, dtype=torch.int32)
            kv_indptr[1:] = torch.cumsum(pages, 0)
            total = int(kv_indptr[-1])
            axes.update(num_kv_indices=total, num_pages=total + 3)
            inputs["kv_indptr"] = kv_indptr.to(device)
            inputs["kv_indices"] = torch.randperm(total + 3, dtype=torch.int32)[:total].to(device)
            last = [n - (p - 1) * ps if p > 0 else 1 for n, p in zip(kv, pages.tolist())]
            self._last_page_len = torch.tensor(last, dtype=torch.int32, device=device)
        else:
            axes["total_kv"] = sum(kv)
            inputs["kv_indptr"] = torch.tensor([0] + list(kv), dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        plan = tensor_plan(definition, axes)
        for name in ("q", "k", "v", "k_cache", "v_cache"):
            if name in definition["inputs"]:
                shape, dtype = plan[name]
                inputs[name] = torch.randn(shape, device=device).to(getattr(torch, dtype))
        self._sm_scale = 1.0 / math.sqrt(axes["head_dim"])
        inputs["sm_scale"] = torch.tensor(self._sm_scale, dtype=torch.float32, device=device)
        self._max_qo = max(qo)
        return inputs

    def reference_inputs(self, definition, inputs):
        return reference_arguments(definition, inputs)

    def run_kjit(self, definition, kernel, inputs, outputs, keep_inputs=True):
        batch = inputs["qo_indptr"].numel() - 1
        if "k_cache" in inputs:
            kernel(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["qo_indptr"], inputs["kv_indptr"],
                   inputs["kv_indices"], self._last_page_len, outputs["output"], outputs["lse"], batch, self._max_qo,
                   self._sm_scale)
        else:
            kernel(inputs["q"], inputs["k"], inputs["v"], inputs["qo_indptr"], inputs["kv_indptr"], outputs["output"],
                   outputs["lse"], batch, self._max_qo, self._sm_scale)
        return {"output": outputs["output"], "lse": outputs["lse"]}


class GqaAdapter:
    """op type "gqa": decode or prefill, by the definition's inputs."""

    def __init__(self):
        self.parts = (GqaPrefillAdapter(), GqaPagedDecodeAdapter())

    def for_definition(self, definition):
        return next((a for a in self.parts if a.supports(definition)), None)


ADAPTERS = {"rmsnorm": RmsNormAdapter(), "gqa": GqaAdapter()}


def adapter_for(definition):
    adapter = ADAPTERS.get(op_type(definition))
    if hasattr(adapter, "for_definition"):
        adapter = adapter.for_definition(definition)
    if adapter is None or not getattr(adapter, "supports", lambda d: True)(definition):
        return None
    return adapter

# ------------------------------------------------------------------ running (torch, GPU)

TOLERANCES = {  # relative L2 bound, elementwise rtol, atol
    "bfloat16": (1e-2, 2 ** -6, 1e-2),
    "float16": (2e-3, 2 ** -9, 1e-3),
    "float32": (1e-5, 1e-5, 1e-6),
}


def compare(torch, got, ref):
    if ref.dtype in (torch.int32, torch.int64, torch.uint8, torch.int8):
        equal = bool(torch.equal(got, ref))
        return {"rel_l2": 0.0 if equal else 1.0, "max_abs": float((got.long() - ref.long()).abs().max()) if ref.numel() else 0.0,
                "ok": equal}
    g, r = got.double(), ref.double()
    if r.numel() == 0:
        return {"rel_l2": 0.0, "max_abs": 0.0, "ok": True}
    rel_bound, rtol, atol = TOLERANCES.get(str(ref.dtype).replace("torch.", ""), TOLERANCES["float32"])
    same = g == r  # equal infinities (an empty request's lse) count as exact
    finite = bool((torch.isfinite(g) | same).all())
    g, r = torch.where(same, 0.0, g), torch.where(same, 0.0, r)
    err = (g - r)
    rel_l2 = float(err.norm() / r.norm().clamp_min(1e-300))
    max_abs = float(err.abs().max())
    within = bool((err.abs() <= atol + rtol * r.abs()).all())
    return {"rel_l2": rel_l2, "max_abs": max_abs, "ok": finite and within and rel_l2 <= rel_bound}


def cuda_time_us(torch, fn, iters=30, warm=3, graph=True):
    """GPU time of fn: captured in a CUDA graph and replayed, so that neither side's Python
    overhead is counted; fn run directly where it cannot be captured (graph=False: known not
    to be capturable; a failed capture can leave torch's RNG unusable). Returns (us, graphed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run, graphed = fn, False
    try:
        if not graph:
            raise RuntimeError("not capturable")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, graphed = graph.replay, True
    except Exception:  # .item() in a reference, say
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times), graphed


def python_call_overhead_us(torch, engine, calls=2000):
    """Host time of one kernel call from Python (binding + DLPack + launch), tiny kernel."""
    import time
    k = engine.get({"op": "rmsnorm", "hidden_size": 128, "dtype": "bfloat16"})
    x = torch.randn(1, 128, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(128, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(100):
        k(x, w, y, 1, 1e-6)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        k(x, w, y, 1, 1e-6)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def load_reference(definition):
    namespace = {}
    exec(compile(definition["reference"], definition.get("name", "reference"), "exec"), namespace)  # noqa: S102
    return namespace["run"]


def poisoned_outputs(torch, definition, axes, device):
    out = {}
    for name, (shape, dtype) in tensor_plan(definition, axes).items():
        if name in definition.get("outputs", {}):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            t.fill_(float("nan") if t.is_floating_point() else -1)
            out[name] = t
    return out


def run_definition(path, definition, engine, torch):
    adapter = adapter_for(definition)
    kernel = adapter.build(engine, definition) if hasattr(adapter, "build") else engine.get(definition)
    reference = load_reference(definition)
    rows = []
    for axes in adapter.axis_choices(definition):
        torch.manual_seed(hash((definition["name"], tuple(sorted(axes.items())))) & 0xFFFFFFFF)
        shown = {k: v for k, v in axes.items() if k in var_axes(definition)}  # before inputs add derived axes
        inputs = adapter.make_inputs(definition, axes, torch, "cuda")
        env = dict(axes, **inputs)
        failed = check_constraints(definition, env)
        if failed:
            raise AssertionError(f"{path}: generated inputs break constraints {failed}")
        outputs = poisoned_outputs(torch, definition, axes, "cuda")
        got = adapter.run_kjit(definition, kernel, inputs, outputs)
        torch.cuda.synchronize()
        ref_inputs = adapter.reference_inputs(definition, inputs) if hasattr(adapter, "reference_inputs") else inputs
        ref = reference(**ref_inputs)
        if not isinstance(ref, dict):
            ref = dict(zip(definition["outputs"], ref if isinstance(ref, (tuple, list)) else (ref,)))
        results = {name: compare(torch, got[name], ref[name]) for name in got}
        syncs = re.search(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)", definition.get("reference", "")) is not None
        ref_us, ref_graphed = cuda_time_us(torch, lambda: reference(**ref_inputs), graph=not syncs)
        kjit_us, _ = cuda_time_us(torch, lambda: adapter.run_kjit(definition, kernel, inputs, outputs, keep_inputs=False))
        rows.append({
            "definition": definition["name"],
            "axes": shown,
            "max_abs": max(r["max_abs"] for r in results.values()),
            "rel_l2": max(r["rel_l2"] for r in results.values()),
            "ok": all(r["ok"] for r in results.values()),
            "reference_us": ref_us,
            "kjit_us": kjit_us,
            "reference_graphed": ref_graphed,
        })
    return rows


def write_report(rows, unsupported, out_path, plot_path, device_name, command, overhead_us=None):
    lines = [
        "# Conformance against FlashInfer-Bench definitions",
        "",
        f"Device: {device_name}. Produced by `{command}`.",
        "",
        "Each definition is built by kjit from the definition file itself and run on fresh random inputs for",
        "several values of its variable axes; outputs are poisoned (NaN) before the kjit run and compared with",
        "the definition's PyTorch `reference` (relative L2 error and an elementwise |kjit - ref| <= atol + rtol|ref|",
        "bound per dtype: bf16 1e-2 / 2^-6 / 1e-2, fp16 2e-3 / 2^-9 / 1e-3). Times are GPU times: each side is",
        "captured in a CUDA graph and its replays timed with CUDA events (median of 30), so Python overhead is",
        "not counted; a reference that cannot be captured is timed directly and marked *eager*.",
        "",
    ]
    if overhead_us is not None:
        lines += [f"One kjit call from Python (binding, DLPack export of each tensor, launch) costs {overhead_us:.1f} µs "
                  "of host time (tiny kernel, 2000 calls).", ""]
    lines += [
        "| definition | axes | max abs err | rel L2 err | result | reference µs | kjit µs | speed-up |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        axes = ", ".join(f"{k}={v}" for k, v in r["axes"].items())
        lines.append(f"| {r['definition']} | {axes} | {r['max_abs']:.3g} | {r['rel_l2']:.2e} | "
                     f"{'pass' if r['ok'] else '**FAIL**'} | {r['reference_us']:.1f}"
                     f"{'' if r.get('reference_graphed', True) else ' *eager*'} | {r['kjit_us']:.1f} | "
                     f"{r['reference_us'] / r['kjit_us']:.1f}× |")
    passed = sum(r["ok"] for r in rows)
    lines += ["", f"{passed} of {len(rows)} runs pass over {len({r['definition'] for r in rows})} definitions.", ""]
    if unsupported:
        lines += ["## Not run (kjit or the runner does not cover this op type yet)", "",
                  "| definition | op type | file |", "| --- | --- | --- |"]
        lines += [f"| {d.get('name', '?')} | {op_type(d)} | {p} |" for p, d in unsupported]
        lines.append("")
    if plot_path:
        lines += [f"![speed-ups]({os.path.relpath(plot_path, os.path.dirname(out_path) or '.')})", ""]
    pathlib.Path(out_path).write_text("\n".join(lines))
    if plot_path and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [f"{r['definition']}\n" + ",".join(f"{v}" for v in r["axes"].values()) for r in rows]
        speedups = [r["reference_us"] / r["kjit_us"] for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4.5))
        ax.bar(range(len(rows)), speedups, color=["tab:green" if r["ok"] else "tab:red" for r in rows])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up over the PyTorch reference")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_title(f"kjit vs FlashInfer-Bench references ({device_name})")
        fig.tight_layout()
        fig.savefig(plot_path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kjit.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="directories of definition files (searched recursively)")
    parser.add_argument("--out", default="conformance.md", help="Markdown report to write")
    parser.add_argument("--plot", default=None, help="speed-up plot to write (.svg or .png)")
    args = parser.parse_args(argv)

    import torch
    import kjit
    if not torch.cuda.is_available():
        print("conformance needs a CUDA GPU", file=sys.stderr)
        return 1
    engine = kjit.Engine()
    supported, unsupported = [], []
    for path, d in load_definitions(*args.dirs):
        (supported if adapter_for(d) else unsupported).append((path, d))
    rows, failures = [], []
    for path, d in supported:
        try:
            rows += run_definition(path, d, engine, torch)
        except Exception as e:  # a broken kernel must show in the report, not stop it
            failures.append(f"{path}: {type(e).__name__}: {e}")
            rows.append({"definition": d.get("name", str(path)), "axes": {}, "max_abs": math.nan, "rel_l2": math.nan,
                         "ok": False, "reference_us": math.nan, "kjit_us": math.nan})
    command = "python -m kjit.conformance " + " ".join(args.dirs) + f" --out {args.out}" + (
        f" --plot {args.plot}" if args.plot else "")
    overhead = python_call_overhead_us(torch, engine)
    write_report(rows, unsupported, args.out, args.plot, torch.cuda.get_device_name(), command, overhead)
    print(f"python call overhead {overhead:.1f} us")
    for r in rows:
        axes = ",".join(f"{k}={v}" for k, v in r["axes"].items())
        print(f"{'pass' if r['ok'] else 'FAIL'}  {r['definition']:<32} {axes:<18} max_abs {r['max_abs']:.3g}  "
              f"ref {r['reference_us']:.1f} us  kjit {r['kjit_us']:.1f} us")
    for p, d in unsupported:
        print(f"unsupported  {d.get('name', '?')} (op type {op_type(d)})")
    for f in failures:
        print("error", f)
    passed = sum(r["ok"] for r in rows)
    print(f"{passed} passed, {len(rows) - passed} failed")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
