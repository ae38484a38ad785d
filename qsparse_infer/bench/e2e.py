"""`qsparse bench`: end-to-end prefill and decode speed, bytes per token, bandwidth and memory, with the
PyTorch bf16 peer (torch_peer.py) and our own S = 0 measured in the same run.

Decode is timed as CUDA-graph replays back to back (each step samples its token on the GPU and feeds it to
the next, greedy), with a CUDA event between consecutive steps: ms/token is the median over all steps of
all repetitions. Prefill is the median wall time of the whole prompt (synchronised). Bytes per token are
what a step must read: the selected weight rows, the LM head and the KV cache at the mean context length.
Streaming ceiling (ceilings.py), measured in the same process: the larger of an eager 1 GiB device copy
(bytes read plus written) and a streaming-read kernel; "% of streaming" divides the achieved GB/s by it.
`--lm-head int8` adds rows with the int8 LM head (head_int8.py) beside the bf16-head rows of the same run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import write_json, write_text
from ..model.config import SparsityConfig

DEFAULT_SPARSITIES = "0,0.4,0.6,0.8"
NO_PEER_SHAPES = ("70b",)  # bf16 Llama-70B is ~141 GB: no torch peer on one card


def card_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H20|A100|A10G|L40S|L4|B200|GH200|RTX ?\d{4})", name, re.I)
    return (m.group(1) if m else name).lower().replace(" ", "")


def _time_decode(run_step, n: int) -> list[float]:
    """ms of each of n steps (events between consecutive steps; host runs ahead of the GPU)."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        run_step()
        ev[i + 1].record()
    ev[-1].synchronize()
    return [ev[i].elapsed_time(ev[i + 1]) for i in range(n)]


def _wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_ours(ef: Any, sparsity: SparsityConfig, prompt: torch.Tensor, new_tokens: int, reps: int,
               kv_dtype: torch.dtype, decode_kernel: str = "multi") -> dict[str, Any]:
    from ..generate.sampling import SamplingSettings
    from ..gpu.model import GpuModel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    greedy = SamplingSettings(temperature=0.0)
    p = prompt.numel()
    model = GpuModel(ef, sparsity, max_len=p + new_tokens + 1, kv_dtype=kv_dtype, decode_kernel=decode_kernel)
    model.prefill(prompt, greedy)  # warm-up (sizes the prefill workspaces)
    prefill_s = [_wall(lambda: model.prefill(prompt, greedy)) for _ in range(reps)]
    step_ms: list[float] = []
    tokens = None
    for _ in range(reps):
        model.prefill(prompt, greedy)
        step_ms += _time_decode(model._run_step, new_tokens)
        seq = model.tokens()
        assert tokens is None or seq == tokens, "greedy decoding is not reproducible"
        tokens = seq
    peak = torch.cuda.max_memory_allocated()
    ms = statistics.median(step_ms)
    bpt = model.bytes_per_token(p + new_tokens // 2)
    separate_head = not ef.config.tie_word_embeddings or model.head_q8 is not None
    ideal = model.packed_bytes + model.embed_bytes + (model.head_bytes if separate_head else 0) + model.kv_bytes
    out = {
        "sparsity": sparsity.to_dict(),
        "decode_kernel": model.decode_kernel,
        "lm_head": "int8" if model.head_q8 is not None else "bf16",
        "prefill_tok_s": p / statistics.median(prefill_s),
        "decode_ms_per_token": ms,
        "decode_tok_s": 1e3 / ms,
        "decode_tok_s_mean": 1e3 * len(step_ms) / sum(step_ms),
        "bytes_per_token": bpt,
        "achieved_gbps": bpt["total"] / (ms / 1e3) / 1e9,
        "peak_gpu_bytes": peak,
        "model_bytes_ideal": ideal,
        "peak_over_ideal": peak / ideal,
        "gpu_memory": model.memory,
        "first_tokens": tokens[:8],
    }
    del model
    torch.cuda.empty_cache()
    return out


def bench_torch(cfg, prompt: torch.Tensor, new_tokens: int, reps: int, compile: bool) -> dict[str, Any]:
    from .torch_peer import TorchPeer

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    p = prompt.numel()
    peer = TorchPeer(cfg, max_len=p + new_tokens + 8)
    t0 = time.perf_counter()
    mode = peer.capture(compile=compile)
    capture_s = time.perf_counter() - t0
    peer.prefill(prompt)
    prefill_s = [_wall(lambda: peer.prefill(prompt)) for _ in range(reps)]
    step_ms: list[float] = []
    for _ in range(reps):
        first = peer.prefill(prompt)
        peer.start_decode(first, p)
        step_ms += _time_decode(peer.step, new_tokens)
    ms = statistics.median(step_ms)
    out = {"mode": mode, "capture_s": capture_s, "prefill_tok_s": p / statistics.median(prefill_s),
           "decode_ms_per_token": ms, "decode_tok_s": 1e3 / ms, "weight_bytes": peer.weight_bytes,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    del peer
    torch.cuda.empty_cache()
    return out


def run_key(s: float, head: str, decode_kernel: str = "multi") -> str:
    """Row key: the sparsity ("0.6") for the bf16 head, "0.6 int8-head" for the int8 head; " persistent" is
    appended for the persistent decode step."""
    key = f"{s:g}" if head == "bf16" else f"{s:g} int8-head"
    return key + (" persistent" if decode_kernel == "persistent" else "")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from ..kernels.ceilings import streaming_gbps
    from ..model.head_int8 import with_lm_head
    from ..model.random_model import SHAPES, random_engine

    torch.manual_seed(0)
    kv_dtype = torch.float32 if args.kv_dtype == "fp32" else torch.bfloat16
    sparsities = [float(s) for s in str(args.sparsity).split(",") if s.strip()]
    if args.model:
        from ..model.format import read_engine

        ef = read_engine(args.model)
        cfg, label = ef.config, Path(args.model).name
        if args.prompt_len + args.new_tokens + 1 > cfg.max_seq_len:
            raise ValueError(f"prompt + new tokens exceed the model's context of {cfg.max_seq_len}")
    else:
        cfg, label = SHAPES[args.shape], args.shape
        t0 = time.perf_counter()
        ef = random_engine(cfg, device="cuda", seed=0)  # generated on the GPU, no file
        torch.cuda.synchronize()
        print(f"random {label} weights generated on the GPU in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    name = torch.cuda.get_device_name()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    ceiling = streaming_gbps()
    res: dict[str, Any] = {
        "card": name, "card_slug": card_slug(name), "model": label, "config": cfg.to_dict(),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
        "kv_dtype": args.kv_dtype, "sampling": "greedy (on the GPU)", **ceiling,
        "torch_version": torch.__version__, "runs": {},
    }
    heads = ["bf16"] + (["int8"] if args.lm_head == "int8" else [])
    dk_arg = getattr(args, "decode_kernel", "multi")
    kernels = ["multi", "persistent"] if dk_arg == "both" else [dk_arg]
    if "persistent" in kernels:
        from ..gpu.persistent import unsupported_for
        from ..gpu.weights import TopK

        why = next(filter(None, (unsupported_for(cfg, TopK.of(cfg, SparsityConfig.uniform(s)), kv_dtype)
                                 for s in sparsities)), None)
        if why is not None and dk_arg == "persistent":
            raise ValueError(why)
        if why is not None:
            print(f"{why}: only the multi-kernel step is measured", file=sys.stderr)
            kernels = ["multi"]
    for head in heads:
        ef_head = with_lm_head(ef, head)
        for s, kernel in [(s, k) for s in sparsities for k in kernels]:
            key = run_key(s, head, kernel)
            r = bench_ours(ef_head, SparsityConfig.uniform(s), prompt, args.new_tokens, args.reps, kv_dtype, kernel)
            r["pct_of_streaming"] = 100 * r["achieved_gbps"] / ceiling["streaming_gbps"]
            res["runs"][key] = r
            print(f"S={key}: decode {r['decode_tok_s']:.0f} tok/s ({r['decode_ms_per_token']:.3f} ms), prefill "
                  f"{r['prefill_tok_s']:.0f} tok/s, {r['achieved_gbps']:.0f} GB/s ({r['pct_of_streaming']:.0f}% of "
                  f"streaming), peak {r['peak_gpu_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        del ef_head
    if getattr(args, "profile", False):
        from .profile import profile_decode

        res["profile"] = {}
        for head in heads:
            for s in sparsities:
                res["profile"][run_key(s, head)] = profile_decode(
                    with_lm_head(ef, head), SparsityConfig.uniform(s), prompt, ceiling["streaming_gbps"], kv_dtype)
        if "persistent" in kernels:  # inside the one kernel: per-op phases and a timeline (step_profile.py)
            from .step_profile import profile_persistent

            res["step_profile"] = {}
            for head in heads:
                for s in sparsities:
                    res["step_profile"][run_key(s, head, "persistent")] = profile_persistent(
                        with_lm_head(ef, head), SparsityConfig.uniform(s), prompt, ceiling["streaming_gbps"],
                        kv_dtype)
    del ef
    torch.cuda.empty_cache()
    runs = res["runs"]
    res["decode_tok_s"] = {k: v["decode_tok_s"] for k, v in runs.items()}
    res["prefill_tok_s"] = {k: v["prefill_tok_s"] for k, v in runs.items()}
    res["peak_gpu_bytes"] = {k: v["peak_gpu_bytes"] for k, v in runs.items()}
    if "0" in runs:
        res["speedup_vs_our_s0"] = {k: v["decode_tok_s"] / runs["0"]["decode_tok_s"] for k, v in runs.items()}
    if not args.no_peer and not args.model and args.shape in NO_PEER_SHAPES:
        print(f"no torch bf16 peer at the {args.shape} shape: its bf16 weights do not fit one GPU; our S=0 is the "
              f"baseline", file=sys.stderr)
    elif not args.no_peer:
        peer = bench_torch(cfg, prompt, args.new_tokens, args.reps, compile=not args.peer_no_compile)
        res["torch_bf16"] = peer
        res["torch_bf16_decode_tok_s"] = peer["decode_tok_s"]
        res["speedup_vs_torch_bf16"] = {k: v["decode_tok_s"] / peer["decode_tok_s"] for k, v in runs.items()}
        print(f"torch bf16 ({peer['mode']}): decode {peer['decode_tok_s']:.0f} tok/s, prefill "
              f"{peer['prefill_tok_s']:.0f} tok/s", file=sys.stderr)
    return res


def ceiling_text(res: dict[str, Any]) -> str:
    if "streaming_gbps" in res:
        return (f"{res['streaming_gbps']:.0f} GB/s (max of an eager copy, {res['copy_gbps']:.0f} GB/s read + write, "
                f"and a streaming read, {res['read_gbps']:.0f} GB/s)")
    return f"not measured (an old result: device copy {res.get('copy_gbps', float('nan')):.0f} GB/s)"


def pct_text(r: dict[str, Any]) -> str:
    return f"{r['pct_of_streaming']:.0f}%" if "pct_of_streaming" in r else "-"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# End-to-end decode, {res['model']} on {res['card']}", "",
             f"Prompt {res['prompt_len']} tokens, then {res['new_tokens']} new tokens (greedy, sampled on the GPU), "
             f"batch 1, KV cache {res['kv_dtype']}, {res['reps']} repetitions; medians. Streaming ceiling measured in "
             f"the same run: {ceiling_text(res)}.", "",
             "| S (all 4 groups) | decode tok/s | ms/token | prefill tok/s | bytes/token (MB) | GB/s | "
             "% of streaming | peak GPU (GiB) | peak / (weights+emb+head+KV) | vs our S=0 | vs torch bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in res["runs"].items():
        vs0 = res.get("speedup_vs_our_s0", {}).get(k)
        vst = res.get("speedup_vs_torch_bf16", {}).get(k)
        lines.append(f"| {k} | {r['decode_tok_s']:.0f} | {r['decode_ms_per_token']:.3f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['bytes_per_token']['total'] / 1e6:.0f} | {r['achieved_gbps']:.0f} | {pct_text(r)} | "
                     f"{r['peak_gpu_bytes'] / 2**30:.2f} | {r['peak_over_ideal']:.3f} | "
                     f"{'%.2fx' % vs0 if vs0 else '-'} | {'%.2fx' % vst if vst else '-'} |")
    if "torch_bf16" in res:
        p = res["torch_bf16"]
        lines += ["", f"PyTorch bf16 peer ({p['mode']}, same shape, random weights): decode "
                      f"{p['decode_tok_s']:.0f} tok/s ({p['decode_ms_per_token']:.3f} ms/token), prefill "
                      f"{p['prefill_tok_s']:.0f} tok/s, peak {p['peak_gpu_bytes'] / 2**30:.2f} GiB."]
    if "profile" in res:
        from .profile import table

        lines += ["", "## Per-phase breakdown (`--profile`)", ""]
        for key, prof in res["profile"].items():
            lines += [f"### S={key}", "", table(prof), ""]
    if "step_profile" in res:
        from .step_profile import markdown_lines

        lines += ["", "## Inside the persistent step (`--profile`; columns: qsparse_infer/bench/step_profile.py)", ""]
        for key, r in res["step_profile"].items():
            lines += markdown_lines(f"S={key}", r)
    if res.get("config", {}).get("precision", "ternary") != "ternary":
        lines += fp_target_lines(res)
    else:
        lines += target_lines(res)
    return "\n".join(lines) + "\n"


# Issue 16's targets per shape (one persistent kernel per decode step): decode tok/s floors, S = 0.6 against our
# own S = 0, and at 70B the share of the streaming ceiling that S = 0 reads (no torch peer fits at 70B).
TARGETS: dict[str, dict[str, float]] = {
    "2b4t": {"s0_tok_s": 1800.0, "s0_vs_torch": 5.0, "sparse_vs_s0": 1.05, "sparse_int8_tok_s": 2400.0},
    "8b": {"s0_tok_s": 1000.0, "sparse_vs_s0": 1.3},
    "70b": {"s0_pct_streaming": 75.0, "sparse_vs_s0": 1.8},
}


def target_lines(res: dict[str, Any]) -> list[str]:
    """The report's check of issue 16's targets for its shape: met or missed, from the numbers measured."""
    want = TARGETS.get(res.get("model", ""))
    runs = res["runs"]
    checks: list[tuple[str, float | None, float, str]] = []  # (what, measured, target, unit)
    for sfx in ("", " persistent"):  # each decode kernel against its own S = 0
        if want is None or "0" + sfx not in runs:
            continue
        s0, tag = runs["0" + sfx], sfx.strip() + " " if sfx else ""
        if "s0_tok_s" in want:
            checks.append((f"S=0 {tag}decode tok/s", s0["decode_tok_s"], want["s0_tok_s"], ""))
        if "s0_vs_torch" in want and "speedup_vs_torch_bf16" in res:
            checks.append((f"S=0 {tag}vs the torch bf16 peer", res["speedup_vs_torch_bf16"]["0" + sfx],
                           want["s0_vs_torch"], "x"))
        if "s0_pct_streaming" in want and "pct_of_streaming" in s0:
            checks.append((f"S=0 {tag}% of the streaming ceiling", s0["pct_of_streaming"], want["s0_pct_streaming"],
                           "%"))
        if "0.6" + sfx in runs:
            checks.append((f"S=0.6 {tag}vs our S=0 {tag}".rstrip(),
                           runs["0.6" + sfx]["decode_tok_s"] / s0["decode_tok_s"], want["sparse_vs_s0"], "x"))
        if "sparse_int8_tok_s" in want and "0.6 int8-head" + sfx in runs:
            checks.append((f"S=0.6 {tag}with the int8 head, decode tok/s", runs["0.6 int8-head" + sfx]["decode_tok_s"],
                           want["sparse_int8_tok_s"], ""))
    if not checks:
        return []
    lines = ["", f"Targets (issue 16, {res['model']} shape):", ""]
    for what, got, target, unit in checks:
        fmt = ".2f" if unit == "x" else ".0f"
        lines.append(f"- {what} >= {target:{fmt}}{unit}: {got:{fmt}}{unit} ({'met' if got >= target else 'missed'})")
    worst = max(r["peak_over_ideal"] for r in runs.values())
    lines.append(f"- peak GPU memory <= 1.2x (packed + embeddings + head + KV): {worst:.3f}x "
                 f"({'met' if worst <= 1.2 else 'missed'})")
    return lines


def fp_target_lines(res: dict[str, Any]) -> list[str]:
    """Issue 18's targets for a full-precision model: dense parity with torch, then what sparsity buys."""
    if "0" not in res["runs"]:
        return []
    speedup, vs0 = res.get("speedup_vs_torch_bf16", {}), res.get("speedup_vs_our_s0", {})
    checks = [("S=0 decode >= 1.0x the torch bf16 peer", speedup.get("0"), 1.0),
              ("S=0.5 >= 1.75x our S=0", vs0.get("0.5"), 1.75), ("S=0.6 >= 2x our S=0", vs0.get("0.6"), 2.0)]
    lines = ["", f"Targets (issue 18, full precision, {res.get('model', '?')}):", ""]
    for text, x, want in checks:
        lines.append(f"- {text}: " + (f"{x:.2f}x ({'met' if x >= want else 'missed'})" if x is not None
                                      else "not measured"))
    return lines


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for head in ("bf16", "int8"):
        pts = [(float(k.split()[0]), r["decode_tok_s"]) for k, r in res["runs"].items()
               if r.get("lm_head", "bf16") == head]
        if pts:
            kind = "ternary" if res.get("config", {}).get("precision", "ternary") == "ternary" else "bf16"
            label = f"qsparse-infer ({kind} + top-K)" + (", int8 LM head" if head == "int8" else "")
            ax.plot(*zip(*pts), "o-" if head == "bf16" else "s--", label=label)
    if "torch_bf16_decode_tok_s" in res:
        ax.axhline(res["torch_bf16_decode_tok_s"], color="gray", ls="--", label="PyTorch bf16 (compile + graph)")
    ax.set_xlabel("activation sparsity S (all four groups)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"{res['model']} on {res['card']}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(res: dict[str, Any], json_path: Path) -> None:
    write_json(json_path, res, indent=2, sort_keys=True)
    write_text(json_path.with_suffix(".md"), markdown(res))
    try:
        plot(res, json_path.with_suffix(".png"))
        if "step_profile" in res:
            from .step_profile import plot_timelines

            plot_timelines(res["step_profile"], res["model"], json_path.with_name(json_path.stem + "-timeline.png"))
    except ImportError:
        print("matplotlib is not installed: no plot (run `qsparse bench --plot-only FILE.json` elsewhere)",
              file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="engine file to benchmark")
    p.add_argument("--shape", choices=("2b4t", "8b", "70b", "llama8b-bf16"), default="2b4t",
                   help="random weights of this shape (when no --model): ternary 2b4t / 8b / 70b, or full-precision "
                        "bf16 weights of Llama-3-8B's shape (70b has no torch peer: its bf16 weights do not fit one GPU)")
    p.add_argument("--sparsity", default=DEFAULT_SPARSITIES, help="comma-separated list, applied to all 4 groups")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens prefilled before decoding")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp32"), default="bf16", help="KV cache dtype")
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch bf16 peer")
    p.add_argument("--decode-kernel", choices=("multi", "persistent", "both"), default="multi",
                   help="the decode step's layers as a chain of kernels, as one persistent kernel, or both in one run")
    p.add_argument("--lm-head", choices=("bf16", "int8"), default="bf16",
                   help="int8: also measure every sparsity with the int8 LM head (own rows, same run)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one eager decode step per row: time per kernel kind beside its bytes floor; "
                        "for the persistent step, per-op phases and a timeline PNG (<json>-timeline.png)")
    p.add_argument("--peer-no-compile", action="store_true", help="peer without torch.compile (graph only)")
    p.add_argument("--json", default=None, help="output JSON (default bench/results/e2e-<card>.json)")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="only (re)draw the PNG and markdown of a JSON")


def run(args: argparse.Namespace) -> int:
    if args.plot_only:
        src = Path(args.plot_only)
        res = json.loads(src.read_text())
        src.with_suffix(".md").write_text(markdown(res))
        plot(res, src.with_suffix(".png"))
        return 0
    from ..kernels import _ext

    _ext.require_gpu(cpu_hint="qsparse bench measures the CUDA kernels and has no CPU mode")
    if args.prompt_len < 1 or args.new_tokens < 1:
        raise ValueError("--prompt-len and --new-tokens must be >= 1")
    res = run_bench(args)
    path = Path(args.json) if args.json else Path("bench/results") / f"e2e-{res['card_slug']}.json"
    write_outputs(res, path)
    print(markdown(res))
    print(f"wrote {path}", file=sys.stderr)
    return 0
