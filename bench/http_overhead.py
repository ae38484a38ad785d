"""What the HTTP layer costs, with no model: `qsparse serve`'s app and scheduler over a fake runner whose step
takes a fixed time (`--step-ms`, as a GPU step of B rows would) and samples token ids (no tokenizer, as the
random-weight benchmark servers). N closed-loop streaming clients in another process; the ceiling is what
the fake runner could deliver, N tokens per step: N / step_ms. The ratio is the HTTP layer's (plus the
scheduler's) share of issue 17's "HTTP / runner" target, measured without a GPU.

    python bench/http_overhead.py --step-ms 5 --concurrency 1,16,64 --new-tokens 128
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx


def serve(port: int, slots: int, step_ms: float) -> None:
    """The server process: the real app, scheduler and hardened uvicorn, a runner that only sleeps."""
    from qsparse_infer.serving.api import RequestLog, create_app
    from qsparse_infer.serving.runner import DoneHandle, StepResult
    from qsparse_infer.serving.scheduler import Scheduler
    from qsparse_infer.serving.server import ConnectionLimits, listening_socket, make_server

    class SleepRunner:
        asynchronous = False
        vocab_size = 32000

        def __init__(self) -> None:
            self.max_slots, self.max_len = slots, 4096
            self.last = [0] * slots

        def begin(self, slot, settings, seed, logprobs=None) -> None:
            self.last[slot] = seed % 1000

        def launch(self, plan):
            t_end = time.perf_counter() + step_ms / 1e3
            res = StepResult([], [], [], [], [])
            for c in plan.prefills:
                res.prefill_tokens.append(self._next(c.slot) if c.sample else None)
                res.prefill_logprobs.append(None)
                res.prompt_logprobs.append(None)
            for s in plan.decode:
                res.decode_tokens.append(self._next(s))
                res.decode_logprobs.append(None)
            time.sleep(max(0.0, t_end - time.perf_counter()))
            return DoneHandle(res)

        def _next(self, slot: int) -> int:
            self.last[slot] = 100 + (self.last[slot] * 7 + 1) % 30000
            return self.last[slot]

        def release(self, slot) -> None:
            pass

    sched = Scheduler(SleepRunner(), None, max_queue=4 * slots, prefill_chunk=4096)
    app = create_app(sched, "fake")
    sock = listening_socket("127.0.0.1", port)
    make_server(RequestLog(app), ConnectionLimits(), log_level="warning").run(sockets=[sock])


async def one(ac: httpx.AsyncClient, new_tokens: int) -> tuple[float, list[float], int]:
    body = {"model": "fake", "prompt": list(range(100, 228)), "max_tokens": new_tokens, "stream": True,
            "ignore_eos": True, "return_token_ids": True, "temperature": 0}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                for c in json.loads(line[6:]).get("choices", []):
                    stamps.extend([now] * len(c.get("token_ids") or []))
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


async def level(url: str, n: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as ac:
        async def client() -> list:
            return [await one(ac, new_tokens) for _ in range(rounds)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(n))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    itl = sorted(x for r in results for x in r[1])
    return {"n": n, "tok_s": tokens / wall, "ttft_ms_p50": 1e3 * statistics.median(r[0] for r in results),
            "itl_ms_p50": 1e3 * itl[len(itl) // 2], "itl_ms_p99": 1e3 * itl[int(len(itl) * 0.99)]}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), all its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: run the server
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.slots, args.step_ms)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--slots", str(args.slots),
                             "--step-ms", str(args.step_ms)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.2)
        asyncio.run(level(url, 1, 8, 1))  # warm-up
        rows = []
        for n in (int(x) for x in args.concurrency.split(",")):
            cpu0 = _cpu_seconds(proc.pid)
            r = asyncio.run(level(url, n, args.new_tokens, args.rounds))
            r["server_cpu_us_per_token"] = 1e6 * (_cpu_seconds(proc.pid) - cpu0) / (n * args.rounds * args.new_tokens)
            ceiling = min(n, args.slots) / (args.step_ms / 1e3)
            r["ceiling_tok_s"], r["ratio"] = ceiling, r["tok_s"] / ceiling
            rows.append(r)
            print(f"N={n:3d}: {r['tok_s']:8.0f} tok/s of {ceiling:8.0f} ({100 * r['ratio']:.0f}%)  TTFT p50 "
                  f"{r['ttft_ms_p50']:.1f} ms  ITL p50 {r['itl_ms_p50']:.2f} ms p99 {r['itl_ms_p99']:.2f} ms  "
                  f"server CPU {r['server_cpu_us_per_token']:.0f} us/token", flush=True)
        if args.json:
            from qsparse_infer.atomic_io import write_json

            write_json(args.json, {"step_ms": args.step_ms, "new_tokens": args.new_tokens, "levels": rows,
                                          "cpus": os.cpu_count()})
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
