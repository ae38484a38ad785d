"""Where one decode step's time goes (`qsparse bench --profile`): torch.profiler over eager decode steps, each
GPU kernel mapped to a kind, each kind beside its bytes floor (the bytes it must read / the streaming ceiling).

Kernels are told apart by substrings of their function name (not the full demangled signature), so renamed or
new kernels still land in the right kind where the name says what they do; anything unrecognised is listed
as "other" with its name, as is every kernel outside our namespace (torch's own, e.g. the top-K mask of the
head input, which would otherwise match "select"/"topk"-like names). The ternary projections are named by
launch order within a layer: the decoder calls ternary_linear for qkv, o, gate_up and down in that order
(gpu_model._layers), one projection kernel each. Eager steps are slower than graph replays by launch gaps, which are not in these kernel times.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from typing import Any

import torch

from ..model.config import SparsityConfig

PROJECTIONS = ("qkv", "o", "gate_up", "down")
# (kind, substrings of the kernel's function name), first match wins: specific names before generic ones.
KIND_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lm_head", ("lm_head", "head_int8")),
    ("sampling", ("sample",)),
    ("embedding", ("embedding",)),
    ("rope/append", ("rope",)),
    ("attention", ("attention", "attn", "flash", "split_kv", "decode_combine")),
    ("selection", ("select", "topk_quant", "quantize")),
    ("projection", ("gemv", "gemm", "ternary")),
    ("norm", ("rmsnorm", "norm")),
)
ORDER = ("embedding", "selection", *(f"proj.{p}" for p in PROJECTIONS), "projection", "rope/append", "attention",
         "norm", "lm_head", "sampling", "other")


def base_name(kernel: str) -> str:
    """'void ns::(anonymous namespace)::gemv_t1_kernel<256, 16>(ns::T1Args)' -> 'gemv_t1_kernel'."""
    name = kernel.replace("(anonymous namespace)", "anon")
    name = name.split("(", 1)[0] if not name.startswith("(") else name
    depth, out = 0, []
    for ch in name:  # drop template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    name = "".join(out).strip()
    name = name.rsplit("::", 1)[-1]
    return re.sub(r"^(void|__global__)\s+", "", name).strip() or kernel


def kernel_kind(kernel: str) -> str:
    """The kind of one of our kernels (namespace qsparse); every other kernel (torch's, cuBLAS's) is "other"."""
    if "qsparse" not in kernel:
        return "other"
    base = base_name(kernel).lower()
    for kind, needles in KIND_PATTERNS:
        if any(n in base for n in needles):
            return kind
    return "other"


def _trace_kernels(prof) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every GPU kernel / memcpy / memset in the trace, in launch order."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = [(float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", "?"))) for e in events
           if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(out)


def step_floors(model: Any, context: int) -> dict[str, int]:
    """Bytes each kind must move per decode step (reads; writes where they are the point)."""
    cfg, L = model.cfg, model.cfg.num_layers
    f32 = 4
    out: dict[str, int] = {}
    for g, k in (("qkv", model.k_attn), ("o", model.k_o), ("gate_up", model.k_mlp), ("down", model.k_down)):
        out[f"proj.{g}"] = sum(k * getattr(layer, g).packed.shape[1] for layer in model.layers)
    out["projection"] = sum(out[f"proj.{g}"] for g in PROJECTIONS)
    out["selection"] = L * f32 * (2 * cfg.hidden_size + cfg.q_size + cfg.intermediate_size)  # each input once
    kv_elt = model.k_cache.element_size()
    out["attention"] = 2 * L * cfg.num_kv_heads * cfg.head_dim * context * kv_elt
    out["rope/append"] = L * f32 * 2 * (cfg.q_size + 2 * cfg.kv_size)
    out["norm"] = 0 if model.k_head == cfg.hidden_size else f32 * 2 * cfg.hidden_size
    out["lm_head"] = model.head_bytes
    out["sampling"] = cfg.vocab_size * (f32 + 1)  # logits + the seen mask
    out["embedding"] = cfg.hidden_size * model.embed.element_size()
    return out


@torch.no_grad()
def profile_decode(ef: Any, sparsity: SparsityConfig, prompt: torch.Tensor, streaming_gbps: float,
                   kv_dtype: torch.dtype = torch.bfloat16, steps: int = 5, warmup: int = 3) -> dict[str, Any]:
    """Profile `steps` eager decode steps after a prefill of `prompt`; returns the per-kind table (JSON-able)."""
    from torch.profiler import ProfilerActivity, profile

    from ..generate.sampling import SamplingSettings
    from ..gpu.model import GpuModel
    from ..kernels._ext import ext

    p = prompt.numel()
    model = GpuModel(ef, sparsity, max_len=p + warmup + steps + 1, kv_dtype=kv_dtype, use_graph=False)
    model.prefill(prompt, SamplingSettings(temperature=0.0))
    # Without programmatic dependent launch while profiling: with it a kernel starts early and waits for its
    # predecessor inside griddepcontrol.wait, and the profiler would count that wait as the kernel's time.
    pdl_before = ext().get_pdl()
    ext().set_pdl(False)
    try:
        for _ in range(warmup):
            model._run_step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model._run_step()
            torch.cuda.synchronize()
    finally:
        ext().set_pdl(pdl_before)
    kernels = _trace_kernels(prof)
    context = p + warmup + (steps + 1) // 2
    result = summarize(kernels, steps, model.cfg.num_layers, step_floors(model, context), streaming_gbps)
    result.update(context=context, sparsity=sparsity.to_dict(),
                  lm_head="int8" if model.head_q8 is not None else "bf16")
    del model
    torch.cuda.empty_cache()
    return result


def summarize(kernels: list[tuple[float, float, str]], steps: int, num_layers: int, floors: dict[str, int],
              streaming_gbps: float) -> dict[str, Any]:
    """Per-kind time and launch count per step, bytes floor, and the unrecognised kernels by name."""
    us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    names: dict[str, set[str]] = defaultdict(set)
    other: dict[str, float] = defaultdict(float)
    projections = [k for k in kernels if kernel_kind(k[2]) == "projection"]
    by_order = len(projections) == steps * num_layers * len(PROJECTIONS)
    pi = 0
    for _, dur, name in kernels:
        kind = kernel_kind(name)
        if kind == "projection" and by_order:
            kind = f"proj.{PROJECTIONS[pi % len(PROJECTIONS)]}"
            pi += 1
        us[kind] += dur
        calls[kind] += 1
        names[kind].add(base_name(name))
        if kind == "other":
            other[name] += dur / steps
    rows = []
    for kind in sorted(us, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
        nbytes = floors.get(kind)
        if kind == "projection" and not by_order:
            nbytes = floors.get("projection")
        t = us[kind] / steps
        floor_us = None if nbytes is None else nbytes / (streaming_gbps * 1e3)
        rows.append({"kind": kind, "us_per_step": t, "calls_per_step": calls[kind] / steps, "bytes": nbytes,
                     "floor_us": floor_us, "over_floor": None if not floor_us else t / floor_us,
                     "kernels": sorted(names[kind])})
    total = sum(r["us_per_step"] for r in rows)
    floor_total = sum(floors[k] for k in floors if k not in ("projection",)) / (streaming_gbps * 1e3)
    return {"steps": steps, "streaming_gbps": streaming_gbps, "kernel_us_per_step": total,
            "floor_us_per_step": floor_total, "projections_named_by_order": by_order, "rows": rows,
            "other_kernels_us_per_step": dict(sorted(other.items(), key=lambda kv: -kv[1]))}


def table(prof: dict[str, Any]) -> str:
    """Markdown table of one profile."""
    lines = [f"Eager decode step, {prof.get('lm_head', 'bf16')} head, context {prof.get('context', '?')}: kernel "
             f"time {prof['kernel_us_per_step']:.0f} us per step, bytes floor {prof['floor_us_per_step']:.0f} us "
             f"at {prof['streaming_gbps']:.0f} GB/s.", "",
             "| kind | us/step | calls/step | MB/step | floor us | x floor | kernels |",
             "|---|---|---|---|---|---|---|"]
    for r in prof["rows"]:
        mb = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        fl = "-" if r["floor_us"] is None else f"{r['floor_us']:.1f}"
        x = "-" if not r["over_floor"] else f"{r['over_floor']:.1f}"
        lines.append(f"| {r['kind']} | {r['us_per_step']:.1f} | {r['calls_per_step']:g} | {mb} | {fl} | {x} | "
                     f"{', '.join(r['kernels'])[:80]} |")
    if prof["other_kernels_us_per_step"]:
        lines += ["", "other kernels: " + "; ".join(f"{n[:70]} {t:.1f} us"
                                                   for n, t in prof["other_kernels_us_per_step"].items())]
    if not prof["projections_named_by_order"]:
        lines += ["", "(projection launches were not 4 per layer per step: not named qkv/o/gate_up/down)"]
    return "\n".join(lines)
