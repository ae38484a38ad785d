"""The API that clients use, through the official openai client against a real server on loopback (CPU,
built-in model): logprobs / top_logprobs on completions and chat, echo with prompt logprobs (what
lm-evaluation-harness's local-completions sends for loglikelihood), n > 1, presence / frequency penalties,
stop_token_ids, max_completion_tokens and stream_options.include_usage. Logprobs are checked against the
engine's own teacher-forced log-softmax (Engine.logits)."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from qsparse_infer.serving.api import create_app  # noqa: E402
from qsparse_infer.serving.runner import CpuRunner  # noqa: E402
from qsparse_infer.serving.scheduler import Scheduler  # noqa: E402
from serving_helpers import ServerThread  # noqa: E402

MODEL = "bard"
# Teacher-forced (one forward over the whole sequence) and incremental decode (one row at a time against the KV
# cache) differ in float rounding, and in this model rounding can flip a discrete choice now and then (an int8
# activation rounding, a top-K channel at the threshold), which moves that position's logprobs by up to a few
# tenths. So: at least half the values agree within LP_TOL, none by more than LP_FLIP. A wrong row, a missing log-softmax or
# a temperature applied to the logprobs is off by far more, everywhere.
LP_TOL = 1e-3
LP_FLIP = 0.5
pytestmark = pytest.mark.filterwarnings("ignore:.*CPU.*:UserWarning")


@pytest.fixture(scope="module")
def engine(chat_engine):
    return chat_engine


@pytest.fixture(scope="module")
def server(engine):
    sched = Scheduler(CpuRunner(engine, 4), engine.tokenizer, max_queue=32, prefill_chunk=64)
    with ServerThread(create_app(sched, MODEL)) as s:
        s.scheduler = sched
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_logprobs_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) and got
    diffs = sorted(abs(g - w) for g, w in zip(got, want))
    within = sum(d < LP_TOL for d in diffs)
    assert within >= 0.5 * len(diffs) and diffs[-1] < LP_FLIP, \
        f"{within}/{len(diffs)} within {LP_TOL}, worst {diffs[-1]:.4f}"


def teacher_forced(engine, ids: list[int]) -> torch.Tensor:
    """log_softmax over the vocabulary at every position of `ids` (row i predicts ids[i + 1])."""
    return torch.log_softmax(engine.logits(ids).double(), dim=-1)


def greedy_ids(engine, prompt_ids, n, presence=0.0, frequency=0.0) -> list[int]:
    """Greedy decoding by full forwards, with OpenAI's additive penalties on the generated tokens:
    x - (frequency * count + presence * [count > 0])."""
    out: list[int] = []
    for _ in range(n):
        x = engine.logits(prompt_ids + out)[-1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.numel()).double() if out \
            else torch.zeros_like(x)
        x = x - (frequency * counts + presence * (counts > 0).double())
        out.append(int(torch.argmax(x)))
    return out


# -- completions logprobs --------------------------------------------------------------------------


def test_completion_logprobs_equal_the_teacher_forced_log_softmax(client, engine):
    prompt = "ROMEO:"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    c = r.choices[0]
    gen = c.model_extra["token_ids"]
    ids = engine.tokenizer.encode(prompt)
    assert len(gen) == 8
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    ref = teacher_forced(engine, ids + gen)
    rows = [ref[len(ids) - 1 + i] for i in range(len(gen))]
    assert_logprobs_close(lp.token_logprobs, [float(row[tok]) for row, tok in zip(rows, gen)])
    assert_logprobs_close([v for top in lp.top_logprobs for v in sorted(top.values(), reverse=True)[:3]],
                          [v for row in rows for v in torch.topk(row, 3).values.tolist()])
    for i in range(len(gen)):
        # greedy: the chosen token is the most likely one, and the chosen token is in its top_logprobs
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-9)
        assert len(lp.top_logprobs[i]) in (3, 4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_sampled_tokens_logprobs_are_the_model_distribution_not_the_sampling_one(client, engine):
    """With temperature 0.6 and top_k 5, the logprobs are still log_softmax of the raw logits."""
    ids = engine.tokenizer.encode("KING HENRY:\nWhat")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0.6, seed=11, logprobs=1,
                                  extra_body={"top_k": 5, "ignore_eos": True, "return_token_ids": True})
    gen = r.choices[0].model_extra["token_ids"]
    ref = teacher_forced(engine, ids + gen)
    assert_logprobs_close(r.choices[0].logprobs.token_logprobs,
                          [float(ref[len(ids) - 1 + i, t]) for i, t in enumerate(gen)])


def test_echo_max_tokens_0_scores_the_prompt_as_lm_eval_does(client, engine):
    """lm-evaluation-harness local-completions, loglikelihood: echo=True, max_tokens=0, logprobs=1 over
    the context + continuation as token ids; it sums token_logprobs[ctxlen:] and checks is-greedy by
    comparing each token's logprob with the max of its top_logprobs."""
    context = engine.tokenizer.encode("ROMEO:\nWhat light through yonder")
    continuation = engine.tokenizer.encode(" window breaks", add_bos=False)
    ids = context + continuation
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert c.text == engine.tokenizer.decode(ids) and c.finish_reason == "length"
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = teacher_forced(engine, ids)  # the prompt is prefilled in one chunk: the same forward, so tight
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < LP_TOL
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=LP_TOL)
        assert 1 <= len(lp.top_logprobs[i]) <= 2  # the most likely token, and the prompt's own if it differs
    loglik = sum(lp.token_logprobs[len(context):])
    want = sum(float(ref[i - 1, ids[i]]) for i in range(len(context), len(ids)))
    assert abs(loglik - want) < LP_TOL * len(continuation)
    is_greedy = all(t >= max(top.values()) - 1e-9 for t, top in
                    zip(lp.token_logprobs[len(context):], lp.top_logprobs[len(context):]))
    assert is_greedy == all(int(ref[i - 1].argmax()) == ids[i] for i in range(len(context), len(ids)))


def test_echo_with_generated_tokens_text_and_logprobs_continue(client, engine):
    prompt = "JULIET:"
    ids = engine.tokenizer.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=0, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    gen = c.model_extra["token_ids"]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert c.text == engine.tokenizer.decode(ids) + plain.choices[0].text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None
    ref = teacher_forced(engine, ids + gen)
    full = ids + gen
    assert_logprobs_close(lp.token_logprobs[1:], [float(ref[i - 1, full[i]]) for i in range(1, len(full))])
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs=0: the chosen token only


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = dict(model=MODEL, prompt="HAMLET:", max_tokens=6, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    tokens, lps, offsets, text = [], [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
                offsets += ch.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert lps[0] is None and lps == whole.logprobs.token_logprobs  # the same greedy run: the same floats


# -- chat logprobs ---------------------------------------------------------------------------------


def test_chat_logprobs_content_equal_the_teacher_forced_log_softmax(client, engine, server):
    messages = [{"role": "user", "content": "Speak, good sir."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    gen = c.model_extra["token_ids"]
    ids = server.scheduler.chat_ids(messages)
    content = c.logprobs.content
    assert len(content) == len(gen) == 6 == r.usage.completion_tokens
    ref = teacher_forced(engine, ids + gen)
    rows = [ref[len(ids) - 1 + i] for i in range(len(gen))]
    assert_logprobs_close([e.logprob for e in content], [float(row[t]) for row, t in zip(rows, gen)])
    assert_logprobs_close([t.logprob for e in content for t in e.top_logprobs],
                          [v for row in rows for v in torch.topk(row, 2).values.tolist()])
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert entry.bytes == list(entry.token.encode()) or entry.token.startswith("bytes:")
    assert "".join(e.token for e in content).strip() == c.message.content.strip()
    streamed = [e for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        stream=True, extra_body={"ignore_eos": True}) for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_chat_without_logprobs_has_none(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].logprobs is None


# -- n, seeds, penalties, stop ids, max_completion_tokens, usage -----------------------------------


def test_n_choices_use_distinct_seeds(client, engine):
    kw = dict(temperature=0.9, top_p=0.95)
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=8, n=3, seed=77,
                                  extra_body={"return_token_ids": True}, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    expected = [engine.generate("ROMEO:", max_new_tokens=8, seed=77 + i, **kw) for i in range(3)]
    assert [c.text for c in r.choices] == expected
    assert len(set(expected)) > 1
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("ROMEO:"))  # counted once, not per choice
    finished_on_eos = sum(c.finish_reason == "stop" for c in r.choices)  # EOS is counted but has no token id
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices) + finished_on_eos


def test_n_streams_interleave_choices_by_index(client):
    kw = dict(model=MODEL, prompt="KING HENRY:", max_tokens=10, n=3, seed=5, temperature=0.8)
    whole = client.completions.create(**kw)
    texts, finish, order = defaultdict(str), {}, []
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for chunk in chunks:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            order.append(ch.index)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert finish == {i: c.finish_reason for i, c in enumerate(whole.choices)}
    assert sorted(set(order)) == [0, 1, 2] and order != sorted(order)  # interleaved, not one after another
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_several_prompts_times_n(client, engine):
    r = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], max_tokens=5, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, p in zip(r.choices, ["ROMEO:", "ROMEO:", "JULIET:", "JULIET:"]):
        assert c.text == engine.generate(p, max_new_tokens=5, temperature=0)


def test_chat_n_and_include_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, temperature=0.7, seed=3,
        stream=True, stream_options={"include_usage": True}))
    roles = defaultdict(list)
    for chunk in chunks:
        for ch in chunk.choices:
            if ch.delta.role:
                roles[ch.index].append(ch.delta.role)
    assert dict(roles) == {0: ["assistant"], 1: ["assistant"]}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (-1.0, 2.0)])
def test_presence_and_frequency_penalties(client, engine, presence, frequency):
    ids = engine.tokenizer.encode("ROMEO:")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, presence_penalty=presence,
                                  frequency_penalty=frequency,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == greedy_ids(engine, ids, 10, presence, frequency)


def test_penalties_change_the_output(client):
    kw = dict(model=MODEL, prompt="ROMEO:", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(frequency_penalty=2.0, **kw).choices[0].text != plain


def test_stop_token_ids_end_the_completion_without_showing_the_token(client, engine):
    ids = engine.tokenizer.encode("ROMEO:")
    gen = greedy_ids(engine, ids, 8)
    k = 3
    stop = gen[k]
    first = gen.index(stop)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [stop], "ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.model_extra["token_ids"] == gen[:first]
    assert c.text == engine.tokenizer.decode(gen[:first])
    assert r.usage.completion_tokens == first + 1  # the stop token is counted, as EOS is


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=9,
                                       max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_include_usage_final_chunk_for_completions(client):
    chunks = list(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    plain = list(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_logprobs_values_are_finite_json(server):
    """A token the model gives no probability must still be valid JSON (no -Infinity)."""
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 3,
                                                          "logprobs": 20, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and "Infinity" not in r.text and "NaN" not in r.text
    for top in r.json()["choices"][0]["logprobs"]["top_logprobs"]:
        assert 20 <= len(top) <= 21 and all(math.isfinite(v) for v in top.values())
