"""`qsparse serve [MODEL]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for one model.

MODEL is an engine file (default: the built-in model); `--shape 2b4t --sparsity 0.6` serves random weights
of a benchmark shape instead (generated on the device, no tokenizer: prompts are token ids)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..engine import Engine, _pick_device
from ..model.config import SparsityConfig
from ..serving import DEFAULT_MAX_SLOTS, make_runner
from ..serving.scheduler import Scheduler


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="engine file (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument("--sparsity", default=None, help="override the model's ratios: one value or attn,o,mlp,down")
    p.add_argument("--shape", choices=("2b4t", "8b"), default=None,
                   help="serve random weights of this shape instead of a file (benchmarks; token-id prompts)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="sequences decoded together (KV-cache slots); default 8 on the CPU, 64 on the GPU")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503s (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per scheduler step, all requests together (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per slot (prompt + output); default the model's context")
    p.add_argument("--kv-cache", choices=("bf16", "fp32"), default="bf16", help="GPU KV-cache precision (default: %(default)s)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: from the file)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="(default: %(default)s)")


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
    """(memory(), reset_peak()) for /metrics: torch's allocator peak and the device-wide use."""
    import torch

    def memory() -> dict[str, Any]:
        free, total = torch.cuda.mem_get_info()
        return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "gpu_allocated_bytes": torch.cuda.memory_allocated(), "gpu_used_bytes": total - free,
                "gpu_total_bytes": total}

    return memory, torch.cuda.reset_peak_memory_stats


def app_for_engine(engine: Any, model_name: str, max_batch: int | None = None, max_queue: int = 256,
                   prefill_chunk: int = 256, max_len: int | None = None):
    """The FastAPI app serving `engine` (its scheduler thread starts with the app)."""
    from ..serving.api import create_app

    device = "cuda" if engine.gpu is not None else "cpu"
    slots = max_batch or DEFAULT_MAX_SLOTS[device]
    if slots < 1:
        raise ValueError(f"--max-batch must be >= 1, got {slots}")
    runner = make_runner(engine, slots, max_len or engine.config.max_seq_len)
    scheduler = Scheduler(runner, engine.tokenizer, max_queue=max_queue, prefill_chunk=prefill_chunk)
    memory, reset = gpu_memory_probe() if device == "cuda" else (None, None)
    info = {"device": device, "sparsity": engine.sparsity.describe(), "runner": type(runner).__name__,
            "vocab_size": engine.config.vocab_size}
    return create_app(scheduler, model_name, info=info, memory=memory, reset_peak=reset)


def build_app(args: argparse.Namespace):
    engine, default_name = load_engine(args)
    return app_for_engine(engine, args.model_name or default_name, args.max_batch, args.max_queue,
                          args.prefill_chunk, args.max_len)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serving.api import RequestLog
    except ImportError as e:
        raise RuntimeError(f"qsparse serve needs FastAPI and uvicorn ({e}): pip install 'qsparse-infer[serve]'") from None

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_app(args)
    logging.getLogger("qsparse.serve").info("listening on http://%s:%d", args.host, args.port)
    uvicorn.run(RequestLog(app), host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
