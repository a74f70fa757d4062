"""What benchmarks/serving.py sends, and the offline reference it measures beside the servers.

- `uniform`: every request greedy with --new-tokens forced (min_new_tokens in its generation_config): the same work
  for every server, so tok/s compare directly.
- `mixed`: each request its own settings, drawn from a seeded generator: temperature 0, 0.7 or 1.0, top_p 1 or 0.9,
  its own seed, a stop string for one in four ("\n" or "."), max_tokens from 16 to 128, nothing forced. tok/s =
  completion tokens / wall time; a request counts as an error if it fails, returns more tokens than it asked for,
  or none.
- offline: the same prompts through the model's own `generate` in this process, one at a time (batch 1), greedy
  with the new tokens forced: what a served request should be measured against.
"""

import dataclasses
import json
import random
import time

import torch

WORKLOADS = ("uniform", "mixed")
MIXED_STOPS = (["\n"], ["."])


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a cell: its prompt, the body sent, its token limit, whether that many tokens are forced."""

    prompt: str
    body: dict
    max_tokens: int
    forced: bool


def uniform(prompt: str, new_tokens: int) -> Request:
    """A greedy, forced-length, streamed /v1/completions request."""
    config = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "generation_config": json.dumps(config)}  # fmt: skip
    return Request(prompt, body, new_tokens, forced=True)


def mixed(prompt: str, rng: random.Random) -> Request:
    """A streamed request with settings of its own (see the module docstring)."""
    max_tokens = rng.randint(16, 128)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": rng.choice([0, 0.7, 1.0]),
            "top_p": rng.choice([1.0, 0.9]), "seed": rng.randrange(2**31)}  # fmt: skip
    if rng.random() < 0.25:
        body["stop"] = rng.choice(MIXED_STOPS)
    return Request(prompt, body, max_tokens, forced=False)


def request_problem(request: Request, completion_tokens: int | None, finish_reason: str | None) -> str | None:
    """Why a finished request's token count is wrong for its workload, or None (an empty text is right where a
    stop string came first: OpenAI's text ends before it)."""
    if completion_tokens is None:
        return "no usage in the stream"
    if request.forced and completion_tokens != request.max_tokens:
        return f"short: {completion_tokens} of {request.max_tokens} tokens"
    empty = completion_tokens == 0 and finish_reason != "stop"
    if not request.forced and (completion_tokens > request.max_tokens or empty):
        return f"{completion_tokens} tokens for max_tokens {request.max_tokens} ({finish_reason})"
    return None


@torch.no_grad()
def offline_run(model, tokenizer, requests: list[Request]) -> dict:
    """The requests' prompts through `model.generate` one at a time, greedy, each request's token count forced:
    tokens/s and the same summary fields a served run has (no TTFT: nothing is streamed)."""
    tokens, started = 0, time.perf_counter()
    for request in requests:
        ids = tokenizer(request.prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=request.max_tokens, min_new_tokens=request.max_tokens, do_sample=False)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - started
    return {"status": "ok", "requests": len(requests), "good": len(requests), "errors": 0, "error_kinds": [],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "requests_per_s": len(requests) / wall, "ttft_p50_s": None, "ttft_p95_s": None,
            "latency_p50_s": wall / len(requests), "latency_p95_s": None, "prompt_tokens_seen": [],
            "rss_before_bytes": None, "rss_peak_bytes": None, "cores_busy": None, "client_cores": None,
            "other_cores": None}  # fmt: skip
