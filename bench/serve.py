"""HTTP serving benchmark: N concurrent streaming clients against an OpenAI-compatible qsparse server, with the
batched runner alone and the torch bf16 static-batch peer at batch = N in the same run.

Each client sends requests back to back (closed loop): a prompt of --prompt-len random token ids (the
completions API takes token ids, so every prompt is exactly that long, tokenizer or not) and --new-tokens
output tokens (ignore_eos, so every request runs to its length). Per concurrency level: output tokens/s
(all clients' tokens over the level's wall time), time to first token (all requests, and the "steady" ones
after each client's first, which do not arrive in one burst) and inter-token latency p50/p99 (client view:
chunk arrival times, one chunk per token), and the server's peak GPU memory.

The long-prompt case (--long-prompt 4092 --long-among 16): 16 closed-loop streams decode; then one request
with a 4092-token prompt (4 new tokens fill the 4096 context) arrives. The streams' ITL p99 while that prompt is prefilled (the intervals that
overlap [sent, its first token]) is compared with their ITL p99 before it (issue 17: at most 2x).

  # a running server
  python bench/serve.py --url http://127.0.0.1:8000
  # launch a server per sparsity (random 2B4T-shaped weights on the GPU), measure, stop it; then the runner
  # alone and the torch peer at B = N in this process
  python bench/serve.py --launch --shape 2b4t --sparsity 0 --max-batch 64 --runner --peer --long-prompt 4092

Writes JSON + markdown + a PNG (throughput vs concurrency).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from qsparse_infer.atomic_io import write_json, write_text


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def _ms(x: float | None) -> float | None:
    return None if x is None else 1e3 * x


async def server_state(ac: httpx.AsyncClient) -> dict[str, Any]:
    """The server's JSON status (scheduler counters, memory): /metrics/json where /metrics is Prometheus text,
    else /metrics if it is JSON, else /health."""
    for path in ("/metrics/json", "/metrics", "/health"):
        try:
            r = await ac.get(path)
            if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
                return r.json()
        except (httpx.HTTPError, ValueError):
            continue
    return {}


async def reset_peak(ac: httpx.AsyncClient) -> None:
    try:
        await ac.post("/metrics/reset_peak")
    except httpx.HTTPError:
        pass


async def one_request(ac: httpx.AsyncClient, model: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']['message']}")
            now = time.perf_counter()
            for c in chunk.get("choices", []):
                stamps.extend([now] * len(c.get("token_ids") or []))
    if not stamps:
        raise RuntimeError("no tokens came back")
    return {"t0": t0, "stamps": stamps, "ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": len(stamps), "latency": time.perf_counter() - t0}


def _client(url: str, n: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits)


async def run_level(url: str, model: str, vocab: int, n: int, rounds: int, prompt_len: int, new_tokens: int,
                    seed: int) -> dict[str, Any]:
    rng = random.Random(seed * 1000 + n)
    hi = min(vocab, 32000)
    async with _client(url, n) as ac:
        await reset_peak(ac)

        async def client(k: int) -> list[dict[str, Any]]:
            return [await one_request(ac, model, [rng.randrange(min(100, hi - 1), hi) for _ in range(prompt_len)],
                                      new_tokens) for _ in range(rounds)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(k) for k in range(n)))
        wall = time.perf_counter() - t0
        state = await server_state(ac)
    reqs = [r for rs in per_client for r in rs]
    ttft = [r["ttft"] for r in reqs]
    steady = [r["ttft"] for rs in per_client for r in rs[1:]]
    itl = [x for r in reqs for x in r["itl"]]
    tokens = sum(r["tokens"] for r in reqs)
    p50, p99 = percentile(itl, 50), percentile(itl, 99)
    return {"concurrency": n, "requests": len(reqs), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "per_request_tok_s": statistics.median(
                (r["tokens"] - 1) / max(r["latency"] - r["ttft"], 1e-9) for r in reqs),
            "ttft_ms_p50": _ms(percentile(ttft, 50)), "ttft_ms_p99": _ms(percentile(ttft, 99)),
            "ttft_steady_ms_p50": _ms(percentile(steady, 50)), "ttft_steady_ms_p99": _ms(percentile(steady, 99)),
            "itl_ms_p50": _ms(p50), "itl_ms_p99": _ms(p99),
            "itl_p99_over_p50": (p99 / p50) if p50 else None,
            "memory": state.get("memory", {}), "scheduler": state.get("scheduler", {})}


LONG_NEW_TOKENS = 4  # the long request only needs its TTFT and to overlap the streams' decode


async def long_prompt_case(url: str, model: str, vocab: int, streams: int, long_len: int, prompt_len: int,
                           new_tokens: int, seed: int, baseline_s: float = 2.0) -> dict[str, Any]:
    """`streams` closed-loop streaming clients; after baseline_s, one request with a long_len-token prompt.
    Compares the streams' ITL p99 over the intervals that overlap the long prompt's prefill with their ITL
    p99 before it arrived."""
    rng = random.Random(seed + 4096)
    hi = min(vocab, 32000)
    stop = asyncio.Event()
    gaps: list[tuple[float, float]] = []  # (previous token, this token) arrival times of the streams
    async with _client(url, streams + 1) as ac:
        async def stream(k: int) -> None:
            while not stop.is_set():
                r = await one_request(ac, model, [rng.randrange(min(100, hi - 1), hi) for _ in range(prompt_len)],
                                      new_tokens)
                gaps.extend(zip(r["stamps"], r["stamps"][1:]))

        tasks = [asyncio.create_task(stream(k)) for k in range(streams)]
        start = time.perf_counter()
        await asyncio.sleep(baseline_s)
        long = await one_request(ac, model, [rng.randrange(min(100, hi - 1), hi) for _ in range(long_len)],
                                 LONG_NEW_TOKENS)
        t_sent, t_first = long["t0"], long["stamps"][0]
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
    warm = start + 0.5 * baseline_s  # skip the streams' own first prefills
    before = [b - a for a, b in gaps if warm <= a and b <= t_sent]
    during = [b - a for a, b in gaps if b > t_sent and a < t_first]
    p99_before, p99_during = percentile(before, 99), percentile(during, 99)
    return {"streams": streams, "long_prompt": long_len, "long_ttft_ms": _ms(t_first - t_sent),
            "itl_ms_p50_before": _ms(percentile(before, 50)), "itl_ms_p99_before": _ms(p99_before),
            "itl_ms_p50_during": _ms(percentile(during, 50)), "itl_ms_p99_during": _ms(p99_during),
            "itl_samples_before": len(before), "itl_samples_during": len(during),
            "p99_ratio": (p99_during / p99_before) if p99_before and p99_during else None}


def level_rounds(args: argparse.Namespace, n: int) -> int:
    if getattr(args, "rounds", None) is not None:
        return args.rounds
    return max(getattr(args, "min_rounds", 1), min(getattr(args, "max_rounds", 10**6),
                                                    max(1, args.min_requests // n)))


def bench_server(url: str, args: argparse.Namespace) -> dict[str, Any]:
    health = httpx.get(url + "/health", timeout=30).json()
    model, vocab = health["model"], int(health.get("vocab_size") or 32000)
    asyncio.run(run_level(url, model, vocab, 1, 1, min(16, args.prompt_len), 8, args.seed))  # warm-up
    levels = {}
    for n in args.concurrency:
        r = asyncio.run(run_level(url, model, vocab, n, level_rounds(args, n), args.prompt_len, args.new_tokens,
                                  args.seed))
        levels[str(n)] = r
        mem = r["memory"].get("gpu_peak_allocated_bytes")
        print(f"  N={n:3d}: {r['output_tok_s']:8.0f} tok/s  TTFT p50 {r['ttft_ms_p50']:.1f} ms (steady "
              f"{r['ttft_steady_ms_p50'] or 0:.1f}) p99 {r['ttft_ms_p99']:.1f} ms  ITL p50 {r['itl_ms_p50'] or 0:.2f}"
              f" ms p99 {r['itl_ms_p99'] or 0:.2f} ms" + (f"  peak {mem / 2**30:.2f} GiB" if mem else ""),
              file=sys.stderr, flush=True)
    out = {"model": model, "server": {k: v for k, v in health.items() if k not in ("scheduler", "memory")},
           "levels": levels}
    long_len = getattr(args, "long_prompt", 0)
    if long_len:
        lc = asyncio.run(long_prompt_case(url, model, vocab, args.long_among, long_len, args.prompt_len,
                                          max(args.new_tokens, 256), args.seed))
        out["long_prompt"] = lc
        print(f"  {long_len}-token prompt among {lc['streams']} streams: ITL p99 {lc['itl_ms_p99_before'] or 0:.2f}"
              f" -> {lc['itl_ms_p99_during'] or 0:.2f} ms ({lc['p99_ratio'] or 0:.2f}x), its TTFT "
              f"{lc['long_ttft_ms']:.0f} ms", file=sys.stderr, flush=True)
    return out


class LaunchedServer:
    """`qsparse serve` in a subprocess for one model/sparsity; waits for /health, stops it on exit."""

    def __init__(self, args: argparse.Namespace, sparsity: str | None) -> None:
        self.url = f"http://127.0.0.1:{args.port}"
        # Exactly what the requests need: `qsparse serve` refuses a --max-len beyond the model's context, so a
        # 4092-token long prompt (+ its 4 new tokens) still fits a 4096 context.
        long_len = getattr(args, "long_prompt", 0)
        max_len = max(args.prompt_len + args.new_tokens, long_len + LONG_NEW_TOKENS)
        if long_len:
            max_len = max(max_len, args.prompt_len + max(args.new_tokens, 256))
        cmd = [sys.executable, "-m", "qsparse_infer.cli", "serve", "--port", str(args.port), "--log-level", "warning",
               "--max-len", str(max_len)]
        cmd += [args.model] if args.model else ["--shape", args.shape]
        if sparsity is not None:
            cmd += ["--sparsity", sparsity]
        if args.max_batch:
            cmd += ["--max-batch", str(args.max_batch)]
        if args.prefill_chunk:
            cmd += ["--prefill-chunk", str(args.prefill_chunk)]
        cmd += ["--max-queue", str(max(args.concurrency) * 2 + 8), "--device", args.device]
        self.cmd = cmd

    def __enter__(self) -> "LaunchedServer":
        print("launching: " + " ".join(self.cmd), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.cmd)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("the server did not become healthy within 600 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- in-process peers: the batched runner alone, the torch bf16 static batch ---------------------------------

PEER_LABEL = "torch bf16 static batch (in-process, no HTTP)"


def merge_peer(res: dict[str, Any], peer: dict[str, Any]) -> None:
    """Add the batched PyTorch bf16 peer's numbers under res["peer"] (drawn as their own line). `peer` is either
    {"label": str, "levels": {"N": {"output_tok_s": float, ...}}} or the JSON that bench/batched_decode.py
    --torch --json writes ({"results": [{"who": "torch", "B", "tok_s", ...}]})."""
    if "results" in peer:
        rows = [r for r in peer["results"] if r.get("who") == "torch"]
        peer = {"label": PEER_LABEL, "levels": {str(r["B"]): {**r, "output_tok_s": r["tok_s"]} for r in rows}}
    res["peer"] = peer


def peer_numbers(shape: str, concurrency: list[int], prompt_len: int, new_tokens: int,
                 compile: bool = True) -> dict[str, Any]:
    """The batched torch bf16 peer (`qsparse_infer.bench.torch_peer.bench_torch_batched`) at batch = N."""
    from qsparse_infer.bench.torch_peer import bench_torch_batched
    from qsparse_infer.model.random_model import SHAPES

    rows = []
    for n in concurrency:
        r = bench_torch_batched(SHAPES[shape], n, prompt_len=prompt_len, new_tokens=new_tokens, compile=compile)
        rows.append({**r, "who": "torch"})
        print(f"  torch bf16 B={n:3d}: {r['tok_s']:8.0f} tok/s ({r['mode']})", file=sys.stderr, flush=True)
    return {"results": rows}


def runner_numbers(shape: str, sparsities: list[str | None], concurrency: list[int], prompt_len: int,
                   steps: int) -> dict[str, Any]:
    """GpuBatchRunner alone on the same random weights the server used (random_engine seed 0), B = N slots
    decoding together: `tok_s` waits for every step's tokens before launching the next (as the issue's table
    measured it); `pipelined_tok_s` launches step t+1 before reading step t (what the overlapping scheduler
    can reach)."""
    import torch

    from qsparse_infer.generate.sampling import SamplingSettings
    from qsparse_infer.model.config import SparsityConfig
    from qsparse_infer.model.random_model import SHAPES, random_engine
    from qsparse_infer.serving.gpu_runner import GpuBatchRunner
    from qsparse_infer.serving.runner import StepPlan

    out: dict[str, Any] = {}
    for s in sparsities:
        sp = SparsityConfig.parse(s) if s else SparsityConfig()
        ef = random_engine(SHAPES[shape], sp, device="cuda", seed=0)
        runner = GpuBatchRunner(ef, sp, max_slots=max(concurrency), max_len=prompt_len + 2 * steps + 16)
        levels = {}
        for b in concurrency:
            g = torch.Generator().manual_seed(b)
            slots = list(range(b))
            for slot in slots:
                runner.begin(slot, SamplingSettings(temperature=0.0), 0)
                runner.prefill(slot, torch.randint(0, runner.vocab_size, (prompt_len,), generator=g).tolist(), True)
            for _ in range(3):
                runner.decode(slots)
            times = []
            for _ in range(steps // 2):
                t0 = time.perf_counter()
                runner.decode(slots)
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            handle = runner.launch(StepPlan(decode=slots))
            for _ in range(steps // 2 - 1):
                nxt = runner.launch(StepPlan(decode=slots))
                handle.result()
                handle = nxt
            handle.result()
            pipelined = (steps // 2) * b / (time.perf_counter() - t0)
            for slot in slots:
                runner.release(slot)
            ms = 1e3 * statistics.median(times)
            levels[str(b)] = {"B": b, "ms_per_step": ms, "tok_s": b * 1e3 / ms, "pipelined_tok_s": pipelined}
            print(f"  runner S={s} B={b:3d}: {b * 1e3 / ms:8.0f} tok/s ({ms:.3f} ms/step), pipelined "
                  f"{pipelined:8.0f} tok/s", file=sys.stderr, flush=True)
        out[f"S={s}"] = {"levels": levels}
        del runner, ef
        torch.cuda.empty_cache()
    return out


# -- the report ------------------------------------------------------------------------------------------------

def _f(x: Any, fmt: str = "%.1f") -> str:
    return fmt % x if isinstance(x, (int, float)) else "-"


def comparison(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (run, N): HTTP tok/s beside the runner alone and the torch peer at B = N."""
    rows = []
    peer = res.get("peer", {}).get("levels", {})
    for label, run in res["runs"].items():
        alone = res.get("runner", {}).get(label, {}).get("levels", {})
        for n, r in run["levels"].items():
            http = r["output_tok_s"]
            rt = alone.get(n, {}).get("tok_s")
            pt = peer.get(n, {}).get("output_tok_s")
            rows.append({"run": label, "N": int(n), "http_tok_s": http, "runner_tok_s": rt,
                         "runner_pipelined_tok_s": alone.get(n, {}).get("pipelined_tok_s"),
                         "http_over_runner": http / rt if rt else None, "torch_tok_s": pt,
                         "http_over_torch": http / pt if pt else None, "ttft_ms_p50": r["ttft_ms_p50"],
                         "ttft_steady_ms_p50": r.get("ttft_steady_ms_p50"), "itl_ms_p50": r["itl_ms_p50"],
                         "itl_ms_p99": r["itl_ms_p99"], "itl_p99_over_p50": r.get("itl_p99_over_p50")})
    return rows


def targets(res: dict[str, Any]) -> list[str]:
    """Issue 17's targets, evaluated on this run's numbers (met / missed / not measured)."""
    out = []
    by = {(r["run"], r["N"]): r for r in comparison(res)}

    def check(name: str, value: float | None, ok) -> None:
        if value is None:
            out.append(f"- {name}: not measured")
        else:
            out.append(f"- {name}: {value:.2f} ({'met' if ok(value) else 'missed'})")

    for label in res["runs"]:
        for n, lo in ((16, 0.90), (64, 0.85)):
            r = by.get((label, n))
            check(f"{label} HTTP / runner at N={n} >= {lo:.2f}", r and r["http_over_runner"], lambda v, lo=lo: v >= lo)
        for n, lo in ((16, 1.5), (64, 2.3)):
            r = by.get((label, n))
            check(f"{label} HTTP / torch bf16 at N={n} >= {lo}x", r and r["http_over_torch"], lambda v, lo=lo: v >= lo)
        r = by.get((label, 64))
        check(f"{label} TTFT p50 at N=64 <= 100 ms (ms)", r and r["ttft_ms_p50"], lambda v: v <= 100)
        for n in (16, 64):
            r = by.get((label, n))
            check(f"{label} ITL p99 / p50 at N={n} <= 2", r and r["itl_p99_over_p50"], lambda v: v <= 2)
        lc = res["runs"][label].get("long_prompt")
        if lc:
            check(f"{label} {lc['long_prompt']}-token prompt among {lc['streams']}: ITL p99 during / before <= 2",
                  lc["p99_ratio"], lambda v: v <= 2)
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# HTTP serving benchmark ({res['card']})", "",
             f"Closed loop: N concurrent streaming clients, prompts of {res['prompt_len']} token ids, "
             f"{res['new_tokens']} output tokens each (greedy, ignore_eos). TTFT and ITL as the clients see them "
             "(TTFT steady: each client's requests after its first, which do not arrive in one burst).",
             "", "| run | N | output tok/s | per-request tok/s | TTFT p50 / p99 (ms) | TTFT steady p50 (ms) | "
             "ITL p50 / p99 (ms) | peak GPU alloc (GiB) | GPU used (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, run in res["runs"].items():
        for n, r in run["levels"].items():
            m = r.get("memory", {})
            peak, used = m.get("gpu_peak_allocated_bytes"), m.get("gpu_used_bytes")
            lines.append(f"| {label} | {n} | {r['output_tok_s']:.0f} | {_f(r.get('per_request_tok_s'), '%.0f')} | "
                         f"{_f(r['ttft_ms_p50'])} / {_f(r['ttft_ms_p99'])} | {_f(r.get('ttft_steady_ms_p50'))} | "
                         f"{_f(r['itl_ms_p50'], '%.2f')} / {_f(r['itl_ms_p99'], '%.2f')} | "
                         f"{_f(peak and peak / 2**30, '%.2f')} | {_f(used and used / 2**30, '%.2f')} |")
    if res.get("runner") or res.get("peer"):
        lines += ["", "Same run: the batched runner alone (B = N slots, in-process, no HTTP; pipelined = step t+1 "
                  "launched before step t's tokens are read) and the torch bf16 static batch.", "",
                  "| run, N | HTTP tok/s | runner alone tok/s (pipelined) | HTTP / runner | torch bf16 tok/s | "
                  "HTTP / torch | ITL p99 / p50 |", "|---|---|---|---|---|---|---|"]
        for r in comparison(res):
            lines.append(f"| {r['run']}, N={r['N']} | {r['http_tok_s']:.0f} | {_f(r['runner_tok_s'], '%.0f')} "
                         f"({_f(r['runner_pipelined_tok_s'], '%.0f')}) | {_f(r['http_over_runner'], '%.2f')} | "
                         f"{_f(r['torch_tok_s'], '%.0f')} | {_f(r['http_over_torch'], '%.2f')}x | "
                         f"{_f(r['itl_p99_over_p50'], '%.2f')} |")
    longs = [(label, run["long_prompt"]) for label, run in res["runs"].items() if run.get("long_prompt")]
    if longs:
        lines += ["", "One long prompt among decoding streams:", "",
                  "| run | prompt | streams | streams' ITL p50 / p99 before (ms) | during its prefill (ms) | "
                  "p99 ratio | its TTFT (ms) |", "|---|---|---|---|---|---|---|"]
        for label, lc in longs:
            lines.append(f"| {label} | {lc['long_prompt']} | {lc['streams']} | {_f(lc['itl_ms_p50_before'], '%.2f')}"
                         f" / {_f(lc['itl_ms_p99_before'], '%.2f')} | {_f(lc['itl_ms_p50_during'], '%.2f')} / "
                         f"{_f(lc['itl_ms_p99_during'], '%.2f')} | {_f(lc['p99_ratio'], '%.2f')} | "
                         f"{_f(lc['long_ttft_ms'], '%.0f')} |")
    if "peer" in res and not res.get("runner"):
        p = res["peer"]
        lines += ["", f"Peer: {p.get('label', 'torch bf16 batched')}", "", "| N | output tok/s |", "|---|---|"]
        lines += [f"| {n} | {r['output_tok_s']:.0f} |" for n, r in p["levels"].items()]
    if res.get("runner") or res.get("peer"):
        lines += ["", "Targets (issue 17):", ""] + targets(res)
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {f"qsparse HTTP {k}": v["levels"] for k, v in res["runs"].items()}
    for k, v in res.get("runner", {}).items():
        series[f"runner alone {k}"] = {n: {"output_tok_s": r["tok_s"]} for n, r in v["levels"].items()}
    if "peer" in res:
        series[res["peer"].get("label", "torch bf16 batched")] = res["peer"]["levels"]
    for label, levels in series.items():
        xs = sorted(int(n) for n in levels)
        ax.plot(xs, [levels[str(n)]["output_tok_s"] for n in xs], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streaming clients (batch)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"serving, {res['prompt_len']}+{res['new_tokens']} tokens, {res['card']}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(res: dict[str, Any], json_path: Path) -> None:
    write_json(json_path, res, indent=2, sort_keys=True)
    write_text(json_path.with_suffix(".md"), markdown(res))
    try:
        plot(res, json_path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="benchmark this running server (else --launch)")
    p.add_argument("--launch", action="store_true", help="start `qsparse serve` per sparsity, measure, stop it")
    p.add_argument("--model", default=None, help="with --launch: engine file (else --shape)")
    p.add_argument("--shape", default="2b4t", help="with --launch: random weights of this shape (default: 2b4t)")
    p.add_argument("--sparsity", default="0,0.6", help="with --launch: comma-separated list (default: 0,0.6)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-batch", type=int, default=None, help="with --launch: server slots (default: server's)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="with --launch: server's prefill token budget "
                                                                     "per step (default: server's)")
    p.add_argument("--port", type=int, default=8011, help="with --launch (default: 8011)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated N (default: 1,4,16,64)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None, help="requests per client (default: --min-requests / N, "
                                                               "within --min-rounds .. --max-rounds)")
    p.add_argument("--min-requests", type=int, default=32, help="requests per level at least (default: 32)")
    p.add_argument("--min-rounds", type=int, default=1)
    p.add_argument("--max-rounds", type=int, default=10**6)
    p.add_argument("--long-prompt", type=int, default=0, help="also the long-prompt case with a prompt of this "
                                                                "many tokens (e.g. 4096; 0: off)")
    p.add_argument("--long-among", type=int, default=16, help="decoding streams in the long-prompt case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card", default=None, help="label for the results (default: from the server or 'cpu')")
    p.add_argument("--runner", action="store_true", help="with --launch --shape: also GpuBatchRunner alone at "
                                                            "B = N in this process, after the servers stopped")
    p.add_argument("--runner-steps", type=int, default=64)
    p.add_argument("--peer", action="store_true", help="with --launch --shape: also the batched torch bf16 "
                                                          "peer in-process at batch = N")
    p.add_argument("--peer-eager", action="store_true", help="the peer without torch.compile (faster set-up)")
    p.add_argument("--peer-json", default=None, help="merge the batched torch bf16 peer's results (merge_peer)")
    p.add_argument("--json", default=None, help="output (default bench/results/serve-<card>.json)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if bool(args.url) == bool(args.launch):
        p.error("give exactly one of --url and --launch")
    if (args.runner or args.peer) and (not args.launch or args.model):
        p.error("--runner and --peer need --launch with --shape")
    card = args.card
    if card is None:
        try:
            import torch

            card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except ImportError:
            card = "cpu"
    slug = card.split()[-1].lower() if card != "cpu" else "cpu"
    out = Path(args.json or f"bench/results/serve-{slug}.json")
    res: dict[str, Any] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "card": card,
                           "concurrency": args.concurrency, "prefill_chunk": args.prefill_chunk, "runs": {}}
    sparsities = [x.strip() for x in args.sparsity.split(",")] if args.sparsity else [None]
    # results are written after every phase, so a run cut short by a time limit keeps what it measured
    if args.url:
        print(f"benchmarking {args.url}", file=sys.stderr)
        run = bench_server(args.url.rstrip("/"), args)
        res["runs"][run["model"]] = run
    else:
        for s in sparsities:
            with LaunchedServer(args, s) as server:
                print(f"S={s}:", file=sys.stderr)
                run = bench_server(server.url, args)
            res["runs"][f"S={s}" if s is not None else run["model"]] = run
            write_outputs(res, out)
    if args.runner:
        res["runner"] = runner_numbers(args.shape, sparsities, args.concurrency, args.prompt_len, args.runner_steps)
        write_outputs(res, out)
    if args.peer_json:
        merge_peer(res, json.loads(Path(args.peer_json).read_text()))
    elif args.peer:
        rows: list[dict[str, Any]] = []
        for n in args.concurrency:  # one batch size at a time, written as it comes (compiles are slow)
            rows += peer_numbers(args.shape, [n], args.prompt_len, args.new_tokens,
                                 compile=not args.peer_eager)["results"]
            merge_peer(res, {"results": rows})
            write_outputs(res, out)
    write_outputs(res, out)
    if args.runner or args.peer:
        print("Targets (issue 17):\n" + "\n".join(targets(res)), file=sys.stderr)
    print(f"wrote {out} (+ .md, .png)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
