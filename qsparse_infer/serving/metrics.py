"""Prometheus metrics of one app (prometheus-client; one CollectorRegistry per app, so that apps built side
by side, as the tests do, never share series). Names follow vLLM's where one exists, so its dashboards work:

- vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds (histograms: from the request's
  arrival to its first token, and between tokens as they reach the HTTP layer; tokens that arrive together
  count one gap and zeros, as a client sees them), vllm:e2e_request_latency_seconds,
  vllm:request_prompt_tokens, vllm:request_generation_tokens (per finished request);
- vllm:num_requests_running, vllm:num_requests_waiting (gauges, read from the scheduler at scrape time);
- vllm:kv_cache_usage_perc (and its older name vllm:gpu_cache_usage_perc): the fraction (0..1) of the KV
  pool that requests hold. Each slot of the pool is reserved whole (max_len positions) while a request
  holds it, so this is occupied slots / slots, the same quantity as vLLM's allocated blocks / blocks;
- vllm:prompt_tokens_total, vllm:generation_tokens_total (counters);
- vllm:request_success_total{finished_reason="stop"|"length"|"abort"|"error"};
- qsparse:http_responses_total{path, status}: every HTTP answer, the rejected ones included.

Every series carries model_name, as vLLM's do. Without prometheus-client installed the server still runs:
/metrics then answers 503 saying what to install.
"""
from __future__ import annotations

import time
from typing import Any, Callable

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError:  # pragma: no cover - exercised by test_metrics_without_prometheus_client
    CollectorRegistry = None

# Our steps take ~1-10 ms on the GPU and ~10-100 ms on the CPU: the buckets resolve both.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                         "/metrics/json", "/metrics/reset_peak"})


def available() -> bool:
    return CollectorRegistry is not None


class RequestTimer:
    """The timeline of one generation (one choice of a request), fed from the event loop."""

    __slots__ = ("metrics", "t0", "last", "generated", "done")

    def __init__(self, metrics: "ServingMetrics", t0: float) -> None:
        self.metrics, self.t0, self.last, self.generated, self.done = metrics, t0, None, 0, False

    def tokens(self, n: int, prompt_tokens: int) -> None:
        """`n` new tokens arrived now (`prompt_tokens`: the prompt's length, counted once prefilled)."""
        if n <= 0 or self.metrics.disabled:
            return
        now = time.perf_counter()
        m = self.metrics
        if self.last is None:
            m.ttft.observe(now - self.t0)
            m.prompt_tokens.inc(prompt_tokens)
        else:
            m.itl.observe(now - self.last)
        for _ in range(n - 1):
            m.itl.observe(0.0)
        self.last = now
        self.generated += n
        m.generation_tokens.inc(n)

    def finished(self, reason: str, prompt_tokens: int) -> None:
        if self.done or self.metrics.disabled:
            return
        self.done = True
        m = self.metrics
        if self.last is None and prompt_tokens and reason in ("stop", "length"):
            m.prompt_tokens.inc(prompt_tokens)  # prefilled, but no token shown (EOS first, or max_tokens 0)
        m.success.labels(m.model_name, FINISH_REASONS.get(reason, "error")).inc()
        m.e2e.observe(time.perf_counter() - self.t0)
        m.request_prompt.observe(prompt_tokens)
        m.request_generation.observe(self.generated)


class ServingMetrics:
    def __init__(self, model_name: str, scheduler_stats: Callable[[], dict[str, Any]]) -> None:
        self.model_name = model_name
        self.disabled = not available()
        if self.disabled:
            return
        self.registry = CollectorRegistry(auto_describe=True)
        labels, reg, m = ["model_name"], self.registry, model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, from the request's "
                              "arrival", labels, registry=reg, buckets=TTFT_BUCKETS).labels(m)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens of one request",
                             labels, registry=reg, buckets=ITL_BUCKETS).labels(m)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             labels, registry=reg, buckets=E2E_BUCKETS).labels(m)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request",
                                        labels, registry=reg, buckets=TOKEN_BUCKETS).labels(m)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per finished "
                                            "request", labels, registry=reg, buckets=TOKEN_BUCKETS).labels(m)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens", labels,
                                     registry=reg).labels(m)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels,
                                         registry=reg).labels(m)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason",
                               ["model_name", "finished_reason"], registry=reg)
        self.responses = Counter("qsparse:http_responses", "HTTP responses by path and status",
                                 ["model_name", "path", "status"], registry=reg)
        reg.register(_SchedulerCollector(model_name, scheduler_stats))

    def start_request(self) -> RequestTimer:
        return RequestTimer(self, time.perf_counter())

    def response(self, path: str, status: int) -> None:
        if not self.disabled:
            self.responses.labels(self.model_name, path if path in KNOWN_PATHS else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SchedulerCollector:
    """Gauges read from Scheduler.stats() when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.model_name, self.stats = model_name, stats

    def describe(self) -> list:
        return []  # the gauges exist only at collect time

    def collect(self):
        st = self.stats()
        slots = max(1, int(st.get("max_slots", 1)))
        usage = int(st.get("active", 0)) / slots
        for name, help_, value in (
                ("vllm:num_requests_running", "Requests holding a slot (prefilling or decoding)", st.get("active", 0)),
                ("vllm:num_requests_waiting", "Requests waiting for a slot", st.get("waiting", 0)),
                ("vllm:kv_cache_usage_perc", "Fraction of the KV pool held by requests (0..1)", usage),
                ("vllm:gpu_cache_usage_perc", "Fraction of the KV pool held by requests (0..1; older name)", usage),
                ("qsparse:max_slots", "KV-cache slots (sequences decoded together)", slots)):
            g = GaugeMetricFamily(name, help_, labels=["model_name"])
            g.add_metric([self.model_name], float(value))
            yield g


class ResponseCounter:
    """ASGI middleware: counts every HTTP answer by path and status (those of the guards outside FastAPI's
    routing included)."""

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(scope.get("path", ""), message["status"])
            await send(message)

        await self.app(scope, receive, counted)
