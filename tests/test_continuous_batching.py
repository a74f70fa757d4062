"""Continuous batching of the sentence loop through Transformers' interface (`init_continuous_batching`,
`generate_batch`): every request's tokens equal its own offline `generate`, whatever joins or leaves the loop
beside it; per-request budgets and eos ids; the row bound queues; streaming by sentence; cancellation; refusals."""

import asyncio
import threading
import time

import pytest
import torch
from conftest import DOT, EOS, random_text, tiny_sllm
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.generation.streamers import BaseStreamer

from modeling_sllm.continuous_batching import QueueFull
from modeling_sllm.sentence_loop import SentenceLoop
from modeling_sllm.row_sampling import RowSampling, SamplingParams

# Unfinished last sentences (continued), a finished one, an empty prompt (unconditional), long and short prompts.
PROMPTS = [random_text(1, length, seed=length)[0].tolist() for length in (3, 17, 9, 30, 12, 25, 5)]
PROMPTS = PROMPTS[:3] + [[], [10, 11, DOT]] + PROMPTS[3:]


def never_stop(model):
    """The untrained stop head never ends a text: rows run to their budgets, long enough to overlap."""
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([50.0, -50.0]))
    return model


def alone(model, prompt: list[int], **kwargs) -> list[int]:
    """The new tokens of greedy offline `generate` on one prompt (pad after the end dropped)."""
    ids = torch.tensor([prompt]) if prompt else None
    new = model.generate(ids, do_sample=False, **kwargs)[0, len(prompt) :].tolist()
    length = len(new)
    while length and new[length - 1] == model.generation_config.pad_token_id:
        length -= 1
    return new[:length]


def results(manager, count: int, timeout: float = 60) -> dict:
    """The finished results of `count` requests, read from the manager's queue (they have no handler)."""
    finished, deadline = {}, time.monotonic() + timeout
    while len(finished) < count and time.monotonic() < deadline:
        result = manager.get_result(timeout=0.5)
        if result is not None and result.is_finished():
            finished[result.request_id] = result
    assert len(finished) == count, f"{len(finished)} of {count} requests finished within {timeout} s"
    return finished


@pytest.mark.parametrize("backbone_name", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("stops", [False, True], ids=["never-stops", "stop-head"])
def test_generate_batch_equals_generate_alone(backbone_name, stops):
    model = tiny_sllm(backbone_name)
    model = model if stops else never_stop(model)
    outputs = model.generate_batch(PROMPTS, max_new_tokens=30)
    assert list(outputs) == [f"req_{i}" for i in range(len(PROMPTS))]
    for prompt, output in zip(PROMPTS, outputs.values()):
        assert output.status == RequestStatus.FINISHED and output.error is None
        assert output.prompt_ids == prompt
        assert output.generated_tokens == alone(model, prompt, max_new_tokens=30)


def test_requests_join_and_leave_a_running_loop_with_their_own_limits(monkeypatch):
    """Requests added while others run join the loop; each keeps its own max_new_tokens and eos ids; at most
    `max_requests_per_batch` rows run, the rest wait in the queue; nothing is lost or mixed between requests."""
    rows = []
    step = SentenceLoop.step

    def counted(loop, status):
        rows.append(len(loop.done))
        return step(loop, status)

    monkeypatch.setattr(SentenceLoop, "step", counted)
    model = never_stop(tiny_sllm())
    manager = model.init_continuous_batching(
        GenerationConfig(do_sample=False, max_new_tokens=12),
        ContinuousBatchingConfig(max_requests_per_batch=3),
    )
    manager.start()
    try:
        limits = [dict(max_new_tokens=8 + 5 * (i % 4)) for i in range(len(PROMPTS))]
        limits[0]["eos_token_id"] = limits[2]["eos_token_id"] = -1  # no eos (the first one may be admitted alone)
        limits[4]["eos_token_id"] = [EOS, 12]
        first = [manager.add_request(p, **kw) for p, kw in zip(PROMPTS[:4], limits[:4])]
        while not rows or len(rows) < 5:  # the loop is running when the others arrive
            time.sleep(0.01)
        later = [manager.add_request(p, **kw) for p, kw in zip(PROMPTS[4:], limits[4:])]
        finished = results(manager, len(PROMPTS))
    finally:
        manager.stop(block=True, timeout=10)
    assert max(rows) == 3 and len(set(rows)) > 1
    for request_id, prompt, kw in zip(first + later, PROMPTS, limits):
        eos = kw.get("eos_token_id", EOS)
        expected = alone(model, prompt, max_new_tokens=kw["max_new_tokens"], eos_token_id=None if eos == -1 else eos)
        assert finished[request_id].generated_tokens == expected, request_id


def test_streaming_gives_the_first_token_at_once_then_a_sentence_at_a_time():
    """A streaming request's first result holds its first token (one decoder step after its prompt is read); the
    next ones end where offline generate's streamer gets a sentence; tokens are final when written."""
    model = never_stop(tiny_sllm())
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=40))
    manager.start()
    try:
        request_id = manager.add_request(PROMPTS[4], streaming=True)
        seen, deadline = [], time.monotonic() + 60
        while not (seen and seen[-1].is_finished()) and time.monotonic() < deadline:
            if (result := manager.get_result(timeout=0.5)) is not None:
                seen.append(result)
    finally:
        manager.stop(block=True, timeout=10)
    final = seen[-1].generated_tokens
    assert all(result.request_id == request_id for result in seen) and seen[-1].status == RequestStatus.FINISHED
    assert final == alone(model, PROMPTS[4], max_new_tokens=40)
    assert all(final[: len(result.generated_tokens)] == result.generated_tokens for result in seen)
    offline = SentenceEnds()
    model.generate(torch.tensor([PROMPTS[4]]), do_sample=False, max_new_tokens=40, streamer=offline)
    assert [len(result.generated_tokens) for result in seen] == [1, *offline.ends]
    assert len(seen) >= 4


class SentenceEnds(BaseStreamer):
    """The new-token count after each sentence of offline generate (its streamer gets one put per sentence)."""

    def __init__(self):
        self.ends, self.prompt = [], True

    def put(self, value):
        if not self.prompt:
            self.ends.append((self.ends[-1] if self.ends else 0) + len(value))
        self.prompt = False

    def end(self):
        pass


def run_alone_and_together(model, requests: list[dict], rows: int = 8) -> tuple[list, list]:
    """Each request's tokens when it runs alone through a manager, and when all run together in one."""
    def run(batch: list[dict]) -> list:
        manager = model.init_continuous_batching(GenerationConfig(max_new_tokens=20),
                                                 ContinuousBatchingConfig(max_requests_per_batch=rows))  # fmt: skip
        manager.start()
        try:
            ids = [manager.add_request(**request) for request in batch]
            finished = results(manager, len(ids))
        finally:
            manager.stop(block=True, timeout=10)
        return [finished[request_id].generated_tokens for request_id in ids]

    return [run([request])[0] for request in requests], run(requests)


def test_each_row_samples_with_its_own_settings_and_stream():
    """Greedy and sampled rows in one step: each row's tokens equal its run alone (seeded rows: their own random
    streams), greedy rows equal offline generate, a seeded row differs from greedy and from another seed, and the
    penalties and truncation change what a row writes."""
    model = never_stop(tiny_sllm())
    params = [
        SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.3, top_k=5, seed=2),
        SamplingParams(temperature=1.0, top_p=0.5, seed=3), SamplingParams(frequency_penalty=1.5),
        SamplingParams(temperature=0.7, min_p=0.2, presence_penalty=1.0, seed=4),
        SamplingParams(repetition_penalty=1.8), SamplingParams(temperature=0.8, seed=5),
    ]  # fmt: skip
    requests = [dict(input_ids=prompt, sampling=p, max_new_tokens=24) for prompt, p in zip(PROMPTS, params)]
    alone_runs, together = run_alone_and_together(model, requests, rows=8)
    assert together == alone_runs
    assert together[0] == alone(model, PROMPTS[0], max_new_tokens=24)
    for row in (1, 4, 6, 7):
        assert together[row] != alone(model, PROMPTS[row], max_new_tokens=24), row
    other_seed = run_alone_and_together(model, [dict(requests[7], sampling=SamplingParams(temperature=0.8, seed=6))])
    assert other_seed[0][0] != together[7]


def test_a_request_generation_config_sets_its_row_and_unknown_fields_are_refused():
    model = never_stop(tiny_sllm())
    config = GenerationConfig(do_sample=True, temperature=0.9, top_k=8, min_new_tokens=10, max_new_tokens=10)
    requests = [dict(input_ids=PROMPTS[0], generation_config=config, eos_token_id=-1),
                dict(input_ids=PROMPTS[1], max_new_tokens=6)]  # fmt: skip
    alone_runs, together = run_alone_and_together(model, requests)
    assert len(together[0]) == 10 and together[1] == alone(model, PROMPTS[1], max_new_tokens=6)
    manager = model.init_continuous_batching(GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        manager.add_request([10], generation_config=GenerationConfig(no_repeat_ngram_size=2))
    with pytest.raises(ValueError, match="max_new_tokens must be at most"):
        manager.add_request([10], max_new_tokens=10**9)


def test_sampling_from_the_managers_config_reaches_the_loop():
    model = never_stop(tiny_sllm())
    outputs = model.generate_batch(PROMPTS, GenerationConfig(do_sample=True, temperature=1.0, top_k=20), max_new_tokens=16)
    greedy = model.generate_batch(PROMPTS, max_new_tokens=16)
    sampled, argmax = [o.generated_tokens for o in outputs.values()], [o.generated_tokens for o in greedy.values()]
    assert sampled != argmax
    assert all(len(tokens) <= 16 for tokens in sampled)


def test_cancelled_requests_queued_or_running_never_finish_and_free_everything(monkeypatch):
    """With one row busy, a cancelled queued request never runs; a running one leaves at the next step; no handler
    or held request is left behind, and the others equal their runs alone."""
    model = never_stop(tiny_sllm())
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=60),
                                             ContinuousBatchingConfig(max_requests_per_batch=1))  # fmt: skip
    steps, report, cancelled_at = [], type(manager)._report, {}

    def recorded(self, loop, active):  # which requests each step ran
        steps.append((time.monotonic(), [request.output.request_id for request in active]))
        return report(self, loop, active)

    monkeypatch.setattr(type(manager), "_report", recorded)
    manager.start()
    seen: dict[str, list] = {}

    async def drive():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def handler(result):
            seen.setdefault(result.request_id, []).append(result)
            if result.request_id == "last" and result.is_finished():
                done.set_result(None)

        ids = [manager.add_request(p, request_id=name, streaming=True, on_result=handler)
               for p, name in zip(PROMPTS[:4], ("first", "queued", "running", "last"))]  # fmt: skip
        manager.cancel_request("queued")  # still waiting: the first holds the only row
        while "running" not in seen:
            await asyncio.sleep(0.005)
        cancelled_at["running"] = time.monotonic()
        manager.cancel_request("running")
        await asyncio.wait_for(done, 60)
        return ids

    try:
        asyncio.run(drive())
        held = manager.held()
    finally:
        manager.stop(block=True, timeout=10)
    assert "queued" not in seen and not any("queued" in ids for _, ids in steps)
    assert sum("running" in ids for at, ids in steps if at > cancelled_at["running"]) <= 2
    assert not any(result.is_finished() for result in seen["running"])
    assert seen["first"][-1].generated_tokens == alone(model, PROMPTS[0], max_new_tokens=60)
    assert seen["last"][-1].generated_tokens == alone(model, PROMPTS[3], max_new_tokens=60)
    assert held == {"requests": 0, "queued": 0, "handlers": 0}


def test_a_result_before_its_handler_is_registered_is_not_lost():
    model = tiny_sllm()
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=3))
    manager.start()

    async def late_handler():
        request_id = manager.add_request(PROMPTS[4])
        await asyncio.sleep(1.0)  # the request is done before anyone listens
        future = asyncio.get_running_loop().create_future()
        manager.register_result_handler(request_id, lambda result: future.done() or future.set_result(result))
        return await asyncio.wait_for(future, 10)

    try:
        result = asyncio.run(late_handler())
    finally:
        manager.stop(block=True, timeout=10)
    assert result.is_finished() and result.generated_tokens == alone(model, PROMPTS[4], max_new_tokens=3)


def test_an_error_in_the_loops_bookkeeping_fails_its_requests_and_the_loop_goes_on(monkeypatch):
    model = never_stop(tiny_sllm())
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=8))
    report = type(manager)._report
    calls = {"count": 0}

    def failing_once(self, loop, active):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("injected bookkeeping failure")
        return report(self, loop, active)

    monkeypatch.setattr(type(manager), "_report", failing_once)
    manager.start()
    try:
        first = manager.add_request(PROMPTS[0])
        failed = results(manager, 1)[first]
        second = manager.add_request(PROMPTS[1])
        after = results(manager, 1)[second]
    finally:
        manager.stop(block=True, timeout=10)
    assert "injected bookkeeping failure" in failed.error and failed.status == RequestStatus.FAILED
    assert after.error is None and after.generated_tokens == alone(model, PROMPTS[1], max_new_tokens=8)
    assert manager.background_thread_status.fatal_error is None


def test_past_the_queue_bound_add_request_raises_at_once():
    model = never_stop(tiny_sllm())
    manager = model.init_continuous_batching(GenerationConfig(max_new_tokens=500),
                                             ContinuousBatchingConfig(max_requests_per_batch=1, max_queue_size=2))  # fmt: skip
    manager.add_request(PROMPTS[0]), manager.add_request(PROMPTS[1])  # not started: both wait
    started = time.monotonic()
    with pytest.raises(QueueFull, match="waiting for a row"):
        manager.add_request(PROMPTS[2])
    assert time.monotonic() - started < 0.5


def test_what_the_loop_cannot_do_is_refused_by_name():
    model = tiny_sllm("gpt2")  # learned positions: 256 of them
    with pytest.raises(ValueError, match="stop_strings"):
        model.init_continuous_batching(GenerationConfig(stop_strings=["x"], max_new_tokens=4))
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.init_continuous_batching(GenerationConfig(num_return_sequences=2, do_sample=True, max_new_tokens=4))
    with pytest.raises(ValueError, match="num_blocks"):
        model.init_continuous_batching(GenerationConfig(max_new_tokens=4), ContinuousBatchingConfig(num_blocks=8))
    with pytest.raises(ValueError, match="num_beams"):
        model.init_continuous_batching(GenerationConfig(num_beams=2, max_new_tokens=4))
    with pytest.raises(ValueError, match="warmup_steps"):
        model.generate_batch(PROMPTS, max_new_tokens=4, warmup_steps=3)
    manager = model.init_continuous_batching(GenerationConfig(max_new_tokens=4))
    for bad in (0, -3, "x", 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            manager.add_request([10, 11], max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 64\)"):
        manager.add_request([10, 64])
    with pytest.raises(ValueError, match="at most 255 sentences"):
        manager.add_request([10, DOT] * 300)
    with pytest.raises(ValueError, match="record_timestamps"):
        manager.add_request([10], record_timestamps=True)
    manager.start()
    manager.stop(block=True, timeout=10)
    with pytest.raises(RuntimeError, match="stopped"):
        manager.add_request([10, 11])


def test_a_hard_stop_fails_the_requests_it_holds():
    model = never_stop(tiny_sllm())
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=500))
    manager.start()
    request_ids = [manager.add_request(prompt) for prompt in PROMPTS]
    time.sleep(0.2)
    stopper = threading.Thread(target=manager.stop, kwargs=dict(block=True, timeout=10, hard_stop=True))
    stopper.start()
    stopper.join()
    failed = results(manager, len(request_ids), timeout=10)
    stopped = [result for result in failed.values() if result.status == RequestStatus.FAILED]
    assert stopped and all("stopped" in result.error for result in stopped)
    assert all(result.status == RequestStatus.FINISHED for result in failed.values() if result not in stopped)
    assert not manager.is_running()


def test_every_row_is_in_one_phase_at_every_step(monkeypatch):
    """The loop keeps each row's phase in boolean masks: an unfinished row is exactly one of fresh, writing (starting
    being a kind of writing) and waiting; a done row is none of them. Checked after every step of offline `generate`
    and of continuous batching, where rows join and leave."""
    checked = []
    step, join, keep = SentenceLoop.step, SentenceLoop.join, SentenceLoop.keep

    def check(loop):
        phases = torch.stack([loop.fresh, loop.writing, loop.waiting]).long()  # [3, B]
        assert torch.equal(phases.sum(0), (~loop.done).long()), phases
        assert not bool((loop.starting & ~loop.writing).any())
        checked.append(len(loop.done))

    def checked_step(loop, status):
        status = step(loop, status)
        check(loop)
        return status

    def checked_join(loop, other):
        join(loop, other)
        check(loop)

    def checked_keep(loop, rows):
        keep(loop, rows)
        check(loop)

    monkeypatch.setattr(SentenceLoop, "step", checked_step)
    monkeypatch.setattr(SentenceLoop, "join", checked_join)
    monkeypatch.setattr(SentenceLoop, "keep", checked_keep)
    model = tiny_sllm()
    ids = torch.tensor([[10, 11, DOT, 12], [20, DOT, 21, 22]])
    model.generate(ids, max_new_tokens=30, do_sample=False)
    model.generate_batch(PROMPTS, max_new_tokens=30)
    assert len(checked) > 40 and len(set(checked)) > 2


def test_an_error_in_one_row_fails_that_row_and_the_others_go_on(monkeypatch):
    """A step that fails because of one row (injected: the row seeded 666 raises once the loop has run a few steps)
    fails only that request; the others, streaming ones included, are read again from what they reported and
    finish with the tokens they would have written."""
    model = never_stop(tiny_sllm())
    choose, calls = RowSampling.choose, {"count": 0}

    def failing(self, logits, rows, row_ids):
        calls["count"] += 1
        if calls["count"] > 6 and any(params.seed == 666 for params in self.params):
            raise RuntimeError("injected row failure")
        return choose(self, logits, rows, row_ids)

    monkeypatch.setattr(RowSampling, "choose", failing)
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=30))
    good = [manager.add_request(prompt, streaming=row == 1) for row, prompt in enumerate(PROMPTS[:3])]
    bad = manager.add_request(PROMPTS[3], sampling=SamplingParams(temperature=1.0, seed=666))
    manager.start()
    try:
        finished = results(manager, 4)
    finally:
        manager.stop(block=True, timeout=10)
    assert "injected row failure" in finished[bad].error
    for request_id, prompt in zip(good, PROMPTS[:3]):
        assert finished[request_id].error is None
        assert finished[request_id].generated_tokens == alone(model, prompt, max_new_tokens=30)
    assert manager.background_thread_status.fatal_error is None
