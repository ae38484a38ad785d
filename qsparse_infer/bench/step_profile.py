"""Inside the persistent decode step (issue 16; gpu/persistent.py): its per-(op, CTA) globaltimer stamps of
one step, turned into a per-op table beside each op's bytes and their floor, and a timeline (SMs on y, time
on x, ops coloured). `qsparse bench --profile --decode-kernel persistent|both` and bench/persistent_profile.py
use it.

Per op (medians over layers): "critical" = its end minus the previous op's end, i.e. its share of the step's
chain; "span" = first tile start (before its wait) to last tile end; then the phases of each CTA's first tile
(medians over CTAs): wait (for the input; with prefetch on, the rows' L2 prefetch is issued before it),
select (x load, RMSNorm, absmax, top-K, compaction), product (row loads and dp4a issued), tail (column sums, L2 reductions,
arrival, and for the last tile of a column block the read-back, epilogue and signal); attention: wait, body.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from ..gpu.persistent import OP_NAMES
COLORS = {"qkv": "tab:blue", "attention": "tab:orange", "o": "tab:green", "gate_up": "tab:red", "down": "tab:purple"}
# prof columns (csrc/decode/step_api.cuh, StepLaunch::prof)
START, RAN, END, SM, WAIT_DONE, SEL_DONE, PROD_DONE, FIRST_END = range(8)


def analyze(prof: torch.Tensor, ops: Sequence[tuple[int, str]], op_bytes: Sequence[int], gbps: float) -> dict[str, Any]:
    """prof int64 [nops, grid, 8] of one step; ops (layer, name) per op; op_bytes: bytes each op must read."""
    prof = prof.cpu().to(torch.int64)
    act = prof[:, :, RAN] > 0
    if not bool(act.any(dim=1).all()):
        raise ValueError("every op must have run at least one tile")
    t_begin = int(prof[:, :, START][act].min())
    rows, prev_end = [], t_begin
    for j, (layer, name) in enumerate(ops):
        a = act[j]
        p = prof[j][a].double()
        start, end = int(p[:, START].min()), int(p[:, END].max())
        if name == "attention":
            phases = {"wait_us": p[:, WAIT_DONE] - p[:, START], "body_us": p[:, FIRST_END] - p[:, WAIT_DONE]}
        else:
            phases = {"wait_us": p[:, WAIT_DONE] - p[:, START], "select_us": p[:, SEL_DONE] - p[:, WAIT_DONE],
                      "product_us": p[:, PROD_DONE] - p[:, SEL_DONE], "tail_us": p[:, FIRST_END] - p[:, PROD_DONE]}
        b = int(op_bytes[j])
        rows.append({"layer": layer, "op": name, "start_us": (start - t_begin) / 1e3, "end_us": (end - t_begin) / 1e3,
                     "span_us": (end - start) / 1e3, "critical_us": (end - prev_end) / 1e3, "ctas": int(a.sum()),
                     "bytes": b, "bytes_floor_us": b / (gbps * 1e9) * 1e6,
                     **{k: float(v.median()) / 1e3 for k, v in phases.items()}})
        prev_end = end
    per_op = {}
    for name in OP_NAMES:
        rs = [r for r in rows if r["op"] == name]
        if not rs:
            continue
        keys = ["critical_us", "span_us", "bytes", "bytes_floor_us", "ctas", "wait_us"]
        keys += ["body_us"] if name == "attention" else ["select_us", "product_us", "tail_us"]
        per_op[name] = {k: statistics.median(r[k] for r in rs) for k in keys}
    timeline = [(int(prof[j, c, SM]), (int(prof[j, c, START]) - t_begin) / 1e3,
                 (int(prof[j, c, END]) - int(prof[j, c, START])) / 1e3, ops[j][1])
                for j in range(len(ops)) for c in range(prof.shape[1]) if act[j, c]]
    layers_us = (int(prof[:, :, END][act].max()) - t_begin) / 1e3
    return {"layers_us": layers_us, "per_op": per_op, "ops": rows, "timeline": timeline, "grid": int(prof.shape[1])}


def op_bytes(model: Any, layer: int, name: str) -> int:
    """Bytes op `name` of `layer` must read in a step at model.length (rows at its top-K, or the K/V so far)."""
    if name == "attention":
        cfg = model.cfg
        return 2 * cfg.num_kv_heads * (model.length + 1) * cfg.head_dim * model.k_cache.element_size()
    k = {"qkv": model.topk.attn, "o": model.topk.o, "gate_up": model.topk.mlp, "down": model.topk.down}[name]
    return k * int(getattr(model.layers[layer], name).packed.shape[1])


def profile_persistent(ef: Any, sparsity: Any, prompt: torch.Tensor, gbps: float, kv_dtype: torch.dtype,
                       prefetch: bool = False, steps: int = 3) -> dict[str, Any]:
    """Decode a few steps, then profile `steps` eager persistent steps; the last one's stamps are analysed,
    the layers' time of all of them is kept (medians)."""
    from ..generate.sampling import SamplingSettings
    from ..gpu.model import GpuModel
    from ..gpu.persistent import PersistentStep
    from ..kernels import decode as dk

    m = GpuModel(ef, sparsity, max_len=prompt.numel() + 64, kv_dtype=kv_dtype, decode_kernel="persistent",
                 use_graph=False)
    if prefetch:
        m.persistent = PersistentStep(m, prefetch=True)
    m.prefill(prompt, SamplingSettings(temperature=0.0))
    for _ in range(4):
        m.step()
    ops = [(o.layer, o.name) for o in m.persistent.ops]
    nbytes = [op_bytes(m, layer, name) for layer, name in ops]
    runs = []
    for _ in range(steps):  # the same position each time: the step is not committed (no sampling)
        dk.embedding(m.embed, m.token, out=m.h)
        m.persistent.run(profile=True)
        torch.cuda.synchronize()
        runs.append(analyze(m.persistent.prof, ops, nbytes, gbps))
    out = runs[-1]
    out["layers_us_all"] = [r["layers_us"] for r in runs]
    out["layers_us_median"] = statistics.median(out["layers_us_all"])
    out["context"] = m.length + 1
    out["prefetch"] = prefetch
    del m
    torch.cuda.empty_cache()
    return out


def markdown_lines(key: str, r: dict[str, Any]) -> list[str]:
    lines = [f"### {key}: layers {r['layers_us_median']:.1f} us per step (median of {len(r['layers_us_all'])}; "
             f"grid {r['grid']}, context {r['context']}, L2 prefetch {'on' if r['prefetch'] else 'off'})", "",
             "| op | critical us | span us | CTAs | bytes | bytes floor us | wait | select | product | tail |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in r["per_op"].items():
        ph = (f"{t['wait_us']:.2f} | {t['body_us']:.2f} (body) | |" if name == "attention" else
              f"{t['wait_us']:.2f} | {t['select_us']:.2f} | {t['product_us']:.2f} | {t['tail_us']:.2f}")
        lines.append(f"| {name} | {t['critical_us']:.2f} | {t['span_us']:.2f} | {t['ctas']:.0f} | "
                     f"{t['bytes'] / 1e6:.2f} MB | {t['bytes_floor_us']:.2f} | {ph} |")
    return lines + [""]


def plot_timelines(runs: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """One row per run: the whole step (left) and its first two layers (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(runs), 2, figsize=(18, 4.5 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, (key, r) in zip(axes, runs.items()):
        zoom_end = max(o["end_us"] for o in r["ops"] if o["layer"] <= 1)
        for ax, zoom in zip(row, (False, True)):
            for sm, t0, dur, name in r["timeline"]:
                if not zoom or t0 <= zoom_end:
                    ax.broken_barh([(t0, max(dur, 0.05))], (sm - 0.4, 0.8), color=COLORS[name], linewidth=0)
            what = "layers 0-1" if zoom else "the step's layers"
            ax.set_title(f"{title} {key}: {what}; step {r['layers_us_median']:.0f} us (grid {r['grid']})", fontsize=10)
            if zoom:
                ax.set_xlim(0, zoom_end)
            ax.set_xlabel("us since the first tile (a bar: one CTA's tiles of one op, from before its wait)")
            ax.set_ylabel("SM")
            ax.legend(handles=[Patch(color=c, label=n) for n, c in COLORS.items()], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
