"""Scheduler unit tests against a scripted fake runner (no model): admission order, queue limit, chunked
prefill interleaved with decode, stop rules, cancellation and runner errors."""
from __future__ import annotations

import threading

import pytest

from qsparse_infer.generate.sampling import SamplingSettings
from qsparse_infer.serving.scheduler import Delta, Finished, GenerationRequest, QueueFull, Scheduler

GREEDY = SamplingSettings(temperature=0.0)


class FakeRunner:
    """Next token = (last token + 1) % vocab; records every call."""

    def __init__(self, max_slots: int = 2, max_len: int = 64, vocab_size: int = 50, fail_decode: bool = False):
        self.max_slots, self.max_len, self.vocab_size = max_slots, max_len, vocab_size
        self.calls: list[tuple] = []
        self.len = [0] * max_slots
        self.last = [0] * max_slots
        self.live = [False] * max_slots
        self.fail_decode = fail_decode

    def begin(self, slot, settings, seed):
        assert not self.live[slot], "slot handed out twice"
        self.calls.append(("begin", slot))
        self.len[slot], self.live[slot] = 0, True

    def prefill(self, slot, ids, last):
        self.calls.append(("prefill", slot, len(ids), last))
        self.len[slot] += len(ids)
        self.last[slot] = ids[-1]
        return self._next(slot) if last else None

    def decode(self, slots):
        self.calls.append(("decode", tuple(slots)))
        if self.fail_decode:
            raise RuntimeError("boom")
        for s in slots:
            self.len[s] += 1
        return [self._next(s) for s in slots]

    def _next(self, slot):
        self.last[slot] = (self.last[slot] + 1) % self.vocab_size
        return self.last[slot]

    def release(self, slot):
        self.calls.append(("release", slot))
        self.live[slot] = False

    def length(self, slot):
        return self.len[slot]


class Recorder:
    def __init__(self):
        self.events: list = []

    def __call__(self, ev):
        self.events.append(ev)

    @property
    def tokens(self):
        return [t for e in self.events if isinstance(e, Delta) for t in e.token_ids]

    @property
    def end(self) -> Finished:
        assert isinstance(self.events[-1], Finished)
        return self.events[-1]


def req(ids, max_tokens=3, **kw):
    return GenerationRequest(list(ids), GREEDY, max_tokens, **kw)


def test_fifo_admission_and_slot_reuse():
    runner = FakeRunner(max_slots=1)
    sched = Scheduler(runner, max_queue=8)
    recs = [Recorder() for _ in range(3)]
    for i, r in enumerate(recs):
        sched.submit(req([10 * (i + 1)], max_tokens=2), r)
    sched.run_until_idle()
    prefills = [c for c in runner.calls if c[0] == "prefill"]
    assert [c[1] for c in prefills] == [0, 0, 0]  # one slot, reused
    assert [r.tokens for r in recs] == [[11, 12], [21, 22], [31, 32]]  # FIFO: each ran in submission order
    order = [c[0] for c in runner.calls]
    assert order == ["begin", "prefill", "decode", "release"] * 3
    assert all(r.end.reason == "length" and r.end.completion_tokens == 2 for r in recs)
    assert sched.stats()["free_slots"] == 1 and sched.stats()["waiting"] == 0


def test_queue_full_raises_and_counts():
    sched = Scheduler(FakeRunner(max_slots=2), max_queue=1)
    for _ in range(3):  # two take the free slots at the next step, one waits
        sched.submit(req([1]), Recorder())
    with pytest.raises(QueueFull):
        sched.submit(req([1]), Recorder())
    assert sched.stats()["rejected_queue_full"] == 1
    sched.run_until_idle()
    sched.submit(req([1]), Recorder())  # room again


def test_chunked_prefill_interleaves_with_decode():
    runner = FakeRunner(max_slots=2)
    sched = Scheduler(runner, prefill_chunk=4)
    a, b = Recorder(), Recorder()
    sched.submit(req([1, 2], max_tokens=6), a)
    sched.step()  # a: whole prompt in one chunk, first token
    sched.submit(req(list(range(10)), max_tokens=2), b)
    sched.run_until_idle()
    calls = [c for c in runner.calls if c[0] in ("prefill", "decode")]
    assert calls[:7] == [("prefill", 0, 2, True),
                         ("prefill", 1, 4, False), ("decode", (0,)),
                         ("prefill", 1, 4, False), ("decode", (0,)),
                         ("prefill", 1, 2, True), ("decode", (0,))]
    assert ("decode", (0, 1)) in calls  # then both decode together
    assert a.tokens == [3, 4, 5, 6, 7, 8] and b.tokens == [10, 11]


def test_short_prompts_share_the_prefill_budget():
    runner = FakeRunner(max_slots=3)
    sched = Scheduler(runner, prefill_chunk=4)
    recs = [Recorder() for _ in range(3)]
    for r in recs:
        sched.submit(req([1, 2, 3], max_tokens=1), r)
    sched.step()
    sched.step()
    assert [c for c in runner.calls if c[0] == "prefill"] == [
        ("prefill", 0, 3, True), ("prefill", 1, 1, False),  # step 1: 4 tokens
        ("prefill", 1, 2, True), ("prefill", 2, 2, False)]  # step 2: 4 tokens
    sched.run_until_idle()
    assert [r.tokens for r in recs] == [[4], [4], [4]]


def test_eos_and_context_end():
    class Tok:  # the scheduler needs only eos_ids and incremental_decoder() from a tokenizer
        eos_ids = [5]
        chat_template = None

        def incremental_decoder(self):
            class D:
                def push(self, t):
                    return chr(ord("a") + t)

                def flush(self):
                    return ""
            return D()

    runner = FakeRunner(max_slots=1, max_len=6)
    sched = Scheduler(runner, Tok())
    eos, full, stop = Recorder(), Recorder(), Recorder()
    sched.submit(req([2], max_tokens=10), eos)
    sched.submit(req([0, 0, 0, 0, 10], max_tokens=None), full)
    sched.submit(req([10], max_tokens=10, stop=["mn"]), stop)
    sched.run_until_idle()
    assert eos.tokens == [3, 4] and eos.end.reason == "stop" and eos.end.completion_tokens == 3  # EOS counted
    assert full.tokens == [11, 12] and full.end.reason == "length"  # 5 prompt + 1 fed = 6 positions
    assert "".join(e.text for e in stop.events if isinstance(e, Delta)) == "l" and stop.end.reason == "stop"


def test_cancel_frees_slot_and_queue():
    runner = FakeRunner(max_slots=1)
    sched = Scheduler(runner)
    running, waiting, after = Recorder(), Recorder(), Recorder()
    t1 = sched.submit(req([1], max_tokens=50), running)
    t2 = sched.submit(req([1], max_tokens=50), waiting)
    sched.step()
    sched.step()
    sched.cancel(t1)
    sched.cancel(t2)
    sched.submit(req([7], max_tokens=1), after)
    sched.run_until_idle()
    assert running.end.reason == "cancelled" and waiting.end.reason == "cancelled"
    assert after.tokens == [8]
    assert runner.live == [False] and sched.stats()["free_slots"] == 1


def test_runner_error_ends_requests_and_loop_goes_on():
    runner = FakeRunner(max_slots=2, fail_decode=True)
    sched = Scheduler(runner)
    a = Recorder()
    sched.submit(req([1], max_tokens=5), a)
    sched.run_until_idle()
    assert a.end.reason == "error" and "boom" in a.end.error
    runner.fail_decode = False
    b = Recorder()
    sched.submit(req([1], max_tokens=3), b)
    sched.run_until_idle()
    assert b.tokens == [2, 3, 4] and sched.stats()["free_slots"] == 2


def test_bad_requests_rejected_before_queueing():
    sched = Scheduler(FakeRunner(max_len=8, vocab_size=50))
    for bad, match in [(req([]), "empty"), (req([50]), "vocabulary"), (req([1] * 9), "context"),
                       (req([1], max_tokens=0), "max_tokens"), (req([1], stop=["x"]), "tokenizer")]:
        with pytest.raises(ValueError, match=match):
            sched.submit(bad, Recorder())
    assert sched.stats()["waiting"] == 0


def test_background_thread_serves_and_shuts_down():
    sched = Scheduler(FakeRunner(max_slots=2))
    sched.start()
    done = threading.Event()
    rec = Recorder()

    def sink(ev):
        rec(ev)
        if isinstance(ev, Finished):
            done.set()

    sched.submit(req([1], max_tokens=4), sink)
    assert done.wait(10)
    assert rec.tokens == [2, 3, 4, 5]
    sched.shutdown()
