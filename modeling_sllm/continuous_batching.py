"""Continuous batching for the sentence loop, behind Transformers' continuous-batching interface.

`SLLMForCausalLM.init_continuous_batching` returns a `SentenceBatchingManager`, the object that
`transformers serve --continuous-batching` (and `sllm-serve`) drives: `start`, `add_request`,
`register_result_handler`, `cancel_request`, `stop`; results are Transformers' `GenerationOutput`; the server reads
health from `background_thread_status.fatal_error`. A background thread runs one `SentenceLoop` over every active
request: the requests that arrived read their prompts as sentences together and join the loop before its next step
(`SentenceLoop.join`); a request leaves when it is done or cancelled (`SentenceLoop.keep`); a streaming request gets
its first token one decoder step after its prompt is read (tokens are final when written), then a result at each
sentence end. At most `max_requests_per_batch` rows run at once (default
`DEFAULT_MAX_ROWS`); later requests wait in the queue, in order, and are never dropped.
"""

import asyncio
import copy
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.utils import logging

from .generation_sllm import SentenceLoop
from .transformers_compat import GenerationOutput, OutputRouter, set_result_handler

# Under Transformers' logger, so that `transformers serve --log-level` (and transformers.logging) governs it.
logger = logging.get_logger("transformers.sllm.continuous_batching")

# Rows of the running loop when the continuous-batching config sets no `max_requests_per_batch`. A row holds one
# cache entry per sentence (plus the decoder's few columns), so memory is rarely the bound; the decoder step's cost
# grows with the rows, and a request's share of it with them.
DEFAULT_MAX_ROWS = 64

# ContinuousBatchingConfig fields the sentence loop honours; the others configure Transformers' paged token cache
# and its scheduler (pages, blocks, scheduler type, CUDA graphs, compilation, offloading) and are refused when set to anything but their default.
HONOURED_CONFIG_FIELDS = {"max_requests_per_batch", "max_queue_size", "seed"}


def refused_config_fields(config: ContinuousBatchingConfig) -> list[str]:
    """The fields of `config` set away from their defaults that the sentence loop cannot honour."""
    default = ContinuousBatchingConfig()
    return [
        field.name
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(default, field.name) and field.name not in HONOURED_CONFIG_FIELDS
    ]


@dataclasses.dataclass
class WorkerStatus:
    """The background thread's health, as the server reads it: the error that stopped it, or None."""

    fatal_error: BaseException | None = None


@dataclasses.dataclass
class SentenceRequest:
    """A request in the manager: its limits and the output it reports (generated tokens as they are reported)."""

    output: GenerationOutput
    max_new_tokens: int
    eos: list[int]
    streaming: bool


class SentenceBatchingManager:
    """Continuous batching of SLLM generation: requests join the running sentence loop, leave it when done, and
    stream their first token at once, then a sentence at a time. Sampling settings come from the generation config given at construction (shared,
    as in Transformers' manager); each request has its own prompt, `max_new_tokens` and eos ids."""

    def __init__(
        self,
        model,
        generation_config: GenerationConfig | None = None,
        continuous_batching_config: ContinuousBatchingConfig | None = None,
    ):
        config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
        # The sentence cache is what is batched: a config's use_cache=False (transformers serve sets it for its own
        # paged cache) does not apply here.
        config.use_cache = True
        refused = [name for name in ("stop_strings", "max_time") if getattr(config, name) is not None]
        if (config.num_return_sequences or 1) > 1:
            refused.append("num_return_sequences > 1")
        if refused:
            raise ValueError(
                f"continuous batching of an SLLM does not support {', '.join(f'`{name}`' for name in refused)}: a "
                "request's own limits are `max_new_tokens` and `eos_token_id`"
            )
        settings, _, _ = model._loop_settings(None, None, config, None, None, None)
        cb_config = continuous_batching_config or ContinuousBatchingConfig()
        if refused := refused_config_fields(cb_config):
            raise ValueError(
                f"continuous batching of an SLLM does not support the ContinuousBatchingConfig options {', '.join(refused)}: it "
                "batches the sentence cache in order of arrival; set `max_requests_per_batch` (rows), `max_queue_size`, `seed`"
            )
        self.model, self.settings, self.parts = model, settings, model.sentence_model_parts()
        self.generation_config = config
        self.max_rows = cb_config.max_requests_per_batch or DEFAULT_MAX_ROWS
        self.seed = cb_config.seed
        self.sentence_limit = self.parts.backbone_positions or self.parts.text_config.max_position_embeddings
        self.input_queue: queue.Queue[SentenceRequest] = queue.Queue(maxsize=cb_config.max_queue_size)
        self.output_router = OutputRouter()
        self.background_thread_status = WorkerStatus()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._request_counter = 0
        self._stopping = threading.Event()
        self._hard_stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------ the caller's side ------------------------------------------------

    def start(self) -> None:
        """Start the background thread that runs the sentence loop."""
        if self.is_running():
            logger.warning("The sentence batching thread is already running.")
            return
        self._stopping.clear()
        self._hard_stop = False
        self.background_thread_status = WorkerStatus()
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self._thread = threading.Thread(target=self._run, name="sllm-continuous-batching", daemon=True)
        self._thread.start()
        logger.info(f"SLLM continuous batching started: at most {self.max_rows} rows, {torch.get_num_threads()} threads")

    def is_running(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:  # fmt: skip
        """Stop the background thread: after the queued and active requests finish, or at once with `hard_stop`
        (they fail with an error saying so). `keep_for_next_session` is accepted for the interface; a stopped
        manager can be started again."""
        self._hard_stop = hard_stop
        self._stopping.set()
        if block and self._thread is not None:
            self._thread.join(timeout)

    def add_request(
        self,
        input_ids: list[int],
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        streaming: bool = False,
        record_timestamps: bool = False,
        eos_token_id: int | list[int] | None = None,
        **logit_processor_kwargs,
    ) -> str:
        """Queue a request (its prompt as token ids; empty: an unconditional text). Raises a ValueError naming
        what is wrong with it: ids outside the vocabulary, a prompt of more sentences than the backbone holds, a
        `max_new_tokens` that is not a positive integer, per-request options the loop does not have."""
        if record_timestamps or logit_processor_kwargs:
            names = ["record_timestamps"] * bool(record_timestamps) + sorted(logit_processor_kwargs)
            raise ValueError(f"continuous batching of an SLLM does not support per-request {', '.join(names)}")
        if self._stopping.is_set() or self.background_thread_status.fatal_error is not None:
            raise RuntimeError("the SLLM's continuous batching manager is stopped: it takes no new requests")
        ids = self.check_prompt(input_ids)
        budget = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if eos_token_id is None or eos_token_id == -1:  # Transformers' "no eos" is -1
            eos = [] if eos_token_id == -1 else self.settings.eos.tolist()
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if request_id is None:
            with self._lock:
                request_id, self._request_counter = f"req_{self._request_counter}", self._request_counter + 1
        output = GenerationOutput(request_id=request_id, prompt_ids=ids)
        self.input_queue.put(SentenceRequest(output, budget, eos, streaming), block=True, timeout=10)
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
        """Drop a request (a client that went away): its row leaves the loop at the next step, nothing more is
        reported for it."""
        with self._lock:
            self._cancelled.add(request_id)

    def register_result_handler(self, request_id: str, callback: Callable) -> None:
        """Have `callback` called on the running event loop with each result of `request_id` (streaming: its first
        token, then one per sentence; else the final one); it is dropped once the request is finished."""
        set_result_handler(self.output_router, request_id, callback, asyncio.get_running_loop())

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """The next result without a handler (of `request_id` if given), or None after `timeout` seconds."""
        try:
            result = self.output_router.output_queue.get(block=True, timeout=timeout)
        except queue.Empty:
            return None
        if request_id is not None and result.request_id != request_id:
            self.output_router.output_queue.put(result)
            return None
        return result

    # ------------------------------------------------ the background thread ------------------------------------------------

    def _run(self) -> None:
        """The background thread: the loop until stopped; a crash is recorded and fails every request held."""
        active: list[SentenceRequest] = []
        try:
            with torch.no_grad():
                self._serve(active)
        except BaseException as error:  # noqa: BLE001 (the thread must report whatever stopped it)
            logger.exception("The SLLM's continuous batching thread stopped with an error")
            self.background_thread_status.fatal_error = error
            self._fail(active + self._drain(), f"the continuous batching thread stopped: {error!r}")

    def _serve(self, active: list[SentenceRequest]) -> None:
        """Admit, step, report, until stopped (`active`: the requests of the loop's rows, in row order)."""
        loop, status = None, None
        while True:
            if self._hard_stop:
                self._fail(active + self._drain(), "the continuous batching manager was stopped")
                return
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
            changed = False
            if cancelled and active:
                kept = [row for row, request in enumerate(active) if request.output.request_id not in cancelled]
                left = [request.output.request_id for request in active if request.output.request_id in cancelled]
                if left:
                    logger.info(f"Cancelled {', '.join(left)}: their rows left the sentence loop")
                loop, changed = self._keep(loop, active, kept), len(kept) < len(active)
            new = self._take(self.max_rows - len(active), wait=not active, cancelled=cancelled)
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
            except Exception as error:  # noqa: BLE001 (the rows' requests fail, the server goes on)
                logger.exception("A step of the sentence loop failed")
                self._fail(active, f"generation failed: {error!r}")
                loop = None
                active.clear()
                continue
            rows = len(active)
            loop = self._report(loop, active)
            if loop is not None and len(active) < rows:
                status = loop.read_status()

    def _take(self, room: int, wait: bool, cancelled: set[str]) -> list[SentenceRequest]:
        """Up to `room` queued requests (waiting briefly for one when nothing runs), cancelled ones dropped."""
        taken = []
        while len(taken) < room:
            try:
                request = self.input_queue.get(block=wait and not taken, timeout=0.05)
            except queue.Empty:
                break
            if request.output.request_id in cancelled:
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
        """A sentence loop over the requests' prompts (left padded), read in one batch; None if that fails (the
        requests fail with the error)."""
        device = self.model.device
        width = max(len(request.output.prompt_ids) for request in requests)
        ids = torch.full((len(requests), width), self.settings.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):
            prompt = request.output.prompt_ids
            if prompt:
                ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
                mask[row, width - len(prompt) :] = 1
            request.output.status = RequestStatus.DECODING
            request.output.lifespan = (time.perf_counter(), -1)
        budget = torch.tensor([request.max_new_tokens for request in requests], device=device)
        eos_width = max(len(request.eos) for request in requests)
        eos = [request.eos + [-1] * (eos_width - len(request.eos)) for request in requests]
        eos = torch.tensor(eos, dtype=torch.long, device=device)  # [N, E]; E = 0 when none has eos ids
        settings = dataclasses.replace(self.settings, max_new_tokens=int(budget.max()))
        try:
            return SentenceLoop(self.parts, settings, ids, mask, budget=budget, eos=eos)
        except Exception as error:  # noqa: BLE001 (these requests fail, the loop goes on)
            logger.exception("Reading prompts failed")
            self._fail(requests, f"reading the prompt failed: {error!r}")
            return None

    def _report(self, loop: SentenceLoop, active: list[SentenceRequest]) -> SentenceLoop | None:
        """Deliver what streaming rows wrote since their last result, at their first token and at each sentence
        end, and the requests that are done; done rows leave the loop. Returns the loop, None when no row is left.

        A result per token would cost the server a send per row at every decoder step (at 64 rows the HTTP side
        then takes the GIL from the loop), while a sentence is the unit the loop works in."""
        finished, done, written = torch.stack([loop.finished.long(), loop.done.long(), loop.writer.written]).tolist()
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
            output = active[row].output
            output.generated_tokens = tokens[: written[row]]
            if done[row]:
                output.status = RequestStatus.FINISHED
                output.lifespan = (output.lifespan[0], time.perf_counter())
            outputs.append(dataclasses.replace(output, generated_tokens=list(output.generated_tokens)))
        self.output_router.deliver_batch(outputs)
        return self._keep(loop, active, [row for row in range(len(active)) if not done[row]])

    def _keep(self, loop: SentenceLoop, active: list[SentenceRequest], kept: list[int]) -> SentenceLoop | None:
        """The loop with only rows `kept` (and `active` with their requests); None if none is."""
        if len(kept) < len(active) and kept:
            loop.keep(torch.tensor(kept, device=loop.done.device))
        active[:] = [active[row] for row in kept]
        return loop if kept else None

    def _fail(self, requests: list[SentenceRequest], error: str) -> None:
        """Deliver each request as failed with `error`."""
        for request in requests:
            request.output.status, request.output.error = RequestStatus.FAILED, error
        self.output_router.deliver_batch([dataclasses.replace(request.output) for request in requests])


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
