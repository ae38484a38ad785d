"""The HTTP server on the GPU runner (GpuBatchRunner): plumbing across threads, batching and metrics. Exactness
of the batched rows is tested at the runner level (tests/serving/test_serving_gpu.py); here each request's first token
(its own prefill, never batched with others) must match the same request sent alone."""
from __future__ import annotations

import asyncio

import pytest
from conftest import requires_gpu

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from qsparse_infer.cli.serve import app_for_engine  # noqa: E402
from qsparse_infer.engine import Engine  # noqa: E402
from serving_helpers import ServerThread  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu]
MODEL = "bard"


def test_http_server_on_the_gpu_runner():
    engine = Engine.load(None, device="cuda")
    app = app_for_engine(engine, MODEL, max_batch=8, max_queue=16, prefill_chunk=64)
    prompts = ["ROMEO:", "JULIET: O Romeo", "KING HENRY:\nWhat", "First Citizen:\nBefore we proceed",
               "HAMLET:", "Now is the winter", "MERCUTIO:\nNay", "O, what a rogue"]
    lengths = [40, 17, 33, 64, 5, 48, 21, 56]

    def body(p, n, **kw):
        return {"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, **kw}

    with ServerThread(app) as s:
        health = httpx.get(s.url + "/health").json()
        assert health["device"] == "cuda" and health["runner"] == "GpuBatchRunner"
        alone = [httpx.post(s.url + "/v1/completions", json=body(p, n), timeout=120).json()
                 for p, n in zip(prompts, lengths)]

        async def together():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/completions", json=body(p, n))
                                            for p, n in zip(prompts, lengths)))
                return [r.json() for r in rs]

        batched = asyncio.run(together())
        for a, b, n in zip(alone, batched, lengths):
            for r in (a, b):
                assert r["choices"][0]["finish_reason"] == "length"
                assert r["usage"]["completion_tokens"] == n and len(r["choices"][0]["token_ids"]) == n
            assert a["choices"][0]["token_ids"][0] == b["choices"][0]["token_ids"][0]
        seeded = [httpx.post(s.url + "/v1/completions", json=body("ROMEO:", 24, temperature=0.8, seed=5),
                             timeout=120).json()["choices"][0]["text"] for _ in range(2)]
        assert seeded[0] == seeded[1] and seeded[0]
        metrics = httpx.get(s.url + "/metrics/json").json()
        assert metrics["memory"]["gpu_peak_allocated_bytes"] > 0 and metrics["memory"]["gpu_used_bytes"] > 0
        st = metrics["scheduler"]
        assert (st["active"], st["waiting"], st["free_slots"], st["errors"]) == (0, 0, 8, 0)
        prom = httpx.get(s.url + "/metrics")
        if prom.status_code == 200:  # prometheus-client installed on the machine
            assert 'vllm:generation_tokens_total{model_name="bard"}' in prom.text
            assert 'vllm:num_requests_running{model_name="bard"} 0.0' in prom.text
        else:
            assert prom.status_code == 503 and "prometheus-client" in prom.text
