"""Scheduler unit tests against a scripted fake runner (no model): admission order, queue limit, chunked
prefill mixed with decode rows in one step, stop rules (EOS, stop token ids, stop strings, max_tokens, context
end), logprob plumbing, cancellation and runner errors; each also with an asynchronous runner, where the
scheduler plans step t+1 before it reads step t (no token past a stop may reach a sink, no slot may leak)."""
from __future__ import annotations

import threading

import pytest

from qsparse_infer.generate.sampling import SamplingSettings
from qsparse_infer.serving.runner import DoneHandle, StepResult
from qsparse_infer.serving.scheduler import Delta, Finished, GenerationRequest, QueueFull, Scheduler, TokenLogprob

GREEDY = SamplingSettings(temperature=0.0)


class FakeRunner:
    """Next token = (last token + 1) % vocab; records every call. A sampled token's fake logprob is -token/100,
    a prompt row's -(target)/1000. asynchronous=True makes the scheduler overlap (results read one step late);
    the fake's own state (the last token per slot) advances at launch, as the GPU's device state does."""

    def __init__(self, max_slots: int = 2, max_len: int = 64, vocab_size: int = 50, fail_decode: bool = False,
                 asynchronous: bool = False):
        self.max_slots, self.max_len, self.vocab_size = max_slots, max_len, vocab_size
        self.asynchronous = asynchronous
        self.calls: list[tuple] = []
        self.len = [0] * max_slots
        self.last = [0] * max_slots
        self.live = [False] * max_slots
        self.want_lp = [None] * max_slots
        self.fail_decode = fail_decode
        self.unread = 0  # launched steps whose result() was not called yet

    def begin(self, slot, settings, seed, logprobs=None):
        assert not self.live[slot], "slot handed out twice"
        self.calls.append(("begin", slot))
        self.len[slot], self.live[slot], self.want_lp[slot] = 0, True, logprobs

    def launch(self, plan):
        self.calls.append(("step", tuple((c.slot, len(c.ids), c.sample) for c in plan.prefills), tuple(plan.decode)))
        if self.fail_decode and plan.decode:
            raise RuntimeError("boom")
        res = StepResult([], [], [], [], [])
        for c in plan.prefills:
            assert self.live[c.slot] and self.len[c.slot] + len(c.ids) <= self.max_len
            self.len[c.slot] += len(c.ids)
            self.last[c.slot] = c.ids[-1]
            tok = self._next(c.slot) if c.sample else None
            res.prefill_tokens.append(tok)
            res.prefill_logprobs.append(self._lp(c.slot, tok) if c.sample else None)
            res.prompt_logprobs.append(None if c.targets is None else
                                       [TokenLogprob(x, -x / 1000, []) for x in c.targets])
        for s in plan.decode:
            assert self.live[s] and self.len[s] < self.max_len, f"decode row for slot {s} past its room"
            self.len[s] += 1
            tok = self._next(s)
            res.decode_tokens.append(tok)
            res.decode_logprobs.append(self._lp(s, tok))
        self.unread += 1
        runner = self

        class Handle(DoneHandle):
            def result(self):
                runner.unread -= 1
                return super().result()

        if self.asynchronous:
            assert self.unread <= 2, "more than one step in flight besides the new one"
        return Handle(res)

    def _lp(self, slot, tok):
        k = self.want_lp[slot]
        return None if k is None else TokenLogprob(tok, -tok / 100, [(tok, -tok / 100)] * k)

    def _next(self, slot):
        self.last[slot] = (self.last[slot] + 1) % self.vocab_size
        return self.last[slot]

    def release(self, slot):
        self.calls.append(("release", slot))
        self.live[slot] = False


class Recorder:
    def __init__(self):
        self.events: list = []

    def __call__(self, ev):
        self.events.append(ev)

    @property
    def deltas(self):
        return [e for e in self.events if isinstance(e, Delta)]

    @property
    def tokens(self):
        return [t for e in self.deltas for t in e.token_ids]

    @property
    def text(self):
        return "".join(e.text for e in self.deltas)

    @property
    def end(self) -> Finished:
        assert isinstance(self.events[-1], Finished)
        assert sum(isinstance(e, Finished) for e in self.events) == 1
        return self.events[-1]


class Tok:
    """The scheduler needs only eos_ids and incremental_decoder() from a tokenizer: token t -> chr(a + t)."""
    eos_ids = [5]
    chat_template = None

    def incremental_decoder(self):
        class D:
            def push(self, t):
                return chr(ord("a") + t)

            def flush(self):
                return ""
        return D()


def req(ids, max_tokens=3, **kw):
    return GenerationRequest(list(ids), GREEDY, max_tokens, **kw)


def steps(runner):
    return [c for c in runner.calls if c[0] == "step"]


MODES = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "overlap"])


@MODES
def test_fifo_admission_and_slot_reuse(asynchronous):
    runner = FakeRunner(max_slots=1, asynchronous=asynchronous)
    sched = Scheduler(runner, max_queue=8)
    recs = [Recorder() for _ in range(3)]
    for i, r in enumerate(recs):
        sched.submit(req([10 * (i + 1)], max_tokens=2), r)
    sched.run_until_idle()
    assert [r.tokens for r in recs] == [[11, 12], [21, 22], [31, 32]]  # FIFO: each ran in submission order
    order = [c[0] for c in runner.calls]
    assert order == ["begin", "step", "step", "release"] * 3  # max_tokens known at planning: no extra row
    assert all(r.end.reason == "length" and r.end.completion_tokens == 2 for r in recs)
    assert sched.stats()["free_slots"] == 1 and sched.stats()["waiting"] == 0
    assert runner.unread == 0


def test_queue_full_raises_and_counts():
    sched = Scheduler(FakeRunner(max_slots=2), max_queue=1)
    for _ in range(3):  # two take the free slots at the next step, one waits
        sched.submit(req([1]), Recorder())
    with pytest.raises(QueueFull):
        sched.submit(req([1]), Recorder())
    assert sched.stats()["rejected_queue_full"] == 1
    sched.run_until_idle()
    sched.submit(req([1]), Recorder())  # room again


@MODES
def test_chunked_prefill_mixed_with_decode_rows(asynchronous):
    runner = FakeRunner(max_slots=2, asynchronous=asynchronous)
    sched = Scheduler(runner, prefill_chunk=4)
    a, b = Recorder(), Recorder()
    sched.submit(req([1, 2], max_tokens=6), a)
    sched.step()  # a: whole prompt in one chunk
    sched.submit(req(list(range(10)), max_tokens=2), b)
    sched.run_until_idle()
    assert steps(runner)[:5] == [("step", ((0, 2, True),), ()),
                                 ("step", ((1, 4, False),), (0,)),  # b's chunks ride in a's decode steps
                                 ("step", ((1, 4, False),), (0,)),
                                 ("step", ((1, 2, True),), (0,)),
                                 ("step", (), (0, 1))]
    assert a.tokens == [3, 4, 5, 6, 7, 8] and b.tokens == [10, 11]
    assert sched.stats()["mixed_steps"] == 3


def test_short_prompts_share_the_prefill_budget():
    runner = FakeRunner(max_slots=3)
    sched = Scheduler(runner, prefill_chunk=4)
    recs = [Recorder() for _ in range(3)]
    for r in recs:
        sched.submit(req([1, 2, 3], max_tokens=1), r)
    sched.step()
    sched.step()
    assert steps(runner) == [("step", ((0, 3, True), (1, 1, False)), ()),  # step 1: 4 tokens
                             ("step", ((1, 2, True), (2, 2, False)), ())]  # step 2: 4 tokens
    sched.run_until_idle()
    assert [r.tokens for r in recs] == [[4], [4], [4]]


@MODES
def test_eos_stop_ids_stop_strings_and_context_end(asynchronous):
    runner = FakeRunner(max_slots=1, max_len=6, asynchronous=asynchronous)
    sched = Scheduler(runner, Tok())
    eos, full, stop, stop_id, ignore = Recorder(), Recorder(), Recorder(), Recorder(), Recorder()
    sched.submit(req([2], max_tokens=10), eos)
    sched.submit(req([0, 0, 0, 0, 10], max_tokens=None), full)
    sched.submit(req([10], max_tokens=10, stop=["mn"]), stop)
    sched.submit(req([20], max_tokens=10, stop_token_ids=[23]), stop_id)
    sched.submit(req([2], max_tokens=4, ignore_eos=True), ignore)
    sched.run_until_idle()
    assert eos.tokens == [3, 4] and eos.end.reason == "stop" and eos.end.completion_tokens == 3  # EOS counted
    assert full.tokens == [11, 12] and full.end.reason == "length"  # 5 prompt + 1 fed = 6 positions
    assert stop.text == "l" and stop.end.reason == "stop"
    assert stop_id.tokens == [21, 22] and stop_id.end.reason == "stop" and stop_id.end.completion_tokens == 3
    assert "x" not in stop_id.text  # the stop token (23 -> 'x') is not shown
    assert ignore.tokens == [3, 4, 5, 6] and ignore.end.reason == "length"
    assert runner.live == [False] and sched.stats()["free_slots"] == 1 and runner.unread == 0


@MODES
def test_cancel_frees_slot_and_queue(asynchronous):
    runner = FakeRunner(max_slots=1, asynchronous=asynchronous)
    sched = Scheduler(runner)
    running, waiting, after = Recorder(), Recorder(), Recorder()
    t1 = sched.submit(req([1], max_tokens=50), running)
    t2 = sched.submit(req([1], max_tokens=50), waiting)
    sched.step()
    sched.step()
    sched.cancel(t1)
    sched.cancel(t2)
    n_before = len(running.tokens)
    sched.submit(req([7], max_tokens=1), after)
    sched.run_until_idle()
    assert running.end.reason == "cancelled" and waiting.end.reason == "cancelled"
    assert len(running.tokens) == n_before  # nothing after the cancel (the in-flight row is dropped)
    assert after.tokens == [8]
    assert runner.live == [False] and sched.stats()["free_slots"] == 1


@MODES
def test_runner_error_ends_requests_and_loop_goes_on(asynchronous):
    runner = FakeRunner(max_slots=2, fail_decode=True, asynchronous=asynchronous)
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
                       (req([1], max_tokens=-1), "max_tokens"), (req([1], stop=["x"]), "tokenizer"),
                       (req([1], stop_token_ids=[50]), "stop_token_ids"), (req([1], logprobs=21), "logprobs"),
                       (req([1], logprobs=True), "logprobs"), (req([1], prompt_logprobs=1), "prompt_logprobs")]:
        with pytest.raises(ValueError, match=match):
            sched.submit(bad, Recorder())
    assert sched.stats()["waiting"] == 0


@MODES
def test_logprobs_and_prompt_logprobs_plumbing(asynchronous):
    """Logprobs align with token_ids; prompt logprobs gathered over several chunks arrive once, on the first
    Delta, one per prompt token (None first); requests that did not ask get None."""
    runner = FakeRunner(max_slots=2, asynchronous=asynchronous)
    sched = Scheduler(runner, Tok(), prefill_chunk=3)
    asked, plain = Recorder(), Recorder()
    prompt = [10, 11, 12, 13, 14, 15, 16]
    sched.submit(req(prompt, max_tokens=3, logprobs=2, prompt_logprobs=True), asked)
    sched.submit(req([30], max_tokens=2), plain)
    sched.run_until_idle()
    first = asked.deltas[0]
    assert first.prompt_logprobs[0] is None
    assert [(x.token_id, x.logprob) for x in first.prompt_logprobs[1:]] == [(t, -t / 1000) for t in prompt[1:]]
    assert all(d.prompt_logprobs is None for d in asked.deltas[1:])
    for d in asked.deltas:
        assert len(d.logprobs) == len(d.token_ids)
        assert [x.token_id for x in d.logprobs] == d.token_ids and all(len(x.top) == 2 for x in d.logprobs)
    assert asked.tokens == [17, 18, 19]
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in plain.deltas)


@MODES
def test_max_tokens_zero_echo(asynchronous):
    """max_tokens = 0: with prompt logprobs the prompt is prefilled without sampling and its logprobs come in
    one Delta without tokens; without them the request finishes at once, using no slot."""
    runner = FakeRunner(max_slots=1, asynchronous=asynchronous)
    sched = Scheduler(runner, prefill_chunk=2)
    echo, nothing = Recorder(), Recorder()
    sched.submit(req([3, 4, 5], max_tokens=0, prompt_logprobs=True, logprobs=1), echo)
    sched.submit(req([3, 4, 5], max_tokens=0), nothing)
    sched.run_until_idle()
    assert [(d.token_ids, len(d.prompt_logprobs)) for d in echo.deltas] == [([], 3)]
    assert echo.end.reason == "length" and echo.end.completion_tokens == 0
    assert all(not c[1] or not any(s for _, _, s in c[1]) for c in steps(runner))  # nothing sampled
    assert nothing.deltas == [] and nothing.end.reason == "length" and nothing.end.prompt_tokens == 3
    assert runner.live == [False]


def test_eos_first_still_delivers_prompt_logprobs():
    sched = Scheduler(FakeRunner(max_slots=1), Tok())
    r = Recorder()
    sched.submit(req([1, 2, 4], max_tokens=5, prompt_logprobs=True), r)  # first sampled token is 5 = EOS
    sched.run_until_idle()
    assert r.end.reason == "stop" and r.tokens == []
    assert len(r.deltas) == 1 and len(r.deltas[0].prompt_logprobs) == 3


def test_overlap_reads_results_one_step_late_and_drops_rows_past_a_stop():
    """With an asynchronous runner, the request that samples EOS at step t still has a row in step t+1 (planned
    before t's tokens were read): that row's token never reaches the sink, and the slot goes to the next one."""
    runner = FakeRunner(max_slots=1, asynchronous=True)
    sched = Scheduler(runner, Tok())
    a, b = Recorder(), Recorder()
    sched.submit(req([1], max_tokens=20), a)  # 2, 3, 4, then 5 = EOS
    sched.submit(req([40], max_tokens=2), b)
    sched.run_until_idle()
    assert a.tokens == [2, 3, 4] and a.end.reason == "stop" and a.end.completion_tokens == 4
    assert b.tokens == [41, 42]
    decode_rows_of_a = sum(1 for c in steps(runner) if c[2] == (0,)) - 1  # b's one decode row on slot 0
    assert decode_rows_of_a == 4  # 3 useful + the one in flight when EOS was read


def test_dispatch_gets_each_steps_events_in_one_call():
    batches = []
    runner = FakeRunner(max_slots=3)
    sched = Scheduler(runner, dispatch=lambda pairs: batches.append(pairs))
    recs = [Recorder() for _ in range(3)]
    for r in recs:
        sched.submit(req([1], max_tokens=2), r)
    sched.run_until_idle()
    assert len(batches) == 2  # the prefill step (3 first tokens), the decode step (3 tokens + 3 finishes)
    assert [len(b) for b in batches] == [3, 6]
    for sink, ev in (p for b in batches for p in b):
        sink(ev)
    assert [r.tokens for r in recs] == [[2, 3]] * 3 and all(r.end.reason == "length" for r in recs)


def test_background_thread_serves_and_shuts_down():
    sched = Scheduler(FakeRunner(max_slots=2, asynchronous=True))
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


def test_stats_count_kv_positions():
    runner = FakeRunner(max_slots=2, max_len=16)
    sched = Scheduler(runner)
    sched.submit(req([1, 2, 3], max_tokens=5), Recorder())
    sched.step()
    st = sched.stats()
    assert st["kv_used_positions"] == 3 and st["kv_total_positions"] == 32


def test_long_prompt_takes_small_chunks_only_while_others_decode():
    runner = FakeRunner(max_slots=2, max_len=128)
    sched = Scheduler(runner, prefill_chunk=16, long_prefill_chunk=4)
    a, b, c = Recorder(), Recorder(), Recorder()
    sched.submit(req(list(range(40)), max_tokens=2), c)  # alone: long, but nobody to stall
    sched.step()
    assert steps(runner)[-1] == ("step", ((0, 16, False),), ())
    sched.run_until_idle()
    runner.calls.clear()
    sched.submit(req([1, 2], max_tokens=30), a)
    sched.step()
    sched.submit(req(list(range(40)), max_tokens=1), b)
    sched.step()
    sched.step()
    assert steps(runner)[1:] == [("step", ((1, 4, False),), (0,)), ("step", ((1, 4, False),), (0,))]
    sched.run_until_idle()
    assert b.tokens == [40] and len(a.tokens) == 30
