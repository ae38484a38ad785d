"""Soak test of a qsparse server: N streaming clients for T seconds; every response must be complete and correct.

Each client sends greedy completions back to back, each on one of a fixed pool of prompts (random token ids,
`ignore_eos`, `return_token_ids`). Before the soak, every prompt of the pool is run alone (not streamed) to get
its reference token ids. During it, a response counts as good only if it streams to `data: [DONE]` with HTTP 200,
ends with finish_reason "length", carries exactly --max-tokens token ids, and those ids equal the prompt's
reference (greedy decoding is deterministic, and a batched row must give what the row gives alone). Afterwards
the server's scheduler must show no active or waiting request and every slot free.

Mixed in (issue 17): the hostile-input battery of bench/hostile.py (its light cases, again and again, from one
more client: bad JSON, wrong types, 413 / 415, huge headers, half-open connections, ...; `--hostile heavy` adds
the 100 MB bodies and the connection flood once), every answer checked; and, for a launched server, its RSS,
sampled through the soak: at the end at most 10% above its level after the first 10 s (medians of windows). Exit code 1 on any lost,
failed or corrupted response, any wrong hostile answer, a leaked slot, or RSS growth.

  python bench/soak.py --url http://127.0.0.1:8000 --clients 64 --seconds 120
  python bench/soak.py --launch --shape 2b4t --sparsity 0.6 --clients 64 --seconds 120   # on a GPU machine
  python bench/soak.py --launch --device cpu --clients 64 --seconds 120                  # built-in model
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import LaunchedServer, server_state  # noqa: E402  (starts `qsparse serve`; its JSON status)

try:  # the hostile battery as client code (bench/hostile.py); the soak runs without it where it is missing
    import hostile  # noqa: E402
except ImportError:  # pragma: no cover
    hostile = None

from qsparse_infer.atomic_io import write_json  # noqa: E402


async def reference_ids(ac: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    r = await ac.post("/v1/completions", json=body)
    r.raise_for_status()
    ids = r.json()["choices"][0].get("token_ids")
    if not isinstance(ids, list) or len(ids) != max_tokens:
        raise RuntimeError(f"the reference request returned {ids!r}")
    return ids


async def streamed(ac: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    """(token ids, finish_reason) of one streamed greedy request; raises on anything malformed."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": True}
    ids: list[int] = []
    finish, done = None, False
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error'].get('message')}")
            for c in chunk.get("choices", []):
                ids.extend(c.get("token_ids") or [])
                finish = c.get("finish_reason") or finish
    if not done:
        raise RuntimeError("the stream ended without data: [DONE]")
    return ids, str(finish)


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


async def hostile_loop(url: str, model: str, stop_at: float, heavy: bool) -> dict[str, Any]:
    """The battery's light cases over and over until stop_at (heavy: the heavy ones once first); the cases that
    only wait for the server's timeouts are left out of the loop."""
    if hostile is None:
        return {"skipped": "bench/hostile.py not found"}
    rounds, cases, problems = 0, 0, []
    if heavy:
        res = await hostile.run_battery(url, model, heavy=True, only=set(hostile.HEAVY))
        cases += len(res)
        problems += hostile.problems(res)
    while time.perf_counter() < stop_at:
        res = await hostile.run_battery(url, model, skip=set(hostile.SLOW))
        rounds += 1
        cases += len(res)
        problems += [f"round {rounds}: {p}" for p in hostile.problems(res)]
        await asyncio.sleep(0.2)
    return {"rounds": rounds, "cases": cases, "problems": problems[:20], "wrong_answers": len(problems)}


async def soak(url: str, clients: int, seconds: float, max_tokens: int, prompt_len: int, pool: int,
               seed: int, hostile_mode: str = "light", pid: int | None = None) -> dict[str, Any]:
    health = httpx.get(url + "/health", timeout=30).json()
    model, vocab = health["model"], int(health.get("vocab_size") or 1000)
    rng = random.Random(seed)
    prompts = [[rng.randrange(min(100, vocab - 1), vocab) for _ in range(prompt_len)] for _ in range(pool)]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    rss: list[tuple[float, int]] = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as ac:
        refs = [await reference_ids(ac, model, p, max_tokens) for p in prompts]
        counts = {"good": 0, "failed": 0, "corrupted": 0}
        problems: list[str] = []
        t_start = time.perf_counter()
        stop_at = t_start + seconds

        async def client(k: int) -> None:
            local = random.Random(seed * 7919 + k)
            while time.perf_counter() < stop_at:
                i = local.randrange(pool)
                try:
                    ids, finish = await streamed(ac, model, prompts[i], max_tokens)
                except Exception as e:  # a lost or malformed response: counted, reported, the soak goes on
                    counts["failed"] += 1
                    problems.append(f"client {k}: {type(e).__name__}: {e}")
                    continue
                if ids != refs[i] or finish != "length":
                    counts["corrupted"] += 1
                    problems.append(f"client {k}, prompt {i}: {len(ids)} ids, finish {finish!r}, "
                                    f"{'equal' if ids == refs[i] else 'different'} to the reference")
                else:
                    counts["good"] += 1

        async def sample_rss() -> None:
            while pid is not None and time.perf_counter() < stop_at:
                value = rss_bytes(pid)
                if value is not None:
                    rss.append((time.perf_counter() - t_start, value))
                await asyncio.sleep(1.0)

        jobs = [client(k) for k in range(clients)] + [sample_rss()]
        if hostile_mode != "off":
            jobs.append(hostile_loop(url, model, stop_at, hostile_mode == "heavy"))
        done = await asyncio.gather(*jobs)
        wall = time.perf_counter() - t_start
        await asyncio.sleep(1.0)  # let cancelled / finished requests leave their slots
        after = (await server_state(ac)).get("scheduler", {})
    if pid is not None and (value := rss_bytes(pid)) is not None:
        rss.append((wall, value))
    hostile_res = done[-1] if hostile_mode != "off" else {"skipped": "--hostile off"}
    leaks = []
    if after.get("active", 0) or after.get("waiting", 0):
        leaks.append(f"{after.get('active')} active / {after.get('waiting')} waiting after the soak")
    if "free_slots" in after and after["free_slots"] != after.get("max_slots"):
        leaks.append(f"{after['free_slots']} of {after.get('max_slots')} slots free after the soak")
    rss_report: dict[str, Any] = {}
    if rss:
        # medians of a window after the warm-up and of the last sixth (single samples catch the transient peaks
        # of the battery's big-prompt cases); the check is for growth: a leak grows, freed memory does not count
        warm = [v for t, v in rss if min(10.0, seconds / 4) <= t <= max(min(10.0, seconds / 4) + 1, seconds / 3)]
        last = [v for t, v in rss if t >= wall * 5 / 6]
        base = statistics.median(warm or [rss[0][1]])
        end = statistics.median(last or [rss[-1][1]])
        rss_report = {"start_bytes": base, "end_bytes": end, "max_bytes": max(v for _, v in rss),
                      "end_over_start": end / base, "flat": end <= 1.10 * base, "samples": len(rss)}
    return {"model": model, "clients": clients, "seconds": wall, "max_tokens": max_tokens, "prompt_len": prompt_len,
            **counts, "tokens": counts["good"] * max_tokens, "problems": problems[:20], "leaks": leaks,
            "hostile": hostile_res, "rss": rss_report, "scheduler_after": after}


def passed(res: dict[str, Any]) -> bool:
    h = res["hostile"]
    return (res["failed"] == res["corrupted"] == 0 and not res["leaks"] and res["good"] > 0
            and not h.get("wrong_answers") and res["rss"].get("flat", True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="soak this running server (else --launch)")
    p.add_argument("--launch", action="store_true", help="start `qsparse serve` for the soak and stop it after")
    p.add_argument("--model", default=None, help="with --launch: engine file (default: the built-in model, or "
                                                  "--shape)")
    p.add_argument("--shape", default=None, help="with --launch: random weights of this shape (e.g. 2b4t)")
    p.add_argument("--sparsity", default=None, help="with --launch: the server's sparsity override")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-batch", type=int, default=None, help="with --launch: server slots (default: server's)")
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--pool", type=int, default=16, help="distinct prompts (each checked against its reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hostile", choices=("off", "light", "heavy"), default="light",
                   help="mix bench/hostile.py's battery in (default: light cases in a loop)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, to sample its RSS")
    p.add_argument("--json", default=None, help="write the summary here too")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.launch):
        p.error("give exactly one of --url and --launch")
    if args.clients < 1 or args.seconds <= 0 or args.max_tokens < 1 or args.prompt_len < 1 or args.pool < 1:
        p.error("--clients, --seconds, --max-tokens, --prompt-len and --pool must be positive")

    def run(url: str, pid: int | None) -> dict[str, Any]:
        return asyncio.run(soak(url, args.clients, args.seconds, args.max_tokens, args.prompt_len, args.pool,
                                args.seed, args.hostile, pid))

    if args.url:
        res = run(args.url.rstrip("/"), args.pid)
    else:
        launch = argparse.Namespace(port=args.port, prompt_len=args.prompt_len, new_tokens=args.max_tokens,
                                    model=args.model, shape=args.shape, max_batch=args.max_batch, prefill_chunk=None,
                                    concurrency=[args.clients], device=args.device)
        with _Server(launch, args.sparsity) as server:
            res = run(server.url, server.proc.pid)
    print(f"{res['clients']} clients, {res['seconds']:.0f} s: {res['good']} good, {res['failed']} failed, "
          f"{res['corrupted']} corrupted responses ({res['tokens']} tokens); leaks: {res['leaks'] or 'none'}")
    h, rss = res["hostile"], res["rss"]
    print("hostile battery: " + (h["skipped"] if "skipped" in h else
                                 f"{h['rounds']} rounds, {h['cases']} cases, {h['wrong_answers']} wrong answers"))
    if rss:
        print(f"server RSS: {rss['start_bytes'] / 2**20:.0f} MiB at 10 s -> {rss['end_bytes'] / 2**20:.0f} MiB at the "
              f"end ({rss['end_over_start']:.3f}x; max {rss['max_bytes'] / 2**20:.0f} MiB): "
              f"{'flat' if rss['flat'] else 'NOT flat'}")
    for line in res["problems"] + h.get("problems", []):
        print("  " + line)
    if args.json:
        write_json(args.json, res, newline=False)
    return 0 if passed(res) else 1


class _Server(LaunchedServer):
    """LaunchedServer, also for the built-in model (no engine file, no shape)."""

    def __init__(self, args: argparse.Namespace, sparsity: str | None) -> None:
        super().__init__(args, sparsity)
        if args.model is None and args.shape is None:
            i = self.cmd.index("--shape")
            del self.cmd[i:i + 2]


if __name__ == "__main__":
    sys.exit(main())
