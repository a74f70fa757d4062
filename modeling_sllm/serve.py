"""`sllm-serve`: Transformers' OpenAI-compatible server (`transformers serve`) for SLLM checkpoints and plain causal LMs.

It takes exactly the options of `transformers serve` and runs that server, with two additions:
- its loader finds `SLLMForCausalLM` (the stock loader looks `config.architectures[0]` up on the `transformers`
  module, where a plugin's class is not), so `--continuous-batching` reaches the SLLM's sentence-loop manager;
- requests are checked before they reach a model: a token limit that is not a positive integer, an ill-typed or
  out-of-range sampling field, a `generation_config` Transformers refuses, malformed JSON, a prompt longer than the
  model holds get a 400 naming the problem (the stock server answers several of them with a bare 500), and any
  other failure inside a request a JSON body with its reason. With `--continuous-batching`, Transformers' server
  runs every request with the first request's sampling and stopping settings; a request asking for others is
  refused by name instead of being run with settings it did not ask for.

    sllm-serve checkpoints/scratch-sllm-192x5-decoder-1-layer --host 127.0.0.1 --port 8000 --continuous-batching
"""

import functools
import json
import math
import sys

from transformers import GenerationConfig

from .modeling_sllm import SLLMForCausalLM
from .transformers_compat import serve_command, wrap_server_factory

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
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
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
        "prompt": lambda value: None if isinstance(value, str) else f"`prompt` must be a string, got {value!r}",
        "generation_config": generation_config_problem,
    }  # fmt: skip
    for name, check in checks.items():
        if body.get(name) is not None and (problem := check(body[name])) is not None:
            return problem
    return None


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
    request for all (per request it passes only the token limit and the eos ids)."""
    settings = {name: body.get(name) for name in ("temperature", "top_p", "frequency_penalty", "stop")}
    if body.get("generation_config") is not None:
        fields = json.loads(body["generation_config"])
        fields.pop("max_new_tokens", None)  # per request
        settings["generation_config"] = fields
    return settings


def add_request_checks(app, continuous_batching: bool = False) -> None:
    """Check every generation request before its handler runs, and answer a handler's failure with its reason: a
    ValueError (what the models raise for inputs they refuse) as a 400, anything else as a 500 with a JSON body.
    With continuous batching, a request whose sampling or stopping settings differ from the first request's is
    refused by name: Transformers' server would run it with the first request's settings."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    first: dict = {}

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
            if continuous_batching:
                settings = shared_settings(body)
                first.setdefault("settings", settings)
                if settings != first["settings"]:
                    return refuse(
                        400,
                        f"with --continuous-batching every request runs with the first request's sampling and "
                        f"stopping settings {first['settings']}; this one asks for {settings}",
                        "invalid_request_error",
                    )
        return await call_next(request)

    @app.exception_handler(ValueError)
    async def invalid_input(_request: Request, error: ValueError):
        return refuse(400, str(error), "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception):
        return refuse(500, f"{type(error).__name__}: {error}", "server_error")


def main(argv: list[str] | None = None) -> None:
    """The `sllm-serve` console script: `transformers serve` with SLLM checkpoints loadable and requests checked."""
    argv = sys.argv[1:] if argv is None else argv
    checks = functools.partial(add_request_checks, continuous_batching="--continuous-batching" in argv)
    wrap_server_factory(checks, {SLLMForCausalLM.__name__: SLLMForCausalLM})
    serve_command()(argv)


if __name__ == "__main__":
    main()
