"""A bounded soak of `sllm-serve --continuous-batching` with the faults a production server meets: rounds of 64
concurrent clients, a third of which hang up mid-stream, a few requests whose rows fail inside the loop (injected),
then an overload past the queue bound and a SIGTERM under load. Counts what must be zero and what must be flat.

    python benchmarks/soak.py                     # 6 rounds of 64 clients, then overload and SIGTERM (~3 minutes)
    python benchmarks/soak.py --rounds 2 --output-dir /tmp/soak

Faults are injected in the server process only (`--serve`, which this script starts): a request with seed 666
raises inside the sentence loop's sampling whenever its row is in a step, so its step fails and the loop must
isolate it (`SentenceBatchingManager._isolate`). Per round: the requests that stayed must equal offline greedy
`generate` (greedy ones; each prompt's reference computed once in this process) or come back whole (sampled
ones); the injected ones must fail with their error; no client may wait past --request-timeout; after the round the
server must hold no request and no handler (`/sllm/stats`). Resident memory is sampled after each round: the last
must be within 5% of the one after the first (warm-up) round. Overload: a server with --max-rows 4 and
--max-queued-requests 16 gets 4 x 16 requests at once: the refused ones must be 503s with Retry-After, answered
within a second, and every accepted one must complete. SIGTERM: with 16 streams running, every client must get
its text or an error within the grace period and a little, and the process must exit.

Writes OUTPUT_DIR/soak.{json,md,png} (default benchmarks/results/soak).
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import matplotlib.pyplot as plt
import torch
from measure import EXCERPT, save_results, shipped_pair  # selects matplotlib's Agg backend
from serving_servers import wait_for_health
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
INJECTED_SEED = 666


def serve_with_faults(argv: list[str]) -> None:
    """The server process: rows seeded INJECTED_SEED raise inside the loop's sampling, then `sllm-serve argv`."""
    from modeling_sllm.row_sampling import RowSampling
    from modeling_sllm.serve import main

    choose = RowSampling.choose

    def failing(self, logits, rows, row_ids):
        if any(params.seed == INJECTED_SEED for params in self.params):
            raise RuntimeError("injected row failure")
        return choose(self, logits, rows, row_ids)

    RowSampling.choose = failing
    main(argv)


class Server:
    """This script's server process on 127.0.0.1 (`--serve`), stopped by PID."""

    def __init__(self, folder: Path, port: int, log: Path, *options: str):
        self.url, self.log = f"http://127.0.0.1:{port}", log.open("w")
        command = [sys.executable, __file__, "--serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
                   "--dtype", "float32", "--trust-remote-code", "--continuous-batching", *options]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=os.environ | {"HF_HUB_OFFLINE": "1"})  # fmt: skip
        if (why := wait_for_health(self.url, self.process)) is not None:
            self.stop()
            raise RuntimeError(f"the server {why}: see {log}")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024

    def held(self) -> dict:
        return next(iter(httpx.get(f"{self.url}/sllm/stats", timeout=10).json()["models"].values()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def one(client: httpx.AsyncClient, body: dict, hang_up: bool) -> dict:
    """Send a streamed request; read it whole (its text, error) or hang up after its first chunk."""
    text, started = [], time.monotonic()
    try:
        async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as reply:
            if reply.status_code != 200:
                return {"status": reply.status_code, "error": (await reply.aread()).decode()[:200]}
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 200, "error": str(chunk["error"])[:200], "s": time.monotonic() - started}
                text += [choice["text"] for choice in chunk.get("choices", [])]
                if hang_up:
                    return {"status": 200, "hung_up": True}
    except httpx.HTTPError as error:
        return {"status": None, "error": repr(error)[:200], "s": time.monotonic() - started}
    return {"status": 200, "text": "".join(text), "s": time.monotonic() - started}


async def run_round(url: str, bodies: list[tuple[dict, bool]], timeout: float) -> list[dict]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def bounded(body, hang_up):
            try:
                return await asyncio.wait_for(one(client, body, hang_up), timeout)
            except TimeoutError:
                return {"status": None, "error": "hung: no answer within the request timeout"}

        return await asyncio.gather(*(bounded(body, hang_up) for body, hang_up in bodies))


def soak(args, prompts: list[str], reference) -> dict:
    """Rounds of 64 clients on one server: per round its counts; RSS after each; held after each."""
    server = Server(args.sllm, args.port, args.output_dir / "soak-server.log")
    rounds, started = [], time.monotonic()
    try:
        for index in range(args.rounds):
            if time.monotonic() - started > args.time_limit:
                break
            rng = random.Random(index)
            bodies, kinds = [], []
            for client in range(args.clients):
                prompt = rng.choice(prompts)
                if client % 3 == 0:
                    kinds.append("hang-up")
                    bodies.append(({"prompt": prompt, "max_tokens": 400, "temperature": 0}, True))
                elif client < args.injected * 3 and client % 3 == 1:
                    kinds.append("injected")
                    bodies.append(({"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "seed": INJECTED_SEED},
                                   False))  # fmt: skip
                elif client % 2:
                    kinds.append("greedy")
                    bodies.append(({"prompt": prompt, "max_tokens": 24, "temperature": 0}, False))
                else:
                    kinds.append("sampled")
                    bodies.append(({"prompt": prompt, "max_tokens": rng.randint(8, 48), "temperature": 0.8,
                                    "seed": rng.randrange(2**31)}, False))  # fmt: skip
            results = asyncio.run(run_round(server.url, bodies, args.request_timeout))
            deadline = time.monotonic() + 30
            while (held := server.held()) != {"requests": 0, "queued": 0, "handlers": 0} and time.monotonic() < deadline:
                time.sleep(0.2)
            counts = {
                "hung": sum(1 for r in results if "hung" in str(r.get("error"))),
                "greedy_altered": sum(1 for (body, _), kind, r in zip(bodies, kinds, results)
                                      if kind == "greedy" and r.get("text") != reference(body["prompt"])),
                "stayed_failed": sum(1 for kind, r in zip(kinds, results)
                                     if kind in ("greedy", "sampled") and r.get("error")),
                "injected_failed": sum(1 for kind, r in zip(kinds, results) if kind == "injected" and r.get("error")),
                "injected": kinds.count("injected"), "hung_up": kinds.count("hang-up"),
                "requests": len(bodies), "held_after": held, "rss_mib": server.rss_mib(),
                "slowest_s": max((r.get("s") or 0) for r in results),
            }  # fmt: skip
            rounds.append(counts)
            print(f"round {index + 1}: {counts}", flush=True)
    finally:
        server.stop()
    rss = [r["rss_mib"] for r in rounds]
    return {"rounds": rounds, "rss_growth_after_warmup": (rss[-1] - rss[0]) / rss[0] if len(rss) > 1 else None}


def overload(args, prompts: list[str]) -> dict:
    """4 x the queue bound at once on a small server: 503s at once, every accepted request whole."""
    bound = 16
    server = Server(args.sllm, args.port + 1, args.output_dir / "overload-server.log", "--max-rows", "4",
                    "--max-queued-requests", str(bound))  # fmt: skip
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=args.request_timeout,
                                         limits=httpx.Limits(max_connections=4 * bound + 4)) as client:  # fmt: skip
                async def post(prompt):
                    started = time.monotonic()
                    reply = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 32,
                                                                       "temperature": 0})  # fmt: skip
                    return reply.status_code, reply.headers.get("retry-after"), time.monotonic() - started, reply

                return await asyncio.gather(*(post(prompts[i % len(prompts)]) for i in range(4 * bound)))

        replies = asyncio.run(burst())
    finally:
        server.stop()
    refused = [r for r in replies if r[0] == 503]
    accepted = [r for r in replies if r[0] == 200]
    return {"bound": bound, "sent": len(replies), "accepted": len(accepted), "refused_503": len(refused),
            "other": len(replies) - len(accepted) - len(refused),
            "refused_with_retry_after": sum(1 for r in refused if r[1] == "1"),
            "slowest_refusal_s": max((r[2] for r in refused), default=None),
            "accepted_whole": sum(1 for r in accepted if r[3].json()["usage"]["completion_tokens"] > 0)}  # fmt: skip


def sigterm(args, prompts: list[str]) -> dict:
    """16 long streams, SIGTERM once they run: every client answered within the grace period and a little."""
    grace = 3.0
    server = Server(args.sllm, args.port + 2, args.output_dir / "sigterm-server.log", "--grace-period", str(grace))
    try:
        async def load():
            async with httpx.AsyncClient(base_url=server.url, timeout=grace + 30) as client:
                tasks = [asyncio.create_task(one(client, {"prompt": p, "max_tokens": 4000, "temperature": 0,
                         "generation_config": '{"min_new_tokens": 4000}'}, False)) for p in prompts[:16]]  # fmt: skip
                await asyncio.sleep(2.0)
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks)
                return results, time.monotonic() - signalled

        results, answered_in = asyncio.run(load())
        server.process.wait(timeout=grace + 30)
    finally:
        server.stop()
    return {"streams": len(results), "grace_s": grace, "all_answered_within_s": answered_in,
            "ended_with_error": sum(1 for r in results if r.get("error")),
            "errors_say_stopped": sum(1 for r in results if "stopped" in str(r.get("error"))),
            "exit_code": server.process.returncode}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve_with_faults(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sllm", type=Path, default=shipped_pair()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--injected", type=int, default=3, help="requests per round whose rows fail (injected)")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--time-limit", type=float, default=600, help="seconds of rounds at most")
    parser.add_argument("--port", type=int, default=8760)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    words = EXCERPT.read_text().split()
    prompts = [" ".join(words[i * 12 : (i + 1) * 12]) for i in range(48)]
    tokenizer = AutoTokenizer.from_pretrained(args.sllm)
    model = AutoModelForCausalLM.from_pretrained(args.sllm, dtype=torch.float32, trust_remote_code=True).eval()
    cache: dict[str, str] = {}

    def reference(prompt: str) -> str:  # offline greedy generate, 24 new tokens, decoded as the server decodes
        if prompt not in cache:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
            cache[prompt] = tokenizer.decode(new, skip_special_tokens=True)
        return cache[prompt]

    results = {"soak": soak(args, prompts, reference), "overload": overload(args, prompts),
               "sigterm": sigterm(args, prompts)}  # fmt: skip
    print(json.dumps({k: v for k, v in results.items() if k != "soak"}, indent=1), flush=True)
    rounds = results["soak"]["rounds"]
    lines = [
        "# Soak: sllm-serve --continuous-batching under faults", "",
        f"{len(rounds)} rounds of {args.clients} concurrent streamed clients (a third hang up after their first chunk, "
        f"{args.injected} per round fail inside the loop by injection, the rest greedy or seeded sampled).", "",
        "| round | hung clients | greedy altered | stayed but failed | injected failed / injected | held after | RSS MiB |",
        "|---|---|---|---|---|---|---|",
        *[f"| {i + 1} | {r['hung']} | {r['greedy_altered']} | {r['stayed_failed']} | {r['injected_failed']} / "
          f"{r['injected']} | {r['held_after']} | {r['rss_mib']:.0f} |" for i, r in enumerate(rounds)],
        "", f"RSS growth after the first round: {100 * (results['soak']['rss_growth_after_warmup'] or 0):.1f}%.", "",
        f"Overload: {results['overload']}", "", f"SIGTERM under load: {results['sigterm']}",
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rounds) + 1), [r["rss_mib"] for r in rounds], "o-", label="server RSS after the round")
    ax.set_xlabel("round (64 clients each)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    save_results(args.output_dir, "soak", results, lines, fig)


if __name__ == "__main__":
    main()
