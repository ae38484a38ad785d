"""The HTTP server end to end on the CPU: a real uvicorn server on a loopback port, driven with the official
openai client and plain httpx. Greedy answers must equal Engine.generate(..., temperature=0)."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from qsparse_infer.engine import Engine  # noqa: E402
from qsparse_infer.serving.api import create_app  # noqa: E402
from qsparse_infer.cli.serve import app_for_engine  # noqa: E402
from qsparse_infer.serving.runner import CpuRunner  # noqa: E402
from qsparse_infer.serving.scheduler import GenerationRequest, Scheduler  # noqa: E402
from serving_helpers import ServerThread  # noqa: E402

MODEL = "bard"
SLOTS = 4
pytestmark = pytest.mark.filterwarnings("ignore:.*CPU.*:UserWarning")


@pytest.fixture(scope="module")
def engine(chat_engine):
    return chat_engine


@pytest.fixture(scope="module")
def server(engine):
    app = app_for_engine(engine, MODEL, max_batch=SLOTS, max_queue=32, prefill_chunk=64)
    with ServerThread(app) as s:
        s.scheduler = app.state.scheduler
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(engine, prompt, n, **kw):
    return engine.generate(prompt, max_new_tokens=n, temperature=0, **kw)


def wait_idle(server, timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        st = httpx.get(server.url + "/health").json()["scheduler"]
        if (st["active"], st["waiting"], st["free_slots"]) == (0, 0, SLOTS) or time.time() > deadline:
            return st
        time.sleep(0.05)


def test_completion_httpx_equals_engine_generate(server, engine):
    prompt = "ROMEO:"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0}, timeout=120)
    assert r.status_code == 200
    body = r.json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert choice["text"] == greedy(engine, prompt, 12)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(engine.tokenizer.encode(prompt)), "completion_tokens": 12,
                             "total_tokens": len(engine.tokenizer.encode(prompt)) + 12}


def test_completion_openai_client_stream_and_not(client, engine):
    prompt = "KING HENRY:\nWhat"
    expected = greedy(engine, prompt, 10)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_finishes_with_stop(client, engine):
    prompt = "JULIET:"
    ref = greedy(engine, prompt, 16)
    stop = ref.strip()[3:5]
    assert stop and stop in ref
    expected = greedy(engine, prompt, 16, stop=stop)
    assert expected == ref[:ref.find(stop)]
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_openai_client_stream_and_not(client, engine):
    messages = [{"role": "user", "content": "Speak, good sir."}]
    expected = engine.chat(messages, max_new_tokens=10, temperature=0)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == expected and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_seeded_sampling_equals_engine(client, engine):
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    expected = engine.generate("ROMEO:", max_new_tokens=10, top_k=40, **kw)
    got = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=10, extra_body={"top_k": 40}, **kw)
    assert got.choices[0].text == expected


def test_eight_concurrent_requests_equal_their_solo_results(server, engine):
    prompts = ["ROMEO:", "JULIET: O Romeo", "KING HENRY:\nWhat", "First Citizen:\nBefore we proceed",
               "HAMLET:", "Now is the winter", "MERCUTIO:\nNay", "O, what a rogue"]
    lengths = [4, 9, 6, 12, 3, 8, 5, 10]
    expected = [greedy(engine, p, n) for p, n in zip(prompts, lengths)]

    async def one(ac, p, n):
        r = await ac.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths)))

    assert asyncio.run(all_at_once()) == expected
    assert wait_idle(server)["free_slots"] == SLOTS


def test_disconnect_mid_stream_frees_the_slot(server, engine):
    before = server.scheduler.stats()
    with httpx.Client(base_url=server.url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 400,
                                                       "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip((x for x in lines if x.startswith("data:")), range(2))]
            assert len(got) == 2
    st = wait_idle(server)
    assert (st["active"], st["waiting"], st["free_slots"]) == (0, 0, SLOTS)
    assert st["finished"] == before["finished"] + 1
    assert st["completion_tokens"] - before["completion_tokens"] < 400  # stopped early, not run to the end
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "HAMLET:", "max_tokens": 3,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(engine, "HAMLET:", 3)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": [5] * 600}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": MODEL}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert "Traceback" not in r.text


def test_malformed_json_and_server_stays_up(server, engine):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "bard", "prompt": ',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 400
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_prompt_over_context_says_so(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt=[7] * 513, max_tokens=1)


def test_engine_exception_is_a_500_and_server_stays_up(server, engine, monkeypatch):
    runner = server.scheduler.runner

    def broken(plan):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(runner, "launch", broken)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
    monkeypatch.undo()
    assert wait_idle(server)["free_slots"] == SLOTS
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(engine, "ROMEO:", 5)


def test_nothing_leaked_at_the_end(server):
    st = wait_idle(server)
    assert (st["active"], st["waiting"], st["free_slots"]) == (0, 0, SLOTS)


# -- in-process app (no server): paths that need no generation -------------------------------------


class _IdleRunner:
    max_slots, max_len, vocab_size = 1, 32, 4096


def _asgi_post(app, path, body):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await ac.post(path, json=body)
    return asyncio.run(go())


def test_queue_full_is_503(engine):
    sched = Scheduler(_IdleRunner(), engine.tokenizer, max_queue=0)  # never stepped: the slot stays taken
    sched.submit(GenerationRequest([1, 2]), lambda ev: None)
    app = create_app(sched, MODEL, manage_scheduler=False)
    r = _asgi_post(app, "/v1/completions", {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"


def test_chat_without_template_is_a_clear_400():
    plain = Engine.load(None, device="cpu")  # the built-in model: its tokenizer has no chat template
    sched = Scheduler(CpuRunner(plain, 1), plain.tokenizer)
    app = create_app(sched, MODEL, manage_scheduler=False)
    r = _asgi_post(app, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_engine_generate_on_a_list_equals_each_prompt(engine):
    prompts = ["ROMEO:", "JULIET: O Romeo", engine.tokenizer.encode("HAMLET:")]
    for kw in (dict(temperature=0), dict(temperature=0.8, top_k=20, seed=7), dict(temperature=0, stop="e")):
        batch = engine.generate(prompts, max_new_tokens=8, **kw)
        assert batch == [engine.generate(p, max_new_tokens=8, **kw) for p in prompts]
    assert engine.generate(prompts, max_new_tokens=8, temperature=0, max_batch=2) == \
        engine.generate(prompts, max_new_tokens=8, temperature=0)


def test_serve_help_shows_defaults(capsys):
    from qsparse_infer.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--port" in out and "8000" in out and "127.0.0.1" in out and "--max-batch" in out


def test_bench_client_against_the_server(server, tmp_path):
    """bench/serve.py end to end on a tiny load: every level reports its tokens, latencies and outputs."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(concurrency=[1, 2], rounds=1, min_requests=1, prompt_len=8, new_tokens=3, seed=0)
    run = bench.bench_server(server.url, args)
    assert run["model"] == MODEL and set(run["levels"]) == {"1", "2"}
    for n, level in run["levels"].items():
        assert level["requests"] == int(n) and level["output_tokens"] == 3 * int(n)
        assert level["output_tok_s"] > 0 and level["ttft_ms_p50"] > 0 and level["itl_ms_p50"] > 0
    res = {"prompt_len": 8, "new_tokens": 3, "concurrency": [1, 2], "card": "cpu", "runs": {MODEL: run}}
    bench.write_outputs(res, tmp_path / "serve-cpu.json")
    assert (tmp_path / "serve-cpu.md").read_text().count(f"| {MODEL} |") == 2
    assert (tmp_path / "serve-cpu.png").stat().st_size > 0
    assert wait_idle(server)["free_slots"] == SLOTS
