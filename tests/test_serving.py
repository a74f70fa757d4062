"""`sllm-serve` as a client meets it: the console script started in a subprocess on 127.0.0.1 with the shipped SLLM
and continuous batching, driven over HTTP. Concurrent greedy completions equal offline `generate` token for token,
streaming gives the same text, bad requests get a 400 naming the problem and the server goes on, a client that
goes away mid-stream frees its row, a bounded soak leaves the server's memory flat, and a plain causal LM serves."""

import asyncio
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import shipped_pair
from serving_servers import wait_for_health  # benchmarks/ is on pytest's pythonpath
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SLLM, PEER = shipped_pair()
EXCERPT = ROOT / "examples" / "data" / "python-docs-excerpt.txt"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`sllm-serve FOLDER` in a subprocess on 127.0.0.1: its URL, PID and log; stopped by PID."""

    def __init__(self, folder: Path, tmp: Path, *options: str):
        self.port, self.log_path = free_port(), tmp / f"server-{folder.name}.log"
        env = os.environ | {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [shutil.which("sllm-serve"), str(folder), "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "float32", "--log-level", "info", *options]  # fmt: skip
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        if (why := wait_for_health(self.url, self.process)) is not None:
            self.stop()
            raise AssertionError(f"sllm-serve {why}: {self.log_path.read_text()[-3000:]}")

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("sllm-serve") is None:
        pytest.fail("the sllm-serve console script is not installed: pip install -e '.[serve]'")
    started = Server(SLLM, tmp_path_factory.mktemp("serve"), "--continuous-batching", "--trust-remote-code")
    yield started
    started.stop()


def prompts(count: int, words: int) -> list[str]:
    """`count` prompts of about `words` words from the held-out excerpt, different text each."""
    text = EXCERPT.read_text().split()
    return [" ".join(text[i * words : (i + 1) * words]) for i in range(count)]


@functools.cache
def loaded(folder: Path):
    """(tokenizer, model) of a checkpoint folder, loaded once for the module's offline references."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()


def offline(folder: Path, texts: list[str], max_new_tokens: int) -> list[str]:
    """Each prompt alone through greedy offline `generate`, decoded as the server decodes."""
    tokenizer, model = loaded(folder)
    completions = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :]
        completions.append(tokenizer.decode(new, skip_special_tokens=True))
    return completions


async def complete_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    """POST every body to /v1/completions, `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(body: dict) -> httpx.Response:
            async with limit:
                return await client.post("/v1/completions", json=body)

        return await asyncio.gather(*(one(body) for body in bodies))


def greedy(prompt: str, max_tokens: int, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_concurrent_completions_equal_offline_generate(server):
    texts = prompts(8, 6) + prompts(8, 40)[4:]  # short and long prompts, served together
    responses = asyncio.run(complete_all(server.url, [greedy(text, 24) for text in texts], concurrency=12))
    assert [response.status_code for response in responses] == [200] * len(texts), responses[0].text
    served = [response.json()["choices"][0]["text"] for response in responses]
    assert served == offline(SLLM, texts, 24)
    assert all(response.json()["usage"]["completion_tokens"] <= 24 for response in responses)


def test_streaming_gives_the_same_text(server):
    text = prompts(1, 30)[0]
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=greedy(text, 40, stream=True), timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    pieces = [chunk["choices"][0]["text"] for chunk in chunks if chunk.get("choices")]
    assert "".join(pieces) == offline(SLLM, [text], 40)[0]
    assert len([piece for piece in pieces if piece]) > 1  # the first token at once, then a sentence at a time
    assert chunks[-1]["usage"]["completion_tokens"] <= 40


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"prompt": "x", "max_tokens": 0}, 400, "`max_tokens` must be a positive integer, got 0"),
        ({"prompt": "x", "max_tokens": -3}, 400, "`max_tokens` must be a positive integer, got -3"),
        ({"prompt": "x", "max_tokens": "x"}, 400, "`max_tokens` must be a positive integer, got 'x'"),
        ({"prompt": "x", "max_tokens": 2.5}, 400, "`max_tokens` must be a positive integer"),
        ({"prompt": "x", "max_tokens": 4, "temperature": "hot"}, 400, "`temperature` must be a number"),
        ({"prompt": "x", "max_tokens": 4, "top_p": 0}, 400, "`top_p` must be in (0, 1]"),
        ({"prompt": "x", "max_tokens": 4, "stream": "yes"}, 400, "`stream` must be true or false"),
        ({"prompt": "x", "max_tokens": 4, "generation_config": "{"}, 400, "`generation_config` is not valid JSON"),
        ({"prompt": "x", "generation_config": '{"max_new_tokens": -1}'}, 400, "generation_config"),
        ({"prompt": [], "max_tokens": 4}, 400, "`prompt` must be a string, a list of token ids, or a non-empty"),
        ({"prompt": [1.5], "max_tokens": 4}, 400, "`prompt` must be a string, a list of token ids, or a non-empty"),
        ({"prompt": "x", "max_tokens": 4, "temperature": 0, "bogus": 1}, 422, "Unexpected fields in the request"),
        ({"prompt": "A sentence. " * 2100, "max_tokens": 4, "temperature": 0}, 400, "at most 2047 sentences"),
        ({"prompt": "x", "max_tokens": 4, "suffix": "y"}, 400, "`suffix` (fill-in-the-middle) is not supported"),
        ({"prompt": "x", "max_tokens": 4, "suffix": 3}, 400, "`suffix` (fill-in-the-middle) is not supported"),
        ({"prompt": "x", "max_tokens": 4, "n": 40}, 400, "`n` must be an integer in [1, 16]"),
        ({"prompt": "x", "max_tokens": 4, "best_of": 3}, 400, "`best_of` above `n` is not supported"),
        ({"prompt": "x", "max_tokens": 4, "logprobs": 9}, 400, "`logprobs` must be an integer in [0, 5]"),
        ({"prompt": "x", "max_tokens": 4, "logit_bias": {"5": 1}}, 400, "`logit_bias` is not supported"),
        ({"prompt": "x", "max_tokens": 4, "echo": "yes"}, 400, "`echo` must be true or false"),
        ({"prompt": "x", "max_tokens": 0, "echo": False}, 400, "`max_tokens` must be a positive integer, got 0"),
        ({"prompt": "x", "max_tokens": 10**9}, 400, "max_new_tokens must be at most"),
        ({"prompt": "x", "generation_config": '{"no_repeat_ngram_size": 2}'}, 400, "`no_repeat_ngram_size`"),
        ({"prompt": "x", "max_tokens": 4, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 non-empty strings"),
        ("{not json", 400, "malformed JSON body"),
    ],
)
def test_a_bad_request_gets_a_4xx_with_its_reason_and_the_server_goes_on(server, body, status, reason):
    """Every field the SLLM's routes cannot honour is named; mixed settings are not refused (see below)."""
    assert httpx.post(f"{server.url}/v1/completions", json=greedy("Hello.", 4), timeout=60).status_code == 200
    content = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(f"{server.url}/v1/completions", content=content, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
    assert reply.status_code == status, reply.text
    assert reason in reply.text
    assert httpx.post(f"{server.url}/v1/completions", json=greedy("Hello.", 4), timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}


def test_an_empty_prompt_is_an_unconditional_request(server):
    reply = httpx.post(f"{server.url}/v1/completions", json=greedy("", 12), timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 0
    assert reply.json()["choices"][0]["text"] == offline(SLLM, [""], 12)[0]


def held(server) -> dict:
    """What the server's SLLM manager holds (`/sllm/stats`): requests, queued, handlers."""
    models = httpx.get(f"{server.url}/sllm/stats", timeout=10).json()["models"]
    return next(iter(models.values()))


def wait_until_free(server, limit: float = 30) -> dict:
    deadline = time.monotonic() + limit
    while (now := held(server)) != {"requests": 0, "queued": 0, "handlers": 0} and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def test_a_disconnect_storm_frees_every_row_and_handler(server):
    """A third of 24 clients hang up mid-stream while the others run: those finish equal to offline generate, and
    afterwards the manager holds no request and no handler (counted, not guessed from memory)."""
    texts = prompts(16, 7)
    others = asyncio.run(_hang_ups_beside_others(server.url, prompts(8, 20), texts))
    assert [response.status_code for response in others] == [200] * len(texts)
    assert [response.json()["choices"][0]["text"] for response in others] == offline(SLLM, texts, 24)
    assert wait_until_free(server, limit=5) == {"requests": 0, "queued": 0, "handlers": 0}  # 3,000 tokens would take longer


async def _hang_ups_beside_others(url: str, long_texts: list[str], texts: list[str]) -> list[httpx.Response]:
    """Open long streams, read each one's first chunk and hang up, while the other requests run."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def hang_up(text: str) -> None:
            body = greedy(text, 3000, stream=True, generation_config='{"min_new_tokens": 3000}')
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        return  # leaving the block closes the connection

        others = [client.post("/v1/completions", json=greedy(text, 24)) for text in texts]
        results = await asyncio.gather(*(hang_up(text) for text in long_texts), *others)
    return list(results[len(long_texts) :])


def test_random_request_bodies_get_no_5xx(server):
    """300 seeded random bodies of valid and invalid fields, 8 at a time, bounded in time: no 5xx, the server
    healthy and holding nothing after."""
    rng = random.Random(39)
    values = [None, 0, 1, 2, -1, 2.5, 1e9, 10**30, -(10**30), "x", "", [], ["a"], ["a", 3], [1, 2], {}, {"a": 1},
              True, False, {"include_usage": True}, '{"max_new_tokens": 3}', '{"do_sample": true, "top_k": 3}',
              '{"num_beams": 2}', '{"temperature": 0.5}', "{", '{"no_repeat_ngram_size": 2}']  # fmt: skip
    fields = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "echo", "logprobs", "best_of",
              "suffix", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "user", "generation_config",
              "stream_options", "model", "bogus"]  # fmt: skip
    bodies = []
    for _ in range(300):
        body = {"prompt": rng.choice(prompts(20, 4)), "max_tokens": rng.randint(1, 8)}
        body |= {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(0, 4))}
        bodies.append(body)
    started = time.monotonic()
    replies = asyncio.run(complete_all(server.url, bodies, concurrency=8))
    codes = [reply.status_code for reply in replies]
    assert all(code < 500 for code in codes), [(b, r.text) for b, r in zip(bodies, replies) if r.status_code >= 500][:3]
    assert codes.count(200) > 20 and time.monotonic() - started < 300
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    assert wait_until_free(server) == {"requests": 0, "queued": 0, "handlers": 0}


def test_sigterm_under_load_answers_every_client_within_the_grace_period(tmp_path):
    """SIGTERM while 8 long streams and 4 short requests run: short ones finish, long ones end with an error
    saying the server stopped, all within the grace period and a little; the process exits."""
    grace = 3.0
    stopping = Server(SLLM, tmp_path, "--continuous-batching", "--trust-remote-code", "--grace-period", str(grace))
    try:
        outcomes, signalled = asyncio.run(_load_then_sigterm(stopping, grace))
        stopping.process.wait(timeout=grace + 20)
    finally:
        if stopping.process.poll() is None:
            stopping.stop()
    long_ones, short_ones = outcomes[:8], outcomes[8:]
    assert all(kind == "done" for kind, _, _ in short_ones), short_ones
    assert all(kind == "error" and "stopped" in detail for kind, detail, _ in long_ones), long_ones
    assert all(at - signalled < grace + 8 for _, _, at in outcomes)
    assert stopping.process.returncode is not None


async def _load_then_sigterm(server: Server, grace: float) -> tuple[list, float]:
    """(outcome, detail, time) per client: 8 long streams, then 4 short requests; SIGTERM once all have started."""
    started, signalled = asyncio.Event(), {}
    async with httpx.AsyncClient(base_url=server.url, timeout=grace + 30) as client:

        async def stream(body: dict) -> tuple:
            try:
                async with client.stream("POST", "/v1/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data: {\"error\""):
                            return "error", line, time.monotonic()
                        if line == "data: [DONE]":
                            return "done", "", time.monotonic()
                        started.set()
            except httpx.HTTPError as error:
                return "error", repr(error), time.monotonic()
            return "cut", "", time.monotonic()

        async def short(text: str) -> tuple:
            await started.wait()
            reply = await client.post("/v1/completions", json=greedy(text, 6))
            return ("done" if reply.status_code == 200 else "error"), reply.text, time.monotonic()

        async def sigterm() -> None:
            await started.wait()
            await asyncio.sleep(0.5)
            signalled["at"] = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

        long_body = lambda text: greedy(text, 4000, stream=True, generation_config='{"min_new_tokens": 4000}')  # noqa: E731
        tasks = [stream(long_body(text)) for text in prompts(8, 10)] + [short(text) for text in prompts(4, 6)]
        outcomes = await asyncio.gather(*tasks, sigterm())
    return list(outcomes[:-1]), signalled["at"]


def test_a_plain_causal_lm_serves_too(tmp_path):
    peer = Server(PEER, tmp_path)
    try:
        texts = prompts(2, 10)
        replies = [httpx.post(f"{peer.url}/v1/completions", json=greedy(text, 12), timeout=60) for text in texts]
        bad = httpx.post(f"{peer.url}/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=60)
    finally:
        peer.stop()
    assert [reply.status_code for reply in replies] == [200, 200]
    assert [reply.json()["choices"][0]["text"] for reply in replies] == offline(PEER, texts, 12)
    assert bad.status_code == 400 and "`max_tokens` must be a positive integer" in bad.text


def completion(server, **body) -> dict:
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_each_request_runs_with_its_own_settings(server):
    """Greedy and sampled requests in one batch: temperature 0 equals offline greedy generate, a seeded sampled
    request gives the same text alone and among others (its own random stream), above 0 samples (the shipped
    config has no do_sample), `n` choices differ, and an absent temperature samples (OpenAI's default 1.0)."""
    text = prompts(1, 12)[0]
    sampled = {"prompt": text, "max_tokens": 24, "temperature": 0.9, "seed": 7}
    alone = completion(server, **sampled)["choices"][0]["text"]
    bodies = [greedy(prompt, 24) for prompt in prompts(6, 9)] + [sampled] + [
        {"prompt": prompt, "max_tokens": 16 + 8 * i, "temperature": 1.0, "top_p": 0.9, "seed": i}
        for i, prompt in enumerate(prompts(5, 5))
    ]  # fmt: skip
    replies = asyncio.run(complete_all(server.url, bodies, concurrency=len(bodies)))
    assert [reply.status_code for reply in replies] == [200] * len(bodies)
    texts = [reply.json()["choices"][0]["text"] for reply in replies]
    assert texts[:6] == offline(SLLM, prompts(6, 9), 24)
    assert texts[6] == alone
    assert texts[6] != offline(SLLM, [text], 24)[0]
    assert all(reply.json()["usage"]["completion_tokens"] <= 16 + 8 * i for i, reply in enumerate(replies[7:]))
    two = completion(server, prompt=text, max_tokens=24, temperature=1.0, n=2, seed=11)["choices"]
    assert [choice["index"] for choice in two] == [0, 1] and two[0]["text"] != two[1]["text"]
    assert two[0]["text"] == completion(server, prompt=text, max_tokens=24, temperature=1.0, seed=11)["choices"][0]["text"]
    defaults = {completion(server, prompt=text, max_tokens=24)["choices"][0]["text"] for _ in range(3)}
    assert len(defaults) > 1


def test_a_stop_string_ends_the_text_before_it(server):
    text = prompts(1, 12)[0]
    full = offline(SLLM, [text], 40)[0]
    stop = full.split()[3]  # a word that occurs in the greedy text
    choice = completion(server, **greedy(text, 40, stop=[stop]))["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    streamed, finish = streamed_text(server, greedy(text, 40, stop=stop, stream=True))
    assert streamed == choice["text"] and finish == "stop"


def streamed_text(server, body: dict) -> tuple[str, str | None]:
    """The text of a streamed completion and its finish reason; asserts it came in more than one chunk."""
    pieces, finish = [], None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    pieces.append(choice["text"])
                    finish = choice["finish_reason"] or finish
    assert len([piece for piece in pieces if piece]) > 1, pieces
    return "".join(pieces), finish


def test_echo_and_logprobs_are_the_models_own(server):
    """`logprobs` are log-softmax of the model's forward `logits` (what lm-eval's hf model reads); `echo` with
    `max_tokens` 0 scores the prompt (lm-eval's local-completions loglikelihood request)."""
    tokenizer, model = loaded(SLLM)
    text = prompts(1, 10)[0]
    ids = tokenizer(text).input_ids
    scored = completion(server, prompt=text, max_tokens=0, echo=True, logprobs=2)["choices"][0]
    assert scored["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    lps = scored["logprobs"]
    assert lps["token_logprobs"][0] is None and len(lps["tokens"]) == len(ids)
    assert lps["token_logprobs"][1:] == pytest.approx([float(expected[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)
    assert all(len(top) == 2 for top in lps["top_logprobs"][1:])
    generated = completion(server, **greedy(text, 12, logprobs=0))["choices"][0]
    assert len(generated["logprobs"]["token_logprobs"]) > 0
    assert all(lp <= 0 for lp in generated["logprobs"]["token_logprobs"])


def test_past_the_queue_bound_a_request_gets_503_at_once(tmp_path):
    """One row, one waiting request: the third concurrent request is answered 503 with Retry-After at once; every
    accepted request completes."""
    small = Server(SLLM, tmp_path, "--trust-remote-code", "--max-queued-requests", "1")
    try:
        bodies = [greedy(text, 60, generation_config='{"min_new_tokens": 60}') for text in prompts(6, 6)]
        replies = asyncio.run(complete_all(small.url, bodies, concurrency=6))
    finally:
        small.stop()
    codes = [reply.status_code for reply in replies]
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    refused = next(reply for reply in replies if reply.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "waiting for a row" in refused.text


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


def test_chat_completions_with_a_chat_template(tmp_path):
    """/v1/chat/completions on an SLLM whose tokenizer has a chat template: greedy content equals offline generate
    on the templated prompt, streamed deltas give the same text, logprobs come per token, unknown tools refused."""
    folder = tmp_path / "sllm-chat"
    shutil.copytree(SLLM, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}))
    messages = [{"role": "user", "content": prompts(1, 12)[0]}]
    chat = Server(folder, tmp_path, "--continuous-batching", "--trust-remote-code")
    try:
        body = {"messages": messages, "max_tokens": 20, "temperature": 0}
        reply = httpx.post(f"{chat.url}/v1/chat/completions", json=body | {"logprobs": True, "top_logprobs": 2}, timeout=60)
        pieces = []
        with httpx.stream("POST", f"{chat.url}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces += [c["delta"].get("content", "") for c in json.loads(line[6:])["choices"]]
        tools = httpx.post(f"{chat.url}/v1/chat/completions", json=body | {"tools": [{"type": "function"}]}, timeout=60)
    finally:
        chat.stop()
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    tokenizer, model = loaded(SLLM)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    new = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :]
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}
    assert len(choice["logprobs"]["content"]) == reply.json()["usage"]["completion_tokens"]
    assert all(len(token["top_logprobs"]) == 2 for token in choice["logprobs"]["content"])
    assert "".join(pieces) == choice["message"]["content"] and len([p for p in pieces if p]) > 1
    assert tools.status_code == 400 and "`tools` are not supported" in tools.text


def test_a_plain_lm_with_continuous_batching_keeps_the_first_accepted_requests_settings(tmp_path):
    """Transformers' manager runs every request with the first request's settings: a refused first request does
    not set them, the first accepted one does, a request asking for others is refused by name, and a `seed`
    (which Transformers applies to torch's global generator) is refused."""
    peer = Server(PEER, tmp_path, "--continuous-batching", "--cb-max-memory-percent", "0.02")
    try:
        post = lambda body: httpx.post(f"{peer.url}/v1/completions", json=body, timeout=120)  # noqa: E731
        refused_first = post({"prompt": "x", "max_tokens": 4, "temperature": 0, "bogus": 1})
        accepted = post(greedy(prompts(1, 6)[0], 6, generation_config='{"do_sample": false}'))
        other = post(greedy("x", 4, stop="."))
        seeded = post(greedy("x", 4, generation_config='{"do_sample": false}', seed=3))
    finally:
        peer.stop()
    assert refused_first.status_code == 422
    assert accepted.status_code == 200, accepted.text
    assert other.status_code == 400 and "the first request's sampling and stopping settings" in other.text
    assert seeded.status_code == 400 and "`seed` is not supported" in seeded.text


def test_compile_serves_an_sllm_on_its_compiled_static_steps(tmp_path):
    """`sllm-serve --compile` (transformers serve's flag): the SLLM's manager runs the decoder steps on the static
    cache, compiled; concurrent greedy requests answer offline generate's text."""
    from modeling_sllm.sllm_routes import SLLMRoutes

    tokenizer, model = loaded(SLLM)
    routes = SLLMRoutes(model, tokenizer, "sllm", rows=4, max_queued=8, threads=1, grace=1.0, compile=True)
    routes.shutdown(block=True)
    assert routes.manager.settings.static_cache and routes.manager.settings.compile_options is not None
    texts = prompts(4, 10)
    compiled = Server(SLLM, tmp_path, "--continuous-batching", "--trust-remote-code", "--compile")
    try:
        replies = asyncio.run(complete_all(compiled.url, [greedy(text, 24) for text in texts], concurrency=4))
    finally:
        compiled.stop()
    assert [reply.status_code for reply in replies] == [200] * 4, replies[0].text
    assert [reply.json()["choices"][0]["text"] for reply in replies] == offline(SLLM, texts, 24)
