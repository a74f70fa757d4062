"""The OpenAI completions and chat routes of `sllm-serve` for an SLLM, on its own `SentenceBatchingManager`.

Transformers' handlers pass a continuous-batching manager only the prompt, the token limit and the eos ids; here every
request reaches the sentence loop with its own settings (temperature, 0 = greedy whatever the checkpoint's generation
config says; top_p; frequency and presence penalties; seed; the `generate` fields of its `generation_config`), `n`
choices, stop strings (the text ends before the first, finish_reason "stop"), `echo` and `logprobs` (from the model's
exact `logits`: the distribution before temperature and truncation). Fields it cannot honour get a 400 naming them.
A full queue answers 503 with Retry-After; a client that goes away cancels its rows.
"""

import asyncio
import concurrent.futures
import copy
import dataclasses
import json
import time
import uuid

import torch
from transformers import GenerationConfig

from .continuous_batching import ManagerStopped, QueueFull, SentenceBatchingManager
from .row_sampling import SamplingParams

# Fields of each route: honoured, and refused (a reason each). Any other field is answered 422, as Transformers does.
COMMON_FIELDS = {
    "model", "max_tokens", "n", "stop", "stream", "stream_options", "temperature", "top_p", "frequency_penalty",
    "presence_penalty", "seed", "user", "generation_config", "logprobs",
}  # fmt: skip
ROUTE_FIELDS = {
    "/v1/completions": COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix", "logit_bias"},
    "/v1/chat/completions": COMMON_FIELDS | {
        "messages", "max_completion_tokens", "top_logprobs", "logit_bias", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "function_call", "functions", "modalities", "audio", "prediction", "reasoning_effort",
        "service_tier", "store", "metadata", "web_search_options", "verbosity", "prompt_cache_key",
        "safety_identifier", "chat_template_kwargs",
    },  # fmt: skip
}
MAX_CHOICES = 16
MAX_LOGPROBS = {"/v1/completions": 5, "/v1/chat/completions": 20}


class RequestRefused(ValueError):
    """A request the SLLM's routes cannot honour: a 400 (422 for unknown fields) with the reason."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Ask:
    """One request, checked: its prompt ids, choices, limits, sampling, stops and what it returns."""

    route: str
    prompts: list[list[int]]  # one or more (a completions batch); each gets n choices
    n: int
    max_tokens: int
    sampling: SamplingParams
    generation_config: GenerationConfig | None
    stop: list[str]
    stream: bool
    echo: bool
    logprobs: int | None  # alternatives per token (0: the chosen token's only); None: no log-probabilities


def refusals(route: str, body: dict) -> None:
    """Raise `RequestRefused` for a field this server does not honour, naming it."""
    if unknown := sorted(set(body) - ROUTE_FIELDS[route]):
        raise RequestRefused(f"Unexpected fields in the request: {set(unknown)}", 422)
    present = {name for name, value in body.items() if value is not None}
    reasons = {
        "suffix": "`suffix` (fill-in-the-middle) is not supported: an SLLM writes left to right",
        "logit_bias": "`logit_bias` is not supported: use `generation_config` fields",
        "tools": "`tools` are not supported", "tool_choice": "`tool_choice` is not supported",
        "functions": "`functions` are not supported", "function_call": "`function_call` is not supported",
        "audio": "`audio` is not supported", "prediction": "`prediction` is not supported",
        "web_search_options": "`web_search_options` are not supported",
    }  # fmt: skip
    for name, reason in reasons.items():
        if name in present:
            raise RequestRefused(reason)
    if body.get("best_of") not in (None, 1, body.get("n") or 1):
        raise RequestRefused("`best_of` above `n` is not supported: ask for `n` choices and rank them yourself")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise RequestRefused("`response_format` other than {'type': 'text'} is not supported")
    if body.get("modalities") not in (None, ["text"]):
        raise RequestRefused("`modalities` other than ['text'] are not supported")
    if (options := body.get("stream_options")) is not None and (
        not isinstance(options, dict) or set(options) - {"include_usage"}
    ):
        raise RequestRefused("`stream_options` may hold only `include_usage`")


def integer_field(body: dict, name: str, low: int, high: int) -> int | None:
    """body[name] as an integer in [low, high], None when absent; refused otherwise."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise RequestRefused(f"`{name}` must be an integer in [{low}, {high}], got {value!r}")
    return value


def read_ask(route: str, body: dict, model, tokenizer) -> Ask:
    """Check a request body (after `serve.request_problem`) and turn it into an `Ask`."""
    refusals(route, body)
    config = GenerationConfig(**json.loads(body["generation_config"])) if body.get("generation_config") else None
    base = config if config is not None else model.generation_config
    n = integer_field(body, "n", 1, MAX_CHOICES) or 1
    echo = bool(body.get("echo"))
    if route == "/v1/completions":
        logprobs = integer_field(body, "logprobs", 0, MAX_LOGPROBS[route])
        prompts = completion_prompts(body.get("prompt", ""), tokenizer)
        if len(prompts) * n > MAX_CHOICES * 4:
            raise RequestRefused(f"{len(prompts)} prompts x n={n} choices: at most {MAX_CHOICES * 4} in one request")
    else:
        if body.get("logprobs") not in (None, True, False):
            raise RequestRefused(f"`logprobs` must be true or false, got {body['logprobs']!r}")
        top = integer_field(body, "top_logprobs", 0, MAX_LOGPROBS[route])
        if top is not None and not body.get("logprobs"):
            raise RequestRefused("`top_logprobs` needs `logprobs: true`")
        logprobs = (top or 0) if body.get("logprobs") else None
        prompts = [chat_prompt(body, tokenizer)]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        limit = base.max_new_tokens if base.max_new_tokens is not None else 16  # OpenAI's default
    if limit == 0 and not echo:
        raise RequestRefused("`max_tokens` must be a positive integer, got 0 (0 only with `echo`)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or any(not item for item in stop):
        raise RequestRefused("`stop` must hold at most 4 non-empty strings")
    temperature = body.get("temperature")
    if temperature is None:  # the generation config's choice where it makes one, else OpenAI's default 1.0
        chosen = base.temperature if base.temperature is not None else 1.0
        temperature = 0.0 if base.do_sample is False else chosen
    frequency, presence = body.get("frequency_penalty") or 0.0, body.get("presence_penalty") or 0.0
    sampling = SamplingParams.from_generation_config(
        base, temperature=float(temperature), frequency_penalty=float(frequency), presence_penalty=float(presence),
        seed=body.get("seed"), **({"top_p": float(body["top_p"])} if body.get("top_p") is not None else {}),
    )  # fmt: skip
    return Ask(route, prompts, n, limit, sampling, config, stop, bool(body.get("stream")), echo, logprobs)


def completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """A completions `prompt` as OpenAI's API takes it (a string, token ids, or a list of either: a batch) ->
    the prompts' token ids."""
    def token_ids(value) -> bool:
        return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)

    if isinstance(prompt, str):
        return [tokenizer(prompt, add_special_tokens=True).input_ids]
    if token_ids(prompt) and prompt:
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or (token_ids(p) and p) for p in prompt):
        return [tokenizer(p, add_special_tokens=True).input_ids if isinstance(p, str) else list(p) for p in prompt]
    raise RequestRefused("`prompt` must be a string, a list of token ids, or a non-empty list of either")


def chat_prompt(body: dict, tokenizer) -> list[int]:
    """The prompt ids of a chat request: its messages through the tokenizer's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestRefused("`messages` must be a non-empty list of message objects")
    if tokenizer.chat_template is None:
        raise RequestRefused("this model's tokenizer has no chat template: use /v1/completions")
    kwargs = body.get("chat_template_kwargs") or {}
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
    return list(encoded["input_ids"])


@dataclasses.dataclass
class Choice:
    """One choice of a request as it is written: its tokens, its text so far, and why it ended."""

    request_id: str
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters streamed so far
    finish_reason: str | None = None
    error: str | None = None


class SLLMRoutes:
    """`/v1/completions` and `/v1/chat/completions` for one SLLM: requests go to its sentence-batching manager."""

    def __init__(
        self, model, tokenizer, model_id: str, rows: int, max_queued: int, threads: int, grace: float, compile: bool
    ):
        """`compile`: the decoder's steps on the static cache, compiled (`transformers serve --compile`)."""
        from transformers import ContinuousBatchingConfig

        config = ContinuousBatchingConfig(max_requests_per_batch=rows, max_queue_size=max_queued)
        generation_config = copy.deepcopy(model.generation_config)
        if compile and generation_config.cache_implementation is None:
            generation_config.cache_implementation = "static"
        self.model, self.tokenizer, self.model_id, self.grace = model, tokenizer, model_id, grace
        self.manager = SentenceBatchingManager(model, generation_config, config, threads=threads)
        self.manager.start()
        self.scorer = concurrent.futures.ThreadPoolExecutor(1, "sllm-logprobs", torch.set_num_threads, (threads,))

    def shutdown(self, block: bool) -> None:
        """Take no more requests; those held fail after the grace period (counted from the first call)."""
        self.manager.stop(block=block, grace=self.grace)
        if block:
            self.scorer.shutdown(wait=False, cancel_futures=True)

    async def respond(self, ask: Ask, request):
        """The route's response to a checked request: JSON, or a stream of server-sent events."""
        from fastapi.responses import JSONResponse, StreamingResponse

        response_id = f"{'cmpl' if ask.route == '/v1/completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
        choices, updates = await self.submit(ask, response_id)
        if ask.stream:
            return StreamingResponse(self.events(ask, response_id, choices, updates), media_type="text/event-stream")
        watch = asyncio.ensure_future(self.watch_disconnect(request, choices, updates))
        try:
            while not all(choice.finish_reason or choice.error for choice in choices):
                await updates.get()
        finally:
            watch.cancel()
        if errors := [choice.error for choice in choices if choice.error]:
            return JSONResponse({"error": {"message": errors[0], "type": "server_error"}}, status_code=500)
        scores = await self.scores(ask, choices)
        body = {
            "id": response_id, "object": "text_completion" if ask.route == "/v1/completions" else "chat.completion",
            "created": int(time.time()), "model": self.model_id,
            "choices": [self.choice_body(ask, index, choice, scores[index]) for index, choice in enumerate(choices)],
            "usage": self.usage(ask, choices),
        }  # fmt: skip
        return JSONResponse(body)

    async def submit(self, ask: Ask, response_id: str) -> tuple[list[Choice], asyncio.Queue]:
        """Queue one request per choice (seeded choices: seed, seed + 1, ...); their results update `choices` and
        put their index on the returned queue. QueueFull (503) and ValueError (400) reach the caller."""
        updates: asyncio.Queue = asyncio.Queue()
        each = [prompt for prompt in ask.prompts for _ in range(ask.n)]  # choice i: prompt i // n
        choices = [Choice(f"{response_id}-{index}", prompt) for index, prompt in enumerate(each)]
        if ask.max_tokens == 0:  # echo only
            for index, choice in enumerate(choices):
                choice.finish_reason = "length"
                updates.put_nowait(index)
            return choices, updates
        added = []
        try:
            for index, choice in enumerate(choices):
                seed = None if ask.sampling.seed is None else ask.sampling.seed + index
                self.manager.add_request(
                    choice.prompt_ids, choice.request_id, max_new_tokens=ask.max_tokens, streaming=ask.stream or bool(ask.stop),
                    sampling=dataclasses.replace(ask.sampling, seed=seed), generation_config=ask.generation_config,
                    on_result=lambda result, index=index: self.update(ask, choices, index, result, updates),
                )  # fmt: skip
                added.append(choice.request_id)
        except Exception:
            for request_id in added:
                self.manager.cancel_request(request_id)
            raise
        return choices, updates

    def update(self, ask: Ask, choices: list[Choice], index: int, result, updates: asyncio.Queue) -> None:
        """A result of choice `index` (on the event loop): its text so far, cut at the first stop string."""
        choice = choices[index]
        if choice.finish_reason or choice.error:
            return
        if result.error is not None:
            choice.error = result.error
        else:
            choice.tokens = list(result.generated_tokens)
            choice.text = self.tokenizer.decode(choice.tokens, skip_special_tokens=True)
            cut = min((at for at in (choice.text.find(stop) for stop in ask.stop) if at >= 0), default=-1)
            if cut >= 0:
                choice.text, choice.finish_reason = choice.text[:cut], "stop"
                choice.tokens = self.tokens_of(choice)
                self.manager.cancel_request(choice.request_id)
            elif result.is_finished():
                choice.finish_reason = "length" if len(choice.tokens) >= ask.max_tokens else "stop"
        updates.put_nowait(index)

    def tokens_of(self, choice: Choice) -> list[int]:
        """The fewest of a choice's tokens whose text holds its (cut) text: what a stop string leaves."""
        for count in range(len(choice.tokens) + 1):
            if len(self.tokenizer.decode(choice.tokens[:count], skip_special_tokens=True)) >= len(choice.text):
                return choice.tokens[:count]
        return choice.tokens

    async def watch_disconnect(self, request, choices: list[Choice], updates: asyncio.Queue) -> None:
        """Cancel the choices' rows when the client goes away before they finish (the response is dropped)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        for index, choice in enumerate(choices):
            if not choice.finish_reason:
                self.manager.cancel_request(choice.request_id)
                choice.error = "the client went away"
                updates.put_nowait(index)

    async def events(self, ask: Ask, response_id: str, choices: list[Choice], updates: asyncio.Queue):
        """Server-sent events: each choice's new text as it is final (text that may begin a stop string is held
        back), then its finish reason; usage last; `data: [DONE]`."""
        held = max((len(stop) for stop in ask.stop), default=1) - 1
        try:
            for index, choice in enumerate(choices):  # chat: the role first; completions with echo: the prompt first
                if ask.route == "/v1/chat/completions":
                    yield self.chunk(ask, response_id, index, {"role": "assistant", "content": ""})
                elif ask.echo:
                    yield self.chunk(ask, response_id, index, self.tokenizer.decode(choice.prompt_ids, skip_special_tokens=True))
            finished = set()
            while len(finished) < len(choices):
                index = await updates.get()
                choice = choices[index]
                if choice.error:
                    yield f"data: {json.dumps({'error': {'message': choice.error, 'type': 'server_error'}})}\n\n"
                    return
                end = len(choice.text) if choice.finish_reason else max(len(choice.text) - held, choice.sent)
                if end > choice.sent:
                    yield self.chunk(ask, response_id, index, choice.text[choice.sent : end])
                    choice.sent = end
                if choice.finish_reason and index not in finished:
                    finished.add(index)
                    yield self.chunk(ask, response_id, index, None, choice.finish_reason)
            if ask.logprobs is not None or ask.echo:
                scores = await self.scores(ask, choices)
                for index, choice in enumerate(choices):
                    body = self.choice_body(ask, index, choice, scores[index])
                    yield self.chunk(ask, response_id, index, "", None, body.get("logprobs"))
            usage = {"id": response_id, "object": self.chunk_object(ask), "created": int(time.time()),
                     "model": self.model_id, "choices": [], "usage": self.usage(ask, choices)}  # fmt: skip
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        finally:
            for choice in choices:
                if not choice.finish_reason:
                    self.manager.cancel_request(choice.request_id)

    def chunk_object(self, ask: Ask) -> str:
        return "text_completion" if ask.route == "/v1/completions" else "chat.completion.chunk"

    def chunk(self, ask, response_id, index, text, finish_reason=None, logprobs=None) -> str:
        """One server-sent event for choice `index`: new text (a role delta for chat when `text` is a dict)."""
        if ask.route == "/v1/completions":
            choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        else:
            delta = text if isinstance(text, dict) else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        body = {"id": response_id, "object": self.chunk_object(ask), "created": int(time.time()),
                "model": self.model_id, "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    def usage(self, ask: Ask, choices: list[Choice]) -> dict:
        completion = sum(len(choice.tokens) for choice in choices)
        prompt = sum(len(ids) for ids in ask.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def choice_body(self, ask: Ask, index: int, choice: Choice, scores) -> dict:
        """A choice of the JSON response, with its log-probabilities when asked for."""
        if ask.route == "/v1/completions":
            prompt_text = self.tokenizer.decode(choice.prompt_ids, skip_special_tokens=True) if ask.echo else ""
            body = {"index": index, "text": prompt_text + choice.text, "finish_reason": choice.finish_reason,
                    "logprobs": None}  # fmt: skip
            if scores is not None:
                body["logprobs"] = completion_logprobs(self.tokenizer, scores)
            return body
        body = {"index": index, "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason, "logprobs": None}  # fmt: skip
        if scores is not None:
            body["logprobs"] = {"content": chat_logprobs(self.tokenizer, scores)}
        return body

    async def scores(self, ask: Ask, choices: list[Choice]) -> list:
        """Per choice: (ids, log-probs of each id, top alternatives) of the scored tokens (the completion's; the
        prompt's too with `echo`), from the model's logits; None where nothing is asked."""
        if ask.logprobs is None:
            return [None] * len(choices)
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self.scorer, self.score, ask, choice) for choice in choices]

    @torch.no_grad()
    def score(self, ask: Ask, choice: Choice):
        """Log-probabilities of a choice's tokens after its prompt (and of the prompt's tokens with `echo`; its
        first token has none): (ids, log-probs [N] (None for the first), top [N] lists of (id, log-prob))."""
        ids = choice.prompt_ids + choice.tokens
        if not ids:
            return [], [], []
        logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0].float()  # [T, V]
        log_probs = logits.log_softmax(-1)
        first = 0 if ask.echo else len(choice.prompt_ids)
        scored, chosen, top = ids[first:], [], []
        k = max(ask.logprobs, 1)
        alternatives = log_probs.topk(k, -1)
        for position in range(first, len(ids)):
            if position == 0:
                chosen.append(None), top.append(None)
                continue
            chosen.append(float(log_probs[position - 1, ids[position]]))
            values, indices = alternatives.values[position - 1], alternatives.indices[position - 1]
            top.append(list(zip(indices.tolist(), values.tolist()))[: ask.logprobs])
        return scored, chosen, top


def completion_logprobs(tokenizer, scores) -> dict:
    """OpenAI's completions `logprobs` object: tokens, their log-probs, top alternatives, text offsets."""
    ids, chosen, top = scores
    tokens = [tokenizer.decode([i]) for i in ids]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": chosen,
        "top_logprobs": [None if alts is None else {tokenizer.decode([i]): lp for i, lp in alts} for alts in top],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, scores) -> list[dict]:
    """OpenAI's chat `logprobs.content`: per token its text, log-prob, bytes and top alternatives."""
    ids, chosen, top = scores
    return [
        {"token": tokenizer.decode([i]), "logprob": lp, "bytes": list(tokenizer.decode([i]).encode()),
         "top_logprobs": [{"token": tokenizer.decode([a]), "logprob": alp, "bytes": list(tokenizer.decode([a]).encode())}
                          for a, alp in (alts or [])]}
        for i, lp, alts in zip(ids, chosen, top)
    ]  # fmt: skip


async def answer(routes: SLLMRoutes, route: str, body: dict, request):
    """The SLLM's answer to a request that passed `serve.request_problem`: its response, or the refusal."""
    from fastapi.responses import JSONResponse

    def refuse(status: int, message: str, kind: str, **headers) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    try:
        ask = read_ask(route, body, routes.model, routes.tokenizer)
        return await routes.respond(ask, request)
    except RequestRefused as error:
        return refuse(error.status, str(error), "invalid_request_error")
    except QueueFull as error:
        return refuse(503, str(error), "overloaded", **{"Retry-After": "1"})
    except ValueError as error:
        return refuse(400, str(error), "invalid_request_error")
    except ManagerStopped as error:  # the server is shutting down
        return refuse(503, str(error), "unavailable", **{"Retry-After": "1"})
