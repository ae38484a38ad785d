"""HTTP serving benchmark: N concurrent streaming clients against an OpenAI-compatible qsparse server.

Each client sends requests back to back (closed loop): a prompt of --prompt-len random token ids (the
completions API takes token ids, so every prompt is exactly that long, tokenizer or not) and --new-tokens
output tokens (ignore_eos, so every request runs to its length). Per concurrency level: output tokens/s
(all clients' tokens over the level's wall time), time to first token and inter-token latency p50/p99 (from
the client's view: chunk arrival times, one chunk per token), and the server's peak GPU memory (/metrics).

  # a running server
  python bench/serve.py --url http://127.0.0.1:8000
  # launch one server per sparsity (random 2B4T-shaped weights on the GPU), measure, stop it
  python bench/serve.py --launch --shape 2b4t --sparsity 0,0.6 --max-batch 64

Writes JSON + markdown + a PNG (throughput vs concurrency). Numbers of the batched PyTorch bf16 peer can be
merged in with --peer-json (see `merge_peer`).
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
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "latency": time.perf_counter() - t0}


async def run_level(url: str, model: str, vocab: int, n: int, rounds: int, prompt_len: int, new_tokens: int,
                    seed: int) -> dict[str, Any]:
    rng = random.Random(seed * 1000 + n)
    hi = min(vocab, 32000)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as ac:
        await ac.post("/metrics/reset_peak")

        async def client(k: int) -> list[dict[str, Any]]:
            return [await one_request(ac, model, [rng.randrange(100, hi) for _ in range(prompt_len)], new_tokens)
                    for _ in range(rounds)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(k) for k in range(n)))
        wall = time.perf_counter() - t0
        metrics = (await ac.get("/metrics")).json()
    reqs = [r for rs in per_client for r in rs]
    ttft = [r["ttft"] for r in reqs]
    itl = [x for r in reqs for x in r["itl"]]
    tokens = sum(r["tokens"] for r in reqs)
    return {"concurrency": n, "requests": len(reqs), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "per_request_tok_s": statistics.median(
                (r["tokens"] - 1) / max(r["latency"] - r["ttft"], 1e-9) for r in reqs),
            "ttft_ms_p50": 1e3 * percentile(ttft, 50), "ttft_ms_p99": 1e3 * percentile(ttft, 99),
            "itl_ms_p50": 1e3 * percentile(itl, 50) if itl else None,
            "itl_ms_p99": 1e3 * percentile(itl, 99) if itl else None,
            "memory": metrics.get("memory", {}), "scheduler": metrics.get("scheduler", {})}


def bench_server(url: str, args: argparse.Namespace) -> dict[str, Any]:
    health = httpx.get(url + "/health", timeout=30).json()
    model, vocab = health["model"], int(health.get("vocab_size") or 32000)
    asyncio.run(run_level(url, model, vocab, 1, 1, min(16, args.prompt_len), 8, args.seed))  # warm-up
    levels = {}
    for n in args.concurrency:
        rounds = max(1, args.min_requests // n) if args.rounds is None else args.rounds
        r = asyncio.run(run_level(url, model, vocab, n, rounds, args.prompt_len, args.new_tokens, args.seed))
        levels[str(n)] = r
        mem = r["memory"].get("gpu_peak_allocated_bytes")
        print(f"  N={n:3d}: {r['output_tok_s']:8.0f} tok/s  TTFT p50 {r['ttft_ms_p50']:.1f} ms p99 "
              f"{r['ttft_ms_p99']:.1f} ms  ITL p50 {r['itl_ms_p50'] or 0:.2f} ms p99 {r['itl_ms_p99'] or 0:.2f} ms"
              + (f"  peak {mem / 2**30:.2f} GiB" if mem else ""), file=sys.stderr, flush=True)
    return {"model": model, "server": {k: v for k, v in health.items() if k not in ("scheduler", "memory")},
            "levels": levels}


class LaunchedServer:
    """`qsparse serve` in a subprocess for one model/sparsity; waits for /health, stops it on exit."""

    def __init__(self, args: argparse.Namespace, sparsity: str | None) -> None:
        self.url = f"http://127.0.0.1:{args.port}"
        cmd = [sys.executable, "-m", "qsparse_infer.cli", "serve", "--port", str(args.port), "--log-level", "warning",
               "--max-len", str(args.prompt_len + args.new_tokens + 8)]
        cmd += [args.model] if args.model else ["--shape", args.shape]
        if sparsity is not None:
            cmd += ["--sparsity", sparsity]
        if args.max_batch:
            cmd += ["--max-batch", str(args.max_batch)]
        if args.prefill_chunk:
            cmd += ["--prefill-chunk", str(args.prefill_chunk)]
        cmd += ["--max-queue", str(max(args.concurrency) * 2), "--device", args.device]
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


PEER_LABEL = "torch bf16 static batch (in-process, no HTTP)"


def merge_peer(res: dict[str, Any], peer: dict[str, Any]) -> None:
    """Add the batched PyTorch bf16 peer's numbers, stored under res["peer"] and drawn as their own line.
    `peer` is either {"label": str, "levels": {"N": {"output_tok_s": float, ...}}} or the JSON that
    bench/batched_decode.py --torch --json writes ({"results": [{"who": "torch", "B", "tok_s", ...}]})."""
    if "results" in peer:
        rows = [r for r in peer["results"] if r.get("who") == "torch"]
        peer = {"label": PEER_LABEL, "levels": {str(r["B"]): {**r, "output_tok_s": r["tok_s"]} for r in rows}}
    res["peer"] = peer


def peer_numbers(shape: str, concurrency: list[int], prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Run the batched torch bf16 peer (`qsparse_infer.bench.torch_peer.bench_torch_batched`, from the gpu-batch
    work) at batch = N for each concurrency level, in this process, after the servers have stopped."""
    from qsparse_infer.model.random_model import SHAPES
    from qsparse_infer.bench.torch_peer import bench_torch_batched

    rows = [{**bench_torch_batched(SHAPES[shape], n, prompt_len=prompt_len, new_tokens=new_tokens), "who": "torch"}
            for n in concurrency]
    return {"results": rows}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# HTTP serving benchmark ({res['card']})", "",
             f"Closed loop: N concurrent streaming clients, prompts of {res['prompt_len']} token ids, "
             f"{res['new_tokens']} output tokens each (greedy, ignore_eos). TTFT and ITL as the clients see them.",
             "", "| run | N | output tok/s | per-request tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
             "peak GPU alloc (GiB) | GPU used (GiB) |", "|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="%.1f"):
        return fmt % x if isinstance(x, (int, float)) else "-"

    for label, run in res["runs"].items():
        for n, r in run["levels"].items():
            m = r.get("memory", {})
            peak = m.get("gpu_peak_allocated_bytes")
            used = m.get("gpu_used_bytes")
            lines.append(f"| {label} | {n} | {r['output_tok_s']:.0f} | {f(r.get('per_request_tok_s'), '%.0f')} | "
                         f"{f(r['ttft_ms_p50'])} / {f(r['ttft_ms_p99'])} | {f(r['itl_ms_p50'], '%.2f')} / "
                         f"{f(r['itl_ms_p99'], '%.2f')} | {f(peak and peak / 2**30, '%.2f')} | "
                         f"{f(used and used / 2**30, '%.2f')} |")
    if "peer" in res:
        p = res["peer"]
        lines += ["", f"Peer: {p.get('label', 'torch bf16 batched')}", "", "| N | output tok/s |", "|---|---|"]
        lines += [f"| {n} | {r['output_tok_s']:.0f} |" for n, r in p["levels"].items()]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {f"qsparse {k}": v["levels"] for k, v in res["runs"].items()}
    if "peer" in res:
        series[res["peer"].get("label", "torch bf16 batched")] = res["peer"]["levels"]
    for label, levels in series.items():
        xs = [int(n) for n in levels]
        ax.plot(xs, [levels[str(n)]["output_tok_s"] for n in xs], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"HTTP serving, {res['prompt_len']}+{res['new_tokens']} tokens, {res['card']}")
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
    p.add_argument("--rounds", type=int, default=None, help="requests per client (default: enough for "
                                                               "--min-requests per level)")
    p.add_argument("--min-requests", type=int, default=32, help="requests per level at least (default: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card", default=None, help="label for the results (default: from the server or 'cpu')")
    p.add_argument("--peer", action="store_true", help="with --launch --shape: also run the batched torch bf16 "
                                                          "peer in-process at batch = N (peer_numbers)")
    p.add_argument("--peer-json", default=None, help="merge the batched torch bf16 peer's results (merge_peer)")
    p.add_argument("--json", default=None, help="output (default bench/results/serve-<card>.json)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if bool(args.url) == bool(args.launch):
        p.error("give exactly one of --url and --launch")
    res: dict[str, Any] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                           "concurrency": args.concurrency, "runs": {}}
    if args.url:
        print(f"benchmarking {args.url}", file=sys.stderr)
        run = bench_server(args.url.rstrip("/"), args)
        res["runs"][run["model"]] = run
    else:
        for s in ([x.strip() for x in args.sparsity.split(",")] if args.sparsity else [None]):
            with LaunchedServer(args, s) as server:
                print(f"S={s}:", file=sys.stderr)
                run = bench_server(server.url, args)
            res["runs"][f"S={s}" if s is not None else run["model"]] = run
    card = args.card
    if card is None:
        try:
            import torch

            card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except ImportError:
            card = "cpu"
    res["card"] = card
    if args.peer_json:
        merge_peer(res, json.loads(Path(args.peer_json).read_text()))
    elif args.peer:
        if not args.launch or args.model:
            p.error("--peer needs --launch with --shape")
        merge_peer(res, peer_numbers(args.shape, args.concurrency, args.prompt_len, args.new_tokens))
    slug = card.split()[-1].lower() if card != "cpu" else "cpu"
    out = Path(args.json or f"bench/results/serve-{slug}.json")
    write_outputs(res, out)
    print(f"wrote {out} (+ .md, .png)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
