"""Continuous batching for the sentence loop, behind Transformers' continuous-batching interface.

`SLLMForCausalLM.init_continuous_batching` returns a `SentenceBatchingManager`, the object that
`transformers serve --continuous-batching` and `sllm-serve` drive: `start`, `add_request`,
`register_result_handler`, `cancel_request`, `stop`; results are Transformers' `GenerationOutput`; the server reads
health from `background_thread_status.fatal_error`. A background thread runs one `SentenceLoop` over every active
request: the requests that arrived read their prompts as sentences together and join the loop before its next step
(`SentenceLoop.join`); a request leaves when it is done or cancelled (`SentenceLoop.keep`); a streaming request gets
its first token one decoder step after its prompt is read (tokens are final when written), then a result at each
sentence end. Each request has its own prompt, limits, eos ids and sampling settings (`SamplingParams`: greedy
and sampled rows in one step, each sampled row its own random stream). At most `max_requests_per_batch` rows run at
once (default `DEFAULT_MAX_ROWS`); later requests wait in the queue, in order; past `max_queue_size` waiting
requests `add_request` raises `QueueFull` at once.

Failures stay where they arise: a request the loop cannot read fails alone; after a failed step each of its
requests is read again alone (from its prompt and the tokens it has reported) and takes a step alone, so that only
the requests that fail alone fail; an error in the loop's own bookkeeping fails the requests it held and the loop
starts again.
"""

import asyncio
import copy
import dataclasses
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.utils import logging

from .sentence_loop import SentenceLoop
from .row_sampling import ROW_FIELDS, RowSampling, SamplingParams
from .transformers_compat import GenerationOutput, prepare_generation_config

# Under Transformers' logger, so that `transformers serve --log-level` (and transformers.logging) governs it.
logger = logging.get_logger("transformers.sllm.continuous_batching")

# Rows of the running loop when the continuous-batching config sets no `max_requests_per_batch`. A row holds one
# cache entry per sentence (plus the decoder's few columns), so memory is rarely the bound; the decoder step's cost
# grows with the rows, and a request's share of it with them.
DEFAULT_MAX_ROWS = 64

# Requests that may wait for a row when the continuous-batching config sets no `max_queue_size` (its 0 means
# unbounded there). A waiting request holds only its prompt ids; the bound is on latency: at 64 rows of this
# machine's shipped pair, 1,024 waiting requests of 64 tokens take about a minute and a half to start.
DEFAULT_MAX_QUEUED = 1024

# ContinuousBatchingConfig fields the sentence loop honours; the others configure Transformers' paged token cache
# and its scheduler (pages, blocks, scheduler type, CUDA graphs, compilation, offloading) and are refused when set to anything but their default.
HONOURED_CONFIG_FIELDS = {"max_requests_per_batch", "max_queue_size", "seed"}

# Generation-config fields that set no sampling, limit or processor: accepted in a request's config as they are.
INERT_FIELDS = {
    "pad_token_id", "bos_token_id", "use_cache", "transformers_version", "_from_model_config", "output_attentions",
    "output_hidden_states", "return_dict_in_generate", "output_scores", "output_logits", "num_beams", "num_return_sequences",
}  # fmt: skip
# Generation-config fields of a request's own limits.
PER_REQUEST_FIELDS = {"max_new_tokens", "min_new_tokens", "eos_token_id"}


def refused_config_fields(config: ContinuousBatchingConfig) -> list[str]:
    """The fields of `config` set away from their defaults that the sentence loop cannot honour."""
    default = ContinuousBatchingConfig()
    return [
        field.name
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(default, field.name) and field.name not in HONOURED_CONFIG_FIELDS
    ]


class QueueFull(RuntimeError):
    """`add_request` past the bound on waiting requests: try again later (a server answers 503)."""


class ManagerStopped(RuntimeError):
    """`add_request` on a stopped manager (a server shutting down answers 503)."""


@dataclasses.dataclass
class WorkerStatus:
    """The background thread's health, as the server reads it: the error that stopped it, or None."""

    fatal_error: BaseException | None = None


@dataclasses.dataclass
class RequestSettings:
    """What one request asks of the loop besides its prompt."""

    max_new_tokens: int
    min_new_tokens: int
    eos: list[int]
    sampling: SamplingParams


@dataclasses.dataclass
class SentenceRequest:
    """A request in the manager: its settings and the output it reports (generated tokens as they are reported)."""

    output: GenerationOutput
    settings: RequestSettings
    streaming: bool
    cancelled: bool = False
    prefix: list[int] = dataclasses.field(default_factory=list)  # tokens reported before its row's current loop
    generator: torch.Generator | None = None  # a sampled row's random stream, kept when the row is read again


class ResultRouter:
    """Results to their handlers (called on the handler's event loop), or to a queue read by `get`. A result that
    arrives before its request's handler is registered waits for it; a finished request's handler is dropped."""

    def __init__(self):
        self.handlers: dict[str, tuple[Callable, asyncio.AbstractEventLoop]] = {}
        self.unclaimed: deque[GenerationOutput] = deque()
        self._ready = threading.Condition()

    def register(self, request_id: str, callback: Callable, loop: asyncio.AbstractEventLoop) -> None:
        """Send `request_id`'s results to `callback` on `loop`, those that came before first."""
        with self._ready:
            early = [result for result in self.unclaimed if result.request_id == request_id]
            for result in early:
                self.unclaimed.remove(result)
            if not any(result.is_finished() for result in early):
                self.handlers[request_id] = (callback, loop)
        if early:
            loop.call_soon_threadsafe(lambda: [callback(result) for result in early])

    def forget(self, request_id: str) -> None:
        """Drop a request's handler and its unclaimed results (a cancelled request)."""
        with self._ready:
            self.handlers.pop(request_id, None)
            for result in [result for result in self.unclaimed if result.request_id == request_id]:
                self.unclaimed.remove(result)

    def deliver(self, results: list[GenerationOutput]) -> None:
        """Each result to its handler (one call per event loop) or to the unclaimed queue."""
        calls: dict[asyncio.AbstractEventLoop, list] = {}
        with self._ready:
            for result in results:
                entry = self.handlers.get(result.request_id)
                if entry is None:
                    self.unclaimed.append(result)
                    continue
                if result.is_finished():
                    del self.handlers[result.request_id]
                calls.setdefault(entry[1], []).append((entry[0], result))
            self._ready.notify_all()
        for loop, batch in calls.items():
            loop.call_soon_threadsafe(lambda batch=batch: [callback(result) for callback, result in batch])

    def get(self, request_id: str | None, timeout: float | None) -> GenerationOutput | None:
        """The next unclaimed result (of `request_id` if given), waiting up to `timeout` seconds; None if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                for result in self.unclaimed:
                    if request_id is None or result.request_id == request_id:
                        self.unclaimed.remove(result)
                        return result
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._ready.wait(left)

    def __len__(self) -> int:
        """Registered handlers (a server's open requests)."""
        with self._ready:
            return len(self.handlers)


class SentenceBatchingManager:
    """Continuous batching of SLLM generation: requests join the running sentence loop, leave it when done, and
    stream their first token at once, then a sentence at a time. Each request has its own prompt, limits, eos ids
    and sampling settings; those it does not give come from the generation config given at construction."""

    def __init__(
        self,
        model,
        generation_config: GenerationConfig | None = None,
        continuous_batching_config: ContinuousBatchingConfig | None = None,
        threads: int | None = None,
        max_new_tokens_limit: int | None = None,
    ):
        """`threads`: intra-op threads of the loop's thread (default: torch's count where the manager is built);
        `max_new_tokens_limit`: the most new tokens a request may ask for (default: what the backbone's positions
        hold at the longest sentences)."""
        config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
        cb_config = continuous_batching_config or ContinuousBatchingConfig()
        if refused := refused_config_fields(cb_config):
            raise ValueError(
                f"continuous batching of an SLLM does not support the ContinuousBatchingConfig options {', '.join(refused)}: it "
                "batches the sentence cache in order of arrival; set `max_requests_per_batch` (rows), `max_queue_size`, `seed`"
            )
        self.model, self.parts = model, model.sentence_model_parts()
        self.sentence_limit = self.parts.backbone_positions or self.parts.text_config.max_position_embeddings
        self.max_new_tokens_limit = max_new_tokens_limit or self.sentence_limit * model.config.max_sentence_len
        # The loop's shared settings carry no sampling: each row samples with its own settings (RowSampling).
        self.settings = self.loop_settings(config)
        resolved, _ = prepare_generation_config(model, config)
        self.default_sampling = SamplingParams.from_generation_config(resolved)
        self.generation_config = config
        self.max_rows = cb_config.max_requests_per_batch or DEFAULT_MAX_ROWS
        self.max_queued = cb_config.max_queue_size or DEFAULT_MAX_QUEUED
        self.seeds = random.Random(cb_config.seed) if cb_config.seed is not None else None  # for unseeded rows
        self.threads = threads or torch.get_num_threads()
        self.input_queue: queue.Queue[SentenceRequest] = queue.Queue()
        self.output_router = ResultRouter()
        self.background_thread_status = WorkerStatus()
        self._live: dict[str, SentenceRequest] = {}  # queued or running, by id
        self._lock = threading.Lock()
        self._request_counter = 0
        self._stopping = threading.Event()
        self._deadline: float | None = None  # a soft stop's: past it, the requests left fail
        self._thread: threading.Thread | None = None

    def loop_settings(self, config: GenerationConfig):
        """The loop settings of a config with its sampling fields taken out (rows sample on their own), after
        refusing what the loop cannot do per request."""
        refused = [name for name in ("stop_strings", "max_time") if getattr(config, name) is not None]
        if (config.num_return_sequences or 1) > 1:
            refused.append("num_return_sequences > 1")
        if refused:
            raise ValueError(
                f"continuous batching of an SLLM does not support {', '.join(f'`{name}`' for name in refused)}: a "
                "request's own limits are `max_new_tokens`, `min_new_tokens` and `eos_token_id` (a server ends texts "
                "at stop strings itself)"
            )
        neutral = copy.deepcopy(config)
        neutral.do_sample = False
        for name in ROW_FIELDS[1:]:
            setattr(neutral, name, None)
        settings, _, _ = self.model._loop_settings(None, None, neutral, None, None, None)
        if len(settings.processors):
            names = ", ".join(type(processor).__name__ for processor in settings.processors)
            raise ValueError(f"continuous batching of an SLLM does not support the logits processors {names}")
        return settings

    def request_settings(
        self,
        config: GenerationConfig | None,
        max_new_tokens: int | None,
        min_new_tokens: int | None,
        eos_token_id: int | list[int] | None,
        sampling: SamplingParams | None,
    ) -> RequestSettings:
        """One request's settings: the arguments, else its generation config's fields (`config`; sampling fields it
        leaves unset are off), else the manager's defaults. Raises a ValueError naming what it cannot honour."""
        if config is not None:
            unknown = sorted(set(config.to_diff_dict()) - INERT_FIELDS - set(ROW_FIELDS) - PER_REQUEST_FIELDS)
            if unknown:
                raise ValueError(
                    f"continuous batching of an SLLM does not support {', '.join(f'`{name}`' for name in unknown)} "
                    f"in a request's generation config; it takes {', '.join(sorted(set(ROW_FIELDS) | PER_REQUEST_FIELDS))}"
                )
            self.loop_settings(config)
            max_new_tokens = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
            min_new_tokens = min_new_tokens if min_new_tokens is not None else config.min_new_tokens
            eos_token_id = eos_token_id if eos_token_id is not None else config.eos_token_id
            sampling = sampling or SamplingParams.from_generation_config(config)
        budget = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if budget > self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens must be at most {self.max_new_tokens_limit}, got {budget}")
        least = self.settings.min_new_tokens if min_new_tokens is None else min_new_tokens
        if isinstance(least, bool) or not isinstance(least, int) or least < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
        if eos_token_id is None or eos_token_id == -1:  # Transformers' "no eos" is -1
            eos = [] if eos_token_id == -1 else self.settings.eos.tolist()
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return RequestSettings(budget, min(least, budget), eos, sampling or self.default_sampling)

    # ------------------------------------------------ the caller's side ------------------------------------------------

    def start(self) -> None:
        """Start the background thread that runs the sentence loop."""
        if self.is_running():
            logger.warning("The sentence batching thread is already running.")
            return
        self._stopping.clear()
        self._deadline = None
        self.background_thread_status = WorkerStatus()
        self._thread = threading.Thread(target=self._run, name="sllm-continuous-batching", daemon=True)
        self._thread.start()
        logger.info(f"SLLM continuous batching started: at most {self.max_rows} rows, {self.threads} threads")

    def is_running(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False, grace: float | None = None) -> None:  # fmt: skip
        """Stop taking requests and stop the background thread once the queued and active requests finish; those
        still held after `grace` seconds (at once with `hard_stop`; an earlier stop's sooner deadline stays) fail
        with an error saying so. `timeout`: how
        long to wait for the thread when blocking (default: the grace period and a little). A stopped manager can
        be started again; `keep_for_next_session` is accepted for Transformers' interface."""
        grace = 0.0 if hard_stop else grace
        with self._lock:  # an earlier stop's deadline stays if it is sooner
            if grace is not None and (self._deadline is None or time.monotonic() + grace < self._deadline):
                self._deadline = time.monotonic() + grace
            self._stopping.set()
        if block and self._thread is not None:
            self._thread.join(timeout if timeout is not None or grace is None else grace + 5)

    def add_request(
        self,
        input_ids: list[int],
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        streaming: bool = False,
        record_timestamps: bool = False,
        eos_token_id: int | list[int] | None = None,
        *,
        min_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        generation_config: GenerationConfig | None = None,
        on_result: Callable | None = None,
        **logit_processor_kwargs,
    ) -> str:
        """Queue a request (its prompt as token ids; empty: an unconditional text) with its own limits and sampling
        (`sampling`, else its `generation_config`'s, else the manager's). `on_result` is registered as its result
        handler before it is queued (a server must not miss a result). Raises a ValueError naming what is wrong
        with it (ids outside the vocabulary, a prompt of more sentences than the backbone holds, a limit out of
        range, settings the loop does not have), `QueueFull` past the bound on waiting requests, `ManagerStopped`
        once the manager is stopped."""
        if record_timestamps or logit_processor_kwargs:
            names = ["record_timestamps"] * bool(record_timestamps) + sorted(logit_processor_kwargs)
            raise ValueError(f"continuous batching of an SLLM does not support per-request {', '.join(names)}")
        ids = self.check_prompt(input_ids)
        settings = self.request_settings(generation_config, max_new_tokens, min_new_tokens, eos_token_id, sampling)
        if settings.sampling.sampled and settings.sampling.seed is None and self.seeds is not None:
            settings.sampling = dataclasses.replace(settings.sampling, seed=self.seeds.getrandbits(63))
        with self._lock:
            if self._stopping.is_set() or self.background_thread_status.fatal_error is not None:
                raise ManagerStopped("the SLLM's continuous batching manager is stopped: it takes no new requests")
            if self.input_queue.qsize() >= self.max_queued:
                raise QueueFull(f"{self.max_queued} requests are waiting for a row already: retry later")
            if request_id is None:
                request_id, self._request_counter = f"req_{self._request_counter}", self._request_counter + 1
            if request_id in self._live:
                raise ValueError(f"a request with id {request_id!r} is running already")
            request = SentenceRequest(GenerationOutput(request_id=request_id, prompt_ids=ids), settings, streaming)
            if on_result is not None:
                self.output_router.register(request_id, on_result, asyncio.get_running_loop())
            self._live[request_id] = request
            self.input_queue.put_nowait(request)
        return request_id

    def check_prompt(self, input_ids: list[int]) -> list[int]:
        """The prompt as a list of ids, after checking its ids and that the backbone holds its sentences."""
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        vocab_size = self.parts.text_config.vocab_size
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"a prompt's token ids must be integers in [0, {vocab_size})")
        if ids:
            sentences = int(self.parts.segmentation_rule.segment(torch.tensor([ids])).num_sentences[0])
            if sentences + 1 > self.sentence_limit:  # the start state, then one position per sentence
                raise ValueError(
                    f"the prompt has {sentences} sentences ({len(ids)} tokens), but the model holds the start state "
                    f"and at most {self.sentence_limit - 1} sentences"
                )
        return ids

    def add_requests(self, inputs: list[list[int]], max_new_tokens: int | None = None, streaming: bool = False,
                     **kwargs) -> list[str]:  # fmt: skip
        """`add_request` for each prompt, in order. Returns their ids."""
        return [self.add_request(ids, max_new_tokens=max_new_tokens, streaming=streaming, **kwargs) for ids in inputs]

    def cancel_request(self, request_id: str) -> None:
        """Drop a request (a client that went away), queued or running: its row leaves the loop before the next
        step, its handler is forgotten, nothing more is reported for it. Unknown or finished ids: nothing."""
        with self._lock:
            request = self._live.get(request_id)
            if request is not None:
                request.cancelled = True
        self.output_router.forget(request_id)

    def register_result_handler(self, request_id: str, callback: Callable) -> None:
        """Have `callback` called on the running event loop with each result of `request_id` (streaming: its first
        token, then one per sentence; else the final one), those that came before it first; it is dropped once
        the request is finished."""
        self.output_router.register(request_id, callback, asyncio.get_running_loop())

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """The next result without a handler (of `request_id` if given), or None after `timeout` seconds."""
        return self.output_router.get(request_id, timeout)

    def held(self) -> dict[str, int]:
        """What the manager holds now: requests queued or running, of them queued, and registered result handlers."""
        with self._lock:
            live = len(self._live)
        return {"requests": live, "queued": self.input_queue.qsize(), "handlers": len(self.output_router)}

    # ------------------------------------------------ the background thread ------------------------------------------------

    def _run(self) -> None:
        """The background thread: the loop until stopped. An error in the loop's bookkeeping fails the requests it
        held and starts it again; only an error that is not an Exception stops the thread."""
        torch.set_num_threads(self.threads)  # this thread's own count (a server may keep its main thread at 1)
        active: list[SentenceRequest] = []
        try:
            with torch.no_grad():
                while True:
                    try:
                        self._serve(active)
                        return
                    except Exception as error:  # noqa: BLE001 (the held requests fail, the loop starts again)
                        logger.exception("The sentence loop failed; it starts again without the requests it held")
                        self._fail(active, f"the sentence loop failed: {error!r}")
                        active.clear()
                        time.sleep(0.1)  # a failure that recurs at once must not spin the thread
        except BaseException as error:  # noqa: BLE001 (the thread must report whatever stopped it)
            logger.exception("The SLLM's continuous batching thread stopped with an error")
            self.background_thread_status.fatal_error = error
            self._fail(active + self._drain(), f"the continuous batching thread stopped: {error!r}")

    def _serve(self, active: list[SentenceRequest]) -> None:
        """Admit, step, report, until stopped (`active`: the requests of the loop's rows, in row order)."""
        loop, status = None, None
        while True:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._fail(active + self._drain(), "the server stopped before this request finished")
                active.clear()
                return
            changed = False
            if any(request.cancelled for request in active):
                kept = [row for row, request in enumerate(active) if not request.cancelled]
                self._forget([request for request in active if request.cancelled])
                logger.info(f"Cancelled {len(active) - len(kept)} running requests: their rows left the sentence loop")
                loop, changed = self._keep(loop, active, kept), True
            new = self._take(self.max_rows - len(active), wait=not active)
            joined = self._read_prompts(new) if new else None
            if joined is not None:
                if loop is None:
                    loop = joined
                else:
                    loop.join(joined)
                active.extend(new)
                loop, changed = self._report(loop, active), True  # rows the stop head ended at once leave
            if loop is None:
                if self._stopping.is_set() and self.input_queue.empty():
                    return
                continue
            if changed:
                status = loop.read_status()
            try:
                status = loop.step(status)
            except Exception:  # noqa: BLE001 (the requests that fail alone fail, the others go on)
                logger.exception("A step of the sentence loop failed: its requests take a step alone")
                loop = self._isolate(active)
                if loop is not None:
                    status = loop.read_status()
                continue
            rows = len(active)
            loop = self._report(loop, active)
            if loop is not None and len(active) < rows:
                status = loop.read_status()

    def _isolate(self, requests: list[SentenceRequest]) -> SentenceLoop | None:
        """After a failed step: each of its requests is read again alone, from its prompt and the tokens it has
        reported, and takes one step alone; those that fail alone fail with their error, the others are joined in
        one loop again (`requests` becomes them). Greedy rows go on as they would have; sampled rows go on with
        their own generators, a valid sample but not the one an unbroken run draws."""
        survivors, loops = [], []
        for request in requests:
            request.prefix = list(request.output.generated_tokens)
            try:
                loop = self._new_loop([request])
                loop.step(loop.read_status())
            except Exception as error:  # noqa: BLE001 (this request fails alone)
                logger.exception(f"Request {request.output.request_id} fails alone")
                self._fail([request], f"generation failed: {error!r}")
                continue
            survivors.append(request)
            loops.append(loop)
        for loop in loops[1:]:
            loops[0].join(loop)
        requests[:] = survivors
        return self._report(loops[0], requests) if loops else None

    def _take(self, room: int, wait: bool) -> list[SentenceRequest]:
        """Up to `room` queued requests (waiting briefly for one when nothing runs), cancelled ones dropped."""
        taken = []
        while len(taken) < room:
            try:
                request = self.input_queue.get(block=wait and not taken, timeout=0.05)
            except queue.Empty:
                break
            if request.cancelled:
                self._forget([request])
                continue
            taken.append(request)
        return taken

    def _drain(self) -> list[SentenceRequest]:
        """Every queued request, taken out of the queue."""
        drained = []
        while True:
            try:
                drained.append(self.input_queue.get_nowait())
            except queue.Empty:
                return drained

    def _read_prompts(self, requests: list[SentenceRequest]) -> SentenceLoop | None:
        """A sentence loop over the requests' prompts (left padded), read in one batch; if that fails, each is
        read alone, so that only the requests that fail alone fail (with their error). None if none is read."""
        try:
            return self._new_loop(requests)
        except Exception as error:  # noqa: BLE001 (the requests are read one by one)
            if len(requests) == 1:
                logger.exception("Reading a prompt failed")
                self._fail(requests, f"reading the prompt failed: {error!r}")
                return None
        read = [(request, self._read_prompts([request])) for request in requests]
        requests[:] = [request for request, loop in read if loop is not None]
        loops = [loop for _, loop in read if loop is not None]
        for loop in loops[1:]:
            loops[0].join(loop)
        return loops[0] if loops else None

    def _new_loop(self, requests: list[SentenceRequest]) -> SentenceLoop:
        """A sentence loop over the requests' prompts, left padded, with their own settings."""
        device = self.model.device
        width = max(len(request.output.prompt_ids) + len(request.prefix) for request in requests)
        ids = torch.full((len(requests), width), self.settings.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):
            prompt = request.output.prompt_ids + request.prefix
            if prompt:
                ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
                mask[row, width - len(prompt) :] = 1
            request.output.status = RequestStatus.DECODING
            request.output.lifespan = (time.perf_counter(), -1)
        settings = [request.settings for request in requests]
        done = [len(request.prefix) for request in requests]  # tokens written before (a request read again)
        budget = torch.tensor([max(s.max_new_tokens - d, 1) for s, d in zip(settings, done)], device=device)
        least = torch.tensor([max(s.min_new_tokens - d, 0) for s, d in zip(settings, done)], device=device)
        eos_width = max(len(setting.eos) for setting in settings)
        eos = [setting.eos + [-1] * (eos_width - len(setting.eos)) for setting in settings]
        eos = torch.tensor(eos, dtype=torch.long, device=device)  # [N, E]; E = 0 when none has eos ids
        sampling = RowSampling([setting.sampling for setting in settings], device,
                               [request.generator for request in requests])  # fmt: skip
        for request, generator in zip(requests, sampling.generators):
            request.generator = generator
        loop_settings = dataclasses.replace(self.settings, max_new_tokens=int(budget.max()))
        return SentenceLoop(self.parts, loop_settings, ids, mask, budget=budget, eos=eos, min_new=least, sampling=sampling)

    def _report(self, loop: SentenceLoop, active: list[SentenceRequest]) -> SentenceLoop | None:
        """Deliver what streaming rows wrote since their last result, at their first token and at each sentence
        end, and the requests that are done; done rows leave the loop. Returns the loop, None when no row is left.

        A result per token would cost the server a send per row at every decoder step (at 64 rows the HTTP side
        then takes the GIL from the loop), while a sentence is the unit the loop works in."""
        finished, done, written = torch.stack([loop.finished.long(), loop.done.long(), loop.writer.written]).tolist()
        written = [count + len(request.prefix) for count, request in zip(written, active)]  # a row read again
        rows = [
            row
            for row, request in enumerate(active)
            if done[row]
            or (
                request.streaming
                and written[row] != (reported := len(request.output.generated_tokens))
                and (reported == 0 or finished[row])
            )
        ]
        if not rows:
            return loop
        start = loop.writer.prompt_len
        text = loop.writer.text[rows, start : start + max(written[row] for row in rows)].tolist()
        outputs = []
        for tokens, row in zip(text, rows):
            output, prefix = active[row].output, active[row].prefix
            output.generated_tokens = prefix + tokens[: written[row] - len(prefix)]
            if done[row]:
                output.status = RequestStatus.FINISHED
                output.lifespan = (output.lifespan[0], time.perf_counter())
            outputs.append(dataclasses.replace(output, generated_tokens=list(output.generated_tokens)))
        self._forget([active[row] for row in rows if done[row]])
        self.output_router.deliver(outputs)
        return self._keep(loop, active, [row for row in range(len(active)) if not done[row]])

    def _keep(self, loop: SentenceLoop, active: list[SentenceRequest], kept: list[int]) -> SentenceLoop | None:
        """The loop with only rows `kept` (and `active` with their requests); None if none is."""
        if len(kept) < len(active) and kept:
            loop.keep(torch.tensor(kept, device=loop.done.device))
        active[:] = [active[row] for row in kept]
        return loop if kept else None

    def _forget(self, requests: list[SentenceRequest]) -> None:
        """The requests are no longer held (finished, failed or cancelled)."""
        with self._lock:
            for request in requests:
                self._live.pop(request.output.request_id, None)

    def _fail(self, requests: list[SentenceRequest], error: str) -> None:
        """Deliver each request as failed with `error`."""
        for request in requests:
            request.output.status, request.output.error = RequestStatus.FAILED, error
        self._forget(requests)
        self.output_router.deliver([dataclasses.replace(request.output) for request in requests])


class SLLMContinuousBatchingMixin:
    """Transformers' continuous-batching entry points for SLLMForCausalLM, on the sentence loop."""

    def init_continuous_batching(
        self,
        generation_config: GenerationConfig | None = None,
        continuous_batching_config: ContinuousBatchingConfig | None = None,
        workload_hints=None,
    ) -> SentenceBatchingManager:
        """A manager for continuous batching (not started): see `SentenceBatchingManager`. `workload_hints`
        (sizing hints for Transformers' paged cache) are not needed by the sentence loop."""
        return SentenceBatchingManager(self, generation_config, continuous_batching_config)

    @torch.no_grad()
    def generate_batch(
        self,
        inputs: list[list[int]],
        generation_config: GenerationConfig | None = None,
        continuous_batching_config: ContinuousBatchingConfig | None = None,
        progress_bar: bool = False,
        **kwargs,
    ) -> dict[str, GenerationOutput]:
        """Generate for every prompt (lists of token ids) with continuous batching; returns {request id: output}
        as Transformers' `generate_batch` does. Raises if a request fails, naming it and why."""
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        kwargs.pop("warmup", None), kwargs.pop("persistent_manager", None)  # Transformers' CUDA-graph and cache reuse
        if kwargs:
            raise ValueError(f"generate_batch of an SLLM does not support {', '.join(sorted(kwargs))}")
        if not inputs:
            return {}
        if max_new_tokens is not None:  # the shared default, as Transformers' generate_batch takes it
            generation_config = copy.deepcopy(generation_config or self.generation_config)
            generation_config.max_new_tokens = max_new_tokens
        manager = self.init_continuous_batching(generation_config, continuous_batching_config)
        manager.start()
        results = {}
        try:
            request_ids = manager.add_requests(inputs, max_new_tokens=max_new_tokens)
            while len(results) < len(request_ids):
                result = manager.get_result(timeout=1)
                if result is None and manager.background_thread_status.fatal_error is not None:
                    raise RuntimeError("continuous batching stopped") from manager.background_thread_status.fatal_error
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                    if progress_bar:
                        print(f"\rgenerate_batch: {len(results)}/{len(request_ids)} requests", end="", flush=True)
        finally:
            manager.stop(block=True, hard_stop=len(results) < len(inputs))
        failed = {request_id: result.error for request_id, result in results.items() if result.error is not None}
        if failed:
            raise RuntimeError(f"generate_batch: {len(failed)} requests failed: {failed}")
        return {request_id: results[request_id] for request_id in request_ids}
