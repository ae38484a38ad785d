"""/metrics in Prometheus text format with vLLM's names, against a real server on loopback; the JSON the
server used to serve there is at /metrics/json."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")
from qsparse_infer.engine import Engine  # noqa: E402
from qsparse_infer.serving import metrics as metrics_mod  # noqa: E402
from qsparse_infer.serving.api import create_app  # noqa: E402
from qsparse_infer.serving.runner import CpuRunner  # noqa: E402
from qsparse_infer.serving.scheduler import GenerationRequest, Scheduler  # noqa: E402
from serving_helpers import ServerThread  # noqa: E402

MODEL = "bard"
pytestmark = pytest.mark.filterwarnings("ignore:.*CPU.*:UserWarning")


@pytest.fixture(scope="module")
def engine():
    return Engine.load(None, device="cpu")


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {labels as sorted tuple: value}}"""
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in parser.text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(samples: dict[str, dict[tuple, float]], name: str, **labels) -> float:
    want = tuple(sorted({"model_name": MODEL, **labels}.items()))
    return samples[name][want]


def test_prometheus_metrics_follow_the_requests(engine):
    sched = Scheduler(CpuRunner(engine, 2), engine.tokenizer, max_queue=8)
    app = create_app(sched, MODEL)
    prompt = "ROMEO:"
    n_prompt = len(engine.tokenizer.encode(prompt))
    with ServerThread(app) as s:
        before = scrape(s.url)
        assert one(before, "vllm:num_requests_running") == 0 and one(before, "vllm:num_requests_waiting") == 0
        assert one(before, "vllm:kv_cache_usage_perc") == 0.0
        assert one(before, "vllm:generation_tokens_total") == 0

        async def load():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as ac:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
                rs = await asyncio.gather(*(ac.post("/v1/completions", json=body) for _ in range(3)),
                                          ac.post("/v1/completions", json={**body, "stream": True}))
                return [r.status_code for r in rs]

        assert asyncio.run(load()) == [200] * 4
        assert httpx.post(s.url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert httpx.post(s.url + "/v1/completions", content=b"{}", headers={"content-type": "text/plain"}
                          ).status_code == 415
        after = scrape(s.url)
    assert one(after, "vllm:generation_tokens_total") == 4 * 6
    assert one(after, "vllm:prompt_tokens_total") == 4 * n_prompt
    assert one(after, "vllm:request_success_total", finished_reason="length") == 4
    assert one(after, "vllm:time_to_first_token_seconds_count") == 4
    assert one(after, "vllm:inter_token_latency_seconds_count") == 4 * 5
    assert one(after, "vllm:e2e_request_latency_seconds_count") == 4
    assert one(after, "vllm:request_generation_tokens_sum") == 4 * 6
    assert 0 < one(after, "vllm:time_to_first_token_seconds_sum") < one(after, "vllm:e2e_request_latency_seconds_sum")
    assert one(after, "vllm:time_to_first_token_seconds_bucket", le="+Inf") == 4
    assert one(after, "qsparse:http_responses_total", path="/v1/completions", status="200") == 4
    assert one(after, "qsparse:http_responses_total", path="/v1/completions", status="404") == 1
    assert one(after, "qsparse:http_responses_total", path="/v1/completions", status="415") == 1
    assert one(after, "vllm:num_requests_running") == 0 and one(after, "qsparse:max_slots") == 2


def test_running_waiting_and_cache_usage_come_from_the_scheduler(engine):
    """A scheduler that is never stepped: what is submitted stays admitted-or-waiting, as the gauges say."""
    sched = Scheduler(CpuRunner(engine, 2), engine.tokenizer, max_queue=8)
    for _ in range(3):
        sched.submit(GenerationRequest([1, 2, 3], max_tokens=2), lambda ev: None)
    sched.step()  # admits two into the two slots
    app = create_app(sched, MODEL, manage_scheduler=False)

    async def get(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            return await ac.get(path)

    text = asyncio.run(get("/metrics")).text
    samples = {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples}
    assert samples["vllm:num_requests_running"] == 2 and samples["vllm:num_requests_waiting"] == 1
    assert samples["vllm:kv_cache_usage_perc"] == 1.0 and samples["vllm:gpu_cache_usage_perc"] == 1.0
    js = asyncio.run(get("/metrics/json")).json()
    assert js["scheduler"]["active"] == 2 and js["scheduler"]["waiting"] == 1 and js["model"] == MODEL


def test_each_app_has_its_own_registry(engine):
    apps = [create_app(Scheduler(CpuRunner(engine, 1), engine.tokenizer), MODEL, manage_scheduler=False)
            for _ in range(2)]
    a, b = (app.state.metrics for app in apps)
    a.generation_tokens.inc(5)
    assert a.registry is not b.registry
    assert b"vllm:generation_tokens_total{model_name=\"bard\"} 0.0" in b.render()[0]
    assert b"vllm:generation_tokens_total{model_name=\"bard\"} 5.0" in a.render()[0]


def test_without_prometheus_client_metrics_says_what_to_install(engine, monkeypatch):
    monkeypatch.setattr(metrics_mod, "CollectorRegistry", None)
    app = create_app(Scheduler(CpuRunner(engine, 1), engine.tokenizer), MODEL, manage_scheduler=False)

    async def get(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            return await ac.get(path)

    r = asyncio.run(get("/metrics"))
    assert r.status_code == 503 and "pip install prometheus-client" in r.json()["error"]["message"]
    assert asyncio.run(get("/metrics/json")).json()["status"] == "ok"
