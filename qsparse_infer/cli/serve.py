"""`qsparse serve [MODEL]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for one model.

MODEL is an engine file (default: the built-in model); `--shape 2b4t --sparsity 0.6` serves random weights
of a benchmark shape instead (generated on the device, no tokenizer: prompts are token ids).

Every option is checked before the model loads, and a bad one is one line and exit status 1 (`--port 99999`,
`--max-batch 0`, `--max-len -5`, a taken port...)."""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from ..engine import Engine, _pick_device
from ..model.config import SparsityConfig
from ..serving import DEFAULT_MAX_SLOTS, make_runner
from ..serving.scheduler import Scheduler

DEFAULT_MAX_REQUEST_BYTES = 8 * 2 ** 20  # = serving.api.DEFAULT_MAX_REQUEST_BYTES (not imported: FastAPI is optional)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="engine file (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port, 1-65535 (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument("--sparsity", default=None, help="override the model's ratios: one value or attn,o,mlp,down")
    p.add_argument("--shape", choices=("2b4t", "8b"), default=None,
                   help="serve random weights of this shape instead of a file (benchmarks; token-id prompts)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="sequences decoded together (KV-cache slots); default 8 on the CPU, 64 on the GPU")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503s (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per scheduler step, all requests together (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per slot (prompt + output), at most the model's context; default the model's context")
    p.add_argument("--kv-cache", choices=("bf16", "fp32"), default="bf16", help="GPU KV-cache precision (default: %(default)s)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: from the file)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body; larger ones get a 413 before they are read (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open client connections; past it the oldest connection that has not sent a request "
                        "is closed (default: 4096, or fewer if the open-file limit is lower)")
    p.add_argument("--timeout-header", type=float, default=10.0,
                   help="seconds a connection has to send a complete request head (default: %(default)s)")
    p.add_argument("--timeout-body", type=float, default=30.0,
                   help="seconds a request body may stall between two reads before a 408 (default: %(default)s)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="(default: %(default)s)")


def validate_args(args: argparse.Namespace) -> None:
    """One ValueError naming the first bad option (the caller prints it as one line, exit 1)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for flag, value, lo in (("--max-batch", args.max_batch, 1), ("--max-len", args.max_len, 1),
                            ("--max-queue", args.max_queue, 0), ("--prefill-chunk", args.prefill_chunk, 1),
                            ("--max-request-bytes", args.max_request_bytes, 1),
                            ("--max-connections", args.max_connections, 1)):
        if value is not None and value < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {value}")
    for flag, value in (("--timeout-header", args.timeout_header), ("--timeout-keep-alive", args.timeout_keep_alive),
                        ("--timeout-body", args.timeout_body)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a number of seconds > 0, got {value}")
    if args.model_name is not None:
        if not args.model_name.strip():
            raise ValueError("--model-name must not be empty")
        try:
            args.model_name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--model-name is not valid Unicode") from None
    if args.shape is not None and args.model is not None:
        raise ValueError("give either a model file or --shape, not both")


def load_engine(args: argparse.Namespace) -> tuple[Any, str]:
    """(engine, default model id) for the command's model options."""
    if args.shape is None:
        engine = Engine.load(args.model, device=args.device, sparsity=args.sparsity, kv_cache=args.kv_cache)
        return engine, Path(args.model).stem if args.model else "shakespeare"
    if args.model is not None:
        raise ValueError("give either a model file or --shape, not both")
    from ..model.random_model import SHAPES, random_engine

    device = _pick_device(args.device)
    sparsity = SparsityConfig.parse(args.sparsity) if args.sparsity else SparsityConfig()
    ef = random_engine(SHAPES[args.shape], sparsity, device=device, seed=0)
    return Engine(ef, device, sparsity, args.kv_cache), f"random-{args.shape}-s{args.sparsity or 0}"


def gpu_memory_probe() -> tuple[Any, Any]:
    """(memory(), reset_peak()) for /metrics/json: torch's allocator peak and the device-wide use."""
    import torch

    def memory() -> dict[str, Any]:
        free, total = torch.cuda.mem_get_info()
        return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "gpu_allocated_bytes": torch.cuda.memory_allocated(), "gpu_used_bytes": total - free,
                "gpu_total_bytes": total}

    return memory, torch.cuda.reset_peak_memory_stats


def app_for_engine(engine: Any, model_name: str, max_batch: int | None = None, max_queue: int = 256,
                   prefill_chunk: int = 256, max_len: int | None = None,
                   max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, body_timeout: float = 30.0):
    """The FastAPI app serving `engine` (its scheduler thread starts with the app)."""
    from ..serving.api import create_app

    device = "cuda" if engine.gpu is not None else "cpu"
    slots = DEFAULT_MAX_SLOTS[device] if max_batch is None else max_batch
    if slots < 1:
        raise ValueError(f"--max-batch must be >= 1, got {slots}")
    context = engine.config.max_seq_len
    if max_len is not None and not 1 <= max_len <= context:
        raise ValueError(f"--max-len must be in 1..{context} (the model's context), got {max_len}")
    runner = make_runner(engine, slots, context if max_len is None else max_len)
    scheduler = Scheduler(runner, engine.tokenizer, max_queue=max_queue, prefill_chunk=prefill_chunk)
    memory, reset = gpu_memory_probe() if device == "cuda" else (None, None)
    info = {"device": device, "sparsity": engine.sparsity.describe(), "runner": type(runner).__name__,
            "vocab_size": engine.config.vocab_size}
    return create_app(scheduler, model_name, info=info, memory=memory, reset_peak=reset,
                      max_request_bytes=max_request_bytes, body_timeout=body_timeout)


def build_app(args: argparse.Namespace):
    engine, default_name = load_engine(args)
    return app_for_engine(engine, args.model_name or default_name, args.max_batch, args.max_queue,
                          args.prefill_chunk, args.max_len, args.max_request_bytes, args.timeout_body)


def run(args: argparse.Namespace) -> int:
    validate_args(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from ..serving.api import RequestLog
        from ..serving.server import (ConnectionLimits, connection_limit_for, listening_socket, make_server,
                                      raise_open_file_limit)
    except ImportError as e:
        raise RuntimeError(f"qsparse serve needs FastAPI and uvicorn ({e}): pip install 'qsparse-infer[serve]'") from None

    limits = ConnectionLimits(max_connections=connection_limit_for(args.max_connections, raise_open_file_limit()),
                              header_timeout=args.timeout_header, keep_alive_timeout=args.timeout_keep_alive)
    sock = listening_socket(args.host, args.port)  # a taken port fails here, before the model loads
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        app = build_app(args)
        logging.getLogger("qsparse.serve").info("listening on http://%s:%d (at most %d connections)", args.host,
                                                args.port, limits.max_connections)
        make_server(RequestLog(app), limits, log_level=args.log_level).run(sockets=[sock])
    finally:
        sock.close()
    return 0
