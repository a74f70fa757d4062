"""`sllm-serve`: Transformers' OpenAI-compatible server (`transformers serve`) for SLLM checkpoints and plain causal LMs.

It takes the options of `transformers serve` (and `--max-rows`, `--max-queued-requests`, `--grace-period`) and runs
that server, with these additions:
- its loader finds `SLLMForCausalLM` (the stock loader looks `config.architectures[0]` up on the `transformers`
  module, where a plugin's class is not);
- an SLLM's `/v1/completions` and `/v1/chat/completions` run on its own sentence-batching manager
  (`sllm_routes.py`): each request with its own sampling settings, `n`, stop strings, `echo` and `logprobs`; one
  row at a time without `--continuous-batching`, up to `--max-rows` with it; a full queue answers 503;
- requests are checked before they reach a model: a token limit that is not a positive integer, an ill-typed or
  out-of-range sampling field, a `generation_config` Transformers refuses, malformed JSON, a prompt longer than the
  model holds get a 400 naming the problem (the stock server answers several of them with a bare 500), and any
  other failure inside a request a JSON body with its reason. A plain causal LM runs on Transformers' handlers:
  the fields they would drop are refused by name, `temperature` above 0 samples; with `--continuous-batching`,
  where Transformers runs every request with the first accepted request's sampling and stopping settings, a
  request asking for others is refused by name;
- SIGTERM: no new requests (503), those in flight get `--grace-period` seconds, then fail with an error.

    sllm-serve checkpoints/scratch-sllm-192x5-decoder-1-layer --host 127.0.0.1 --port 8000 --continuous-batching
"""

import argparse
import dataclasses
import functools
import json
import math
import sys

import torch
from transformers import GenerationConfig

from .continuous_batching import DEFAULT_MAX_QUEUED, DEFAULT_MAX_ROWS
from .modeling_sllm import SLLMForCausalLM
from .transformers_compat import (
    run_model_threads_with,
    serve_command,
    serve_with_grace,
    served_model,
    set_request_body,
    wrap_server_factory,
)

# The fields whose value is a count of new tokens, per route.
TOKEN_LIMITS = {
    "/v1/completions": ("max_tokens",),
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/responses": ("max_output_tokens",),
}


def number_problem(name: str, value, low: float, high: float, low_open: bool = False) -> str | None:
    """Why `value` is not a number in [low, high] ((low, high] with `low_open`), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"`{name}` must be a number, got {value!r}"
    if value < low or value > high or (low_open and value == low):
        return f"`{name}` must be in {'(' if low_open else '['}{low}, {high}], got {value!r}"
    return None


def request_problem(route: str, body) -> str | None:
    """What makes a request body to `route` invalid before any model sees it, or None. Unknown fields are left to
    Transformers' handlers, which answer them with a 422 naming them."""
    if not isinstance(body, dict):
        return f"the request body must be a JSON object, got {type(body).__name__}"
    for name in TOKEN_LIMITS.get(route, ()):
        value = body.get(name)
        least = 0 if body.get("echo") is True else 1  # OpenAI's echo with no new tokens: the prompt scored
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            return f"`{name}` must be a positive integer, got {value!r}"
    checks = {
        "temperature": lambda value: number_problem("temperature", value, 0, 100),
        "top_p": lambda value: number_problem("top_p", value, 0, 1, low_open=True),
        "frequency_penalty": lambda value: number_problem("frequency_penalty", value, -2, 2),
        "presence_penalty": lambda value: number_problem("presence_penalty", value, -2, 2),
        "seed": lambda value: None if isinstance(value, int) and not isinstance(value, bool) else
        f"`seed` must be an integer, got {value!r}",
        "stream": lambda value: None if isinstance(value, bool) else f"`stream` must be true or false, got {value!r}",
        "stop": lambda value: None if isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(item, str) for item in value)) else f"`stop` must be a string or a list of strings, got {value!r}",
        "prompt": prompt_problem,
        "echo": lambda value: None if isinstance(value, bool) else f"`echo` must be true or false, got {value!r}",
        "model": lambda value: None if isinstance(value, str) else f"`model` must be a string, got {value!r}",
        "generation_config": generation_config_problem,
    }  # fmt: skip
    for name, check in checks.items():
        if body.get(name) is not None and (problem := check(body[name])) is not None:
            return problem
    return None


def prompt_problem(value) -> str | None:
    """Why a completions `prompt` is not one OpenAI's API takes (a string, token ids, a non-empty list of either)."""
    def token_ids(item) -> bool:
        return isinstance(item, list) and bool(item) and all(isinstance(i, int) and not isinstance(i, bool) for i in item)

    if isinstance(value, str) or token_ids(value):
        return None
    if isinstance(value, list) and value and all(isinstance(item, str) or token_ids(item) for item in value):
        return None
    return f"`prompt` must be a string, a list of token ids, or a non-empty list of either, got {value!r}"[:300]


def generation_config_problem(value) -> str | None:
    """Why a request's `generation_config` (a JSON object in a string) is not one Transformers accepts, or None."""
    if not isinstance(value, str):
        return f"`generation_config` must be a string holding a JSON object, got {type(value).__name__}"
    try:
        fields = json.loads(value)
    except json.JSONDecodeError as error:
        return f"`generation_config` is not valid JSON: {error}"
    if not isinstance(fields, dict):
        return "`generation_config` must hold a JSON object"
    try:
        GenerationConfig(**fields).validate(strict=True)
    except (TypeError, ValueError) as error:
        return f"`generation_config` is refused by Transformers: {error}"
    for name in ("max_new_tokens", "min_new_tokens"):
        count = fields.get(name)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            return f"`generation_config.{name}` must be a non-negative integer, got {count!r}"
    return None


def shared_settings(body: dict) -> dict:
    """What a request asks of sampling and stopping, which Transformers' continuous batching takes from the first
    request for all (per request it passes only the token limit and the eos ids): a plain causal LM's rule."""
    settings = {name: body.get(name) for name in ("temperature", "top_p", "frequency_penalty", "stop")}
    if body.get("generation_config") is not None:
        fields = json.loads(body["generation_config"])
        fields.pop("max_new_tokens", None)  # per request
        settings["generation_config"] = fields
    return settings


def plain_lm_problem(body: dict) -> str | None:
    """What Transformers' handlers would drop without a word from a plain causal LM's request, or None."""
    dropped = {"n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1), "echo": bool,
               "logprobs": lambda v: v not in (None, False), "top_logprobs": lambda v: v is not None,
               "presence_penalty": bool, "suffix": lambda v: v is not None, "logit_bias": bool}  # fmt: skip
    for name, in_use in dropped.items():
        if name in body and in_use(body[name]):
            return f"`{name}` is not supported for this model by sllm-serve (Transformers' handler would ignore it)"
    return None


def sampled_body(body: dict, generation_config) -> dict:
    """A plain causal LM's request with OpenAI's temperature semantics made explicit for Transformers' handler:
    above 0 samples even where the checkpoint's generation config does not (Transformers' handler sets only the
    temperature); absent means OpenAI's 1.0 unless a generation config chooses."""
    fields = json.loads(body["generation_config"]) if body.get("generation_config") else {}
    chooses = fields.get("do_sample") if fields else generation_config.do_sample
    temperature = body.get("temperature")
    if temperature is None and chooses is None:
        temperature = 1.0
    if temperature is not None and temperature > 0 and not chooses:
        fields = (fields or generation_config.to_diff_dict()) | {"do_sample": True}
        fields.pop("transformers_version", None), fields.pop("_from_model_config", None)
        body = body | {"generation_config": json.dumps(fields), "temperature": temperature}
    return body


@dataclasses.dataclass
class ServeOptions:
    """sllm-serve's own options (the rest are `transformers serve`'s)."""

    continuous_batching: bool
    max_rows: int
    max_queued: int
    grace: float
    threads: int
    compile: bool  # transformers serve's --compile: an SLLM's decoder steps on the static cache, compiled
    served: dict = dataclasses.field(default_factory=dict)  # model id -> its SLLMRoutes

    def begin_shutdown(self) -> None:
        """SIGTERM: the SLLMs' managers take no new requests; those held fail after the grace period."""
        for routes in self.served.values():
            routes.shutdown(block=False)


def add_request_checks(app, arguments: dict, options: ServeOptions) -> None:
    """Check every generation request before its handler runs, and answer a handler's failure with its reason: a
    ValueError (what the models raise for inputs they refuse) as a 400, anything else as a 500 with a JSON body.
    An SLLM's completions and chat requests go to its own routes (`sllm_routes`: per-request settings); a plain
    causal LM's to Transformers' handlers, with what they would drop refused and, with continuous batching, a
    request whose sampling or stopping settings differ from the first accepted request's refused by name."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse

    from .sllm_routes import SLLMRoutes, answer

    first: dict = {}
    served: dict[str, SLLMRoutes] = options.served
    handler = arguments["completion_handler"]

    def refuse(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    @app.middleware("http")
    async def check_request(request: Request, call_next):
        if request.method == "POST" and request.url.path in TOKEN_LIMITS:
            try:
                body = json.loads(await request.body() or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                return refuse(400, f"malformed JSON body: {error}", "invalid_request_error")
            if (problem := request_problem(request.url.path, body)) is not None:
                return refuse(400, problem, "invalid_request_error")
            try:
                model_id, model, tokenizer = served_model(handler, dict(body))
            except HTTPException as error:  # Transformers' own refusal (a model the server is not pinned to)
                return refuse(error.status_code, str(error.detail), "invalid_request_error")
            if isinstance(model, SLLMForCausalLM) and request.url.path != "/v1/responses":
                if model_id not in served:
                    rows = options.max_rows if options.continuous_batching else 1
                    served[model_id] = SLLMRoutes(model, getattr(tokenizer, "tokenizer", tokenizer), model_id, rows,
                                                  options.max_queued, options.threads, options.grace,
                                                  options.compile)  # fmt: skip
                return await answer(served[model_id], request.url.path, body, request)
            if (problem := plain_lm_problem(body)) is not None:
                return refuse(400, problem, "invalid_request_error")
            if options.continuous_batching and body.get("seed") is not None:  # Transformers seeds torch globally
                return refuse(400, "`seed` is not supported for this model with --continuous-batching: Transformers "
                              "would reseed torch's global generator for every request in the batch", "invalid_request_error")
            body = sampled_body(body, model.generation_config)
            set_request_body(request, json.dumps(body).encode())
            if options.continuous_batching:
                settings = shared_settings(body)
                if first and settings != first["settings"]:
                    return refuse(
                        400,
                        f"with --continuous-batching every request runs with the first request's sampling and "
                        f"stopping settings {first['settings']}; this one asks for {settings}",
                        "invalid_request_error",
                    )
                response = await call_next(request)
                if response.status_code == 200:
                    first.setdefault("settings", settings)  # only an accepted request sets the rule
                return response
        return await call_next(request)

    @app.get("/sllm/stats")
    def stats():
        """What each served SLLM's manager holds: requests queued or running, of them queued, result handlers."""
        return JSONResponse({"models": {model_id: routes.manager.held() for model_id, routes in served.items()}})

    shutdown_models = arguments["model_manager"].shutdown

    def shutdown() -> None:  # the server's lifespan ends: requests held get the grace period, then an error
        for routes in served.values():
            routes.shutdown(block=True)
        shutdown_models()

    arguments["model_manager"].shutdown = shutdown

    @app.exception_handler(ValueError)
    async def invalid_input(_request: Request, error: ValueError):
        return refuse(400, str(error), "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception):
        return refuse(500, f"{type(error).__name__}: {error}", "server_error")


def parse_options(argv: list[str]) -> tuple[ServeOptions, list[str]]:
    """sllm-serve's own options, and the arguments left for `transformers serve`."""
    parser = argparse.ArgumentParser(prog="sllm-serve", add_help=False)
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                        help="an SLLM's rows in the running sentence loop (with --continuous-batching)")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED,
                        help="requests that may wait for a row; past it a request is answered 503 with Retry-After")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds that requests in flight get to finish after SIGTERM; then they fail")  # fmt: skip
    known, rest = parser.parse_known_args(argv)
    if "--help" in rest or "-h" in rest:
        parser.print_help()
    if known.max_rows < 1 or known.max_queued_requests < 1 or known.grace_period < 0:
        parser.error("--max-rows and --max-queued-requests must be positive, --grace-period non-negative")
    options = ServeOptions("--continuous-batching" in rest, known.max_rows, known.max_queued_requests,
                           known.grace_period, torch.get_num_threads(), "--compile" in rest)  # fmt: skip
    return options, rest


def main(argv: list[str] | None = None) -> None:
    """The `sllm-serve` console script: `transformers serve` with SLLM checkpoints loadable, an SLLM's requests on
    its own routes, and every request checked.

    The server's threads: its main thread (HTTP, tokenizing) keeps one intra-op thread, and only the threads that
    run a model use torch's count. With OpenMP, a thread that runs parallel work after another thread did finds
    more pool threads than cores and stops spinning between regions: a model ran 20-30% slower there."""
    options, argv = parse_options(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)  # before anything runs: the model threads set their own count
    run_model_threads_with(options.threads)
    checks = functools.partial(add_request_checks, options=options)
    wrap_server_factory(checks, {SLLMForCausalLM.__name__: SLLMForCausalLM})
    serve_with_grace(options.grace, options.begin_shutdown)
    serve_command()(argv)


if __name__ == "__main__":
    main()
