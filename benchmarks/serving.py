r"""Serving under load: the shipped equal-perplexity pair behind OpenAI-compatible servers on 127.0.0.1, driven by
a real concurrent streaming client; output tokens/s, requests/s, time to first token, latency and server memory,
the SLLM against its token-level peer's best serving mode, and how many requests each model's cache holds.

    python benchmarks/serving.py                      # the grid: 3 servers x 6 cells x 2 repeats (long on 2 cores)
    python benchmarks/serving.py --servers peer,peer-cb --cells 1x64 --new-tokens 8 --repeats 1 \
        --no-capacity --output-dir /tmp/serving-smoke # smoke
    python benchmarks/serving.py --command 'sllm-cb=python -m my_server {folder} --host {host} --port {port}'
                                                      # any server command line (e.g. before sllm-serve exists)

Workloads (--workload, benchmarks/serving_workloads.py): `uniform` (below: greedy, the length forced) or `mixed`
(each request its own temperature 0 / 0.7 / 1.0, top_p 1 / 0.9, seed, a stop string for one in four, max_tokens
16-128, seeded per repeat and cell so that every server gets the same requests). Under `mixed` the peer's best mode
is chosen among the modes that run each request with its own settings: `peer-own` only (QUALIFYING_PEERS says why
the others do not). --offline adds, in cells of one client, both models' offline `generate` on the same prompts in
this process (`sllm-offline`, `peer-offline`), interleaved with the servers, and the ratios served / offline.

Servers (--servers, comma-separated; all are started once at the beginning, on free ports of --host, with
OMP_NUM_THREADS removed from their environment so that each uses every core; only one is driven at a time; all are
stopped by PID at the end, also on Ctrl-C or SIGTERM: SIGTERM, then SIGKILL after a grace period):
- `sllm-cb` (default): checkpoints/scratch-sllm-192x5-decoder-1-layer served by
  `sllm-serve FOLDER --host H --port P --continuous-batching --dtype float32 --trust-remote-code`.
- `sllm` (extra, --sllm-without-cb adds it): the same without --continuous-batching.
- `peer`, `peer-cb` (default): its token-level peer checkpoints/scratch-token-lm-256x5 served by
  `transformers serve FOLDER --host H --port P --dtype float32`, without and with --continuous-batching.
- `peer-own` (the mixed workload's default peer): the peer served by `sllm-serve FOLDER --dtype float32`
  (Transformers' sequential handler with each request's settings honoured).
--sllm-serve replaces the `sllm-serve` executable of both SLLM modes; --command NAME=TEMPLATE replaces a whole
command line ({folder}, {host}, {port} are filled in).

Continuous batching's paged cache (transformers 5.24, CPU): on the first request the server zero-fills a cache of
max_memory_percent (0.6 on CPU) of the machine's RAM less its own RSS, whatever the other processes hold: ~13 GiB
and ~30 s on a 23 GiB machine, and two such servers at once exhaust the RAM. So --cb-args (default
`--cb-max-memory-percent 0.2`) is added after --continuous-batching in the peer's CB command (sllm-serve batches
the sentence cache, which grows with the requests it holds, and refuses paged-cache options): a budget far more than the grid needs (the peer's KV cache is 10 KiB per token: 64 requests of
1,088 tokens take 680 MiB); `--cb-args ''` gives the stock setting, for a machine with the RAM for it.

A server that does not come up within --startup-timeout (or exits) is recorded as failed with the tail of its log
and its cells as not run; the others go on. Each server's output is in OUTPUT_DIR/logs/NAME.log. Before
measuring, every server is warmed with --warmup-requests concurrent requests of the measured kind (64-token
prompts, the same body): a continuous-batching server builds its batching manager (and its paged cache) from the
first request's generation config, so the warm-up gives it the measured one.

Requests: POST /v1/completions with a text `prompt`, `"stream": true`, `"max_tokens": M`, `"temperature": 0` and
`"generation_config": json.dumps({"do_sample": false, "max_new_tokens": M, "min_new_tokens": M})`, M =
--new-tokens: greedy, the same length for every server. The client (httpx.AsyncClient) reads the SSE `data:` lines
as they come; the last chunk carries `usage`. Output tokens are usage.completion_tokens; a request that fails
(HTTP status, an error chunk, no usage, a timeout) or comes back with completion_tokens != M counts as an error,
and errors are reported, never dropped. usage.prompt_tokens (what the server's tokenizer made of the prompt) is
reported per cell.

Prompts: held-out text (python-docs.txt in ../shared/data, else the shipped examples/data/python-docs-excerpt.txt,
or --corpus), documents (lines) each followed by a newline, tokenized with the checkpoints' shared 8,192-token
tokenizer (no special tokens) into one stream; each request gets its own stretch of consecutive text, N tokens
(the cell's prompt length), decoded to a string. A window whose text does not re-tokenize to exactly N tokens is
moved up to 16 tokens on, so that the server sees N tokens (what it saw is reported from usage). The text is
fresh for every request of every cell and repeat (no prompt is sent twice, so a prefix cache cannot help);
all servers get the same prompts in the same cell and repeat. If the text is too short it is cycled (the results
say so).

Cells (CLIENTSxPROMPT): --clients x --prompts, or --cells "1x64,64x1024". Each of the C concurrent clients sends
one request at a time, R in all (--requests-per-client, by default 8 for 1 client, 4 for 8, 1 for 64: C x R
requests per cell). Per cell and server: output tokens/s = all completion tokens returned / wall time of the cell
(first request sent to last response ended); requests/s = good requests / wall time; time to first token (TTFT:
request sent to the first chunk with text) and end-to-end latency p50 / p95 over the cell's good requests; the
server's RSS (VmRSS of its process and its children from /proc, sampled at --sample-hz in a thread): before the
cell and its peak during the cell; the server's CPU time / wall time (cores busy), and the same for this client
process and for everything else on the machine (from /proc/stat: other load, which a shared machine has).
Bounded: --request-timeout per request, --cell-timeout per cell run; a run past it is recorded as timed out (its
unfinished requests as errors), and the next run waits (bounded) until that server's CPU is quiet.

Repeats (--repeats), interleaved: for each repeat, for each cell, every server runs once, the server order rotated
by one per repeat. Per cell and server: the median (and min-max) over repeats of each figure, peak RSS the max.

Ratios, per cell: the peer's best mode is the one with the higher median output tokens/s; for each SLLM mode,
SLLM tok/s / best peer mode tok/s per repeat, as median (min-max) over repeats, and the same for TTFT p50 as peer /
SLLM (> 1: the SLLM answers first). Only repeats in which both runs finished without error or timeout count.

Capacity (no server; --no-capacity skips it): how many concurrent requests of a --capacity-prompt-token prompt
(1,024) + M new tokens each model holds in the same cache memory. Both models are loaded in this process with
AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True) and generate greedily
with M new tokens forced (min_new_tokens = max_new_tokens) from held-out prompts at batch 1 and 8
(--capacity-batches): the SLLM's out.peak_cache_bytes (its sentence cache and its decoder cache), the peer's
modeling_sllm.cache_nbytes(out.cache) (its KV cache, which only grows); per request = bytes / batch. Reported: bytes
per request, the ratio peer / SLLM (how many times more requests fit in a given budget) and how many requests
fit in --cache-budget-mib (default: the peer's cache for 64 requests), from the largest batch's figures.

Writes OUTPUT_DIR/serving.{json,md,png} (default benchmarks/results/serving): the JSON (rewritten after every run)
holds the settings, the machine (CPU, cpu count, versions, date), the server command lines, every run's summary
and its per-request figures; the Markdown has the table (cell x server), the ratios and the capacity; the PNG shows
output tokens/s against clients, one panel per prompt length, one line per server and mode.
"""

import argparse
import asyncio
import gc
import json
import math
import os
import random
import shlex
import signal
import time
from pathlib import Path

import torch
from measure import EXCERPT, SHARED_DATA, run_header, shipped_pair  # selects matplotlib's Agg backend
from serving_client import drive, summarise
from serving_report import aggregate, cell_id, ratios, report_capacity, report_run, write_results
from serving_servers import (
    DEFAULT_SERVERS,
    LABELS,
    SERVERS,
    SLLM_MODES,
    RssSampler,
    Server,
    cpu_seconds,
    free_port,
    machine_cpu,
    process_tree,
    rss_bytes,
    server_commands,
)
from serving_workloads import WORKLOADS, Request, mixed, offline_run, uniform
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SLLM, SHIPPED_PEER = shipped_pair()
WARMUP_PROMPT = 64
SHIFT_LIMIT = 16  # tokens a prompt window may move on to re-tokenize to exactly N tokens


class Stop(Exception):
    """SIGTERM: stop measuring, stop the servers, write what was measured."""


# --------------------------------------------------------------------------------------------------- figures


def corpus_file(args) -> Path:
    """--corpus, else python-docs.txt in the shared data, else the shipped excerpt."""
    if args.corpus is not None:
        return args.corpus
    path = SHARED_DATA / "python-docs.txt"
    return path if path.exists() else EXCERPT


class Prompts:
    """Consecutive stretches of held-out text as prompt strings of exactly N tokens, each stretch used once."""

    def __init__(self, tokenizer, path: Path, needed: int):
        self.tokenizer, self.cursor, self.cycled = tokenizer, 0, False
        ids, lines = [], [line for line in path.read_text().splitlines() if line.strip()]
        for start in range(0, len(lines), 500):
            chunk = [line + "\n" for line in lines[start : start + 500]]
            for row in tokenizer(chunk, add_special_tokens=False).input_ids:
                ids += row
            if len(ids) >= needed:
                break
        self.stream, self.shifted, self.inexact = ids, 0, 0

    def ids(self, count: int) -> list[int]:
        """The next `count` tokens of the stream (cycled if it runs out)."""
        if self.cursor + count > len(self.stream):
            self.cursor, self.cycled = 0, True
        window = self.stream[self.cursor : self.cursor + count]
        self.cursor += count
        return window

    def text(self, length: int) -> str:
        """The next prompt: text of `length` tokens that re-tokenizes to `length` tokens (moved on by at most
        SHIFT_LIMIT tokens to find one; counted in `inexact` if none does)."""
        window = self.ids(length + SHIFT_LIMIT)
        self.cursor -= SHIFT_LIMIT
        for shift in range(SHIFT_LIMIT + 1):
            text = self.tokenizer.decode(window[shift : shift + length], clean_up_tokenization_spaces=False)
            if len(self.tokenizer(text, add_special_tokens=False).input_ids) == length:
                self.shifted += shift > 0
                self.cursor += shift
                return text
        self.inexact += 1
        return self.tokenizer.decode(window[:length], clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------- processes


# ------------------------------------------------------------------------------------------------ the client


def run_cell(server: Server, prompts: list[list[Request]], args) -> dict:
    """Drive `server` with one cell's prompts, sampling its memory and CPU: the run's summary and records."""
    pids = process_tree(server.process.pid)
    server.pids = pids
    before = rss_bytes(pids)
    cpu_before, client_before, (busy_before, total_before) = cpu_seconds(pids), time.process_time(), machine_cpu()
    with RssSampler(pids, args.sample_hz) as sampler:
        records, wall, timed_out = asyncio.run(drive(server.url, prompts, args.request_timeout, args.cell_timeout))
    cpu, client = cpu_seconds(pids) - cpu_before, time.process_time() - client_before
    busy, total = (now - then for now, then in zip(machine_cpu(), (busy_before, total_before)))
    machine = busy / total * (os.cpu_count() or 1) if total else 0.0  # cores busy over the run, every process
    elapsed = max(wall, 1e-9)
    summary = summarise(records, wall, args.new_tokens)
    status = "timed out" if timed_out else ("ok" if summary["errors"] == 0 else "errors")
    if not server.alive():
        status = f"server exited ({server.process.returncode})"
    return {"status": status, **summary, "rss_before_bytes": before, "rss_peak_bytes": sampler.peak,
            "rss_samples": sampler.samples, "server_cpu_s": cpu, "cores_busy": cpu / elapsed,
            "client_cores": client / elapsed, "machine_cores_busy": machine,
            "other_cores": max(0.0, machine - cpu / elapsed - client / elapsed), "records": records}  # fmt: skip


def warm_up(server: Server, prompts: list[Request], args) -> dict:
    """Concurrent warm-up requests of the measured kind (one client each): their summary."""
    records, wall, timed_out = asyncio.run(
        drive(server.url, [[p] for p in prompts], args.request_timeout, args.cell_timeout))
    summary = summarise(records, wall, args.new_tokens)
    return {"timed_out": timed_out, **{k: summary[k] for k in ("requests", "errors", "wall_s", "prompt_tokens_seen")},
            "error_messages": [r["error"] for r in records if r.get("error")]}  # fmt: skip


# ----------------------------------------------------------------------------------------------- capacity


def capacity(tokenizer, prompts: Prompts, args) -> dict:
    """Cache bytes per request of both models (offline generate in this process) and what fits in a budget."""
    from modeling_sllm import cache_nbytes  # here: the serving grid does not need the package

    length, new, batches = args.capacity_prompt, args.new_tokens, sorted(args.capacity_batches)
    rows = torch.tensor([prompts.ids(length) for _ in range(max(batches))], dtype=torch.long)
    result = {"prompt_tokens": length, "new_tokens": new, "batches": batches, "per_batch": {}}
    for family, folder in (("sllm", args.sllm), ("peer", args.peer)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
        result[f"{family}_class"] = type(model).__name__
        for batch in batches:
            ids = rows[:batch]
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, return_dict_in_generate=True,
                                     pad_token_id=model.generation_config.pad_token_id)  # fmt: skip
            written = out.sequences.shape[1] - length
            held = int(out.peak_cache_bytes) if family == "sllm" else int(cache_nbytes(out.cache))
            entry = result["per_batch"].setdefault(str(batch), {})
            entry[family] = {"cache_bytes": held, "per_request_bytes": held / batch, "new_tokens_written": written}
        del model
        gc.collect()
    for entry in result["per_batch"].values():
        entry["ratio_peer_over_sllm"] = entry["peer"]["per_request_bytes"] / entry["sllm"]["per_request_bytes"]
    largest = result["per_batch"][str(batches[-1])]
    per_request = {f: largest[f]["per_request_bytes"] for f in ("sllm", "peer")}
    budget = args.cache_budget_mib * 2**20 if args.cache_budget_mib else 64 * per_request["peer"]
    result["budget"] = {
        "bytes": budget,
        "what": f"--cache-budget-mib {args.cache_budget_mib:g}" if args.cache_budget_mib
        else "the peer's cache for 64 requests",
        "from_batch": batches[-1],
        "requests": {f: math.floor(budget / per_request[f]) for f in ("sllm", "peer")},
    }  # fmt: skip
    result["ratio"] = per_request["peer"] / per_request["sllm"]
    return result


# ------------------------------------------------------------------------------------------------ the grid


def parse_cells(args) -> list[tuple[int, int]]:
    """[(clients, prompt tokens)] in run order."""
    if args.cells:
        try:
            cells = [tuple(int(x) for x in c.lower().split("x")) for c in args.cells.split(",") if c.strip()]
        except ValueError:
            raise SystemExit(f"--cells {args.cells!r}: give CLIENTSxPROMPT,..., e.g. 1x64,64x1024") from None
        if any(len(c) != 2 or min(c) < 1 for c in cells):
            raise SystemExit(f"--cells {args.cells!r}: give CLIENTSxPROMPT,..., e.g. 1x64,64x1024")
        return cells
    return [(c, p) for p in args.prompts for c in args.clients]


def requests_per_client(spec: str, clients: int) -> int:
    """--requests-per-client: "N" for every cell, or "CLIENTS:N,..." (unlisted: max(1, min(8, 32 // clients)))."""
    if ":" not in spec:
        return int(spec)
    table = {int(c): int(n) for c, n in (item.split(":") for item in spec.split(",") if item.strip())}
    return table.get(clients, max(1, min(8, 32 // clients)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, default="uniform",
                        help="uniform: greedy, --new-tokens forced; mixed: each request its own settings "
                        "(benchmarks/serving_workloads.py)")
    parser.add_argument("--servers", help=f"comma-separated, of {', '.join(SERVERS)} (default: uniform "
                        f"{','.join(DEFAULT_SERVERS['uniform'])}; mixed {','.join(DEFAULT_SERVERS['mixed'])})")
    parser.add_argument("--offline", action="store_true",
                        help="in cells of one client, also time both models' offline generate on the same prompts "
                        "in this process, interleaved (uniform workload)")
    parser.add_argument("--sllm-without-cb", action="store_true",
                        help="also run the SLLM without --continuous-batching (server `sllm`)")
    parser.add_argument("--sllm", type=Path, default=SHIPPED_SLLM, help="the SLLM checkpoint folder")
    parser.add_argument("--peer", type=Path, default=SHIPPED_PEER, help="the token-level peer's checkpoint folder")
    parser.add_argument("--sllm-serve", default="sllm-serve", help="the SLLM's server executable")
    parser.add_argument("--command", action="append", default=[], metavar="NAME=TEMPLATE",
                        help="a server's whole command line, with {folder} {host} {port} (repeatable)")
    parser.add_argument("--cb-args", default="--cb-max-memory-percent 0.2",
                        help="added after --continuous-batching in the default commands (default: %(default)s; "
                        "'' for the stock paged cache, 60%% of RAM per server on CPU)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=0, help="ports from here on, one per server (0: free ports)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 1024], help="prompt tokens")
    parser.add_argument("--cells", help='a subset of CLIENTSxPROMPT cells, e.g. "1x64,64x1024" (replaces the grid)')
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request, forced for every server")
    parser.add_argument("--requests-per-client", default="1:8,8:4,64:1",
                        help='"N", or "CLIENTS:N,..." (default %(default)s; others: max(1, min(8, 32 // clients)))')
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over every cell and server")
    parser.add_argument("--warmup-requests", type=int, default=2, help="concurrent warm-up requests per server")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--cell-timeout", type=float, default=900, help="seconds per cell run (one server, one cell)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds for the servers to come up")
    parser.add_argument("--sample-hz", type=float, default=10, help="server RSS samples per second")
    parser.add_argument("--corpus", type=Path, help="prompt text (default: shared python-docs.txt, else the excerpt)")
    parser.add_argument("--no-capacity", action="store_true", help="skip the cache capacity measurement")
    parser.add_argument("--capacity-prompt", type=int, default=1024, help="prompt tokens for the capacity figures")
    parser.add_argument("--capacity-batches", type=int, nargs="+", default=[1, 8], help="batches for the capacity")
    parser.add_argument("--cache-budget-mib", type=float, help="cache budget (default: the peer's for 64 requests)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results" / "serving")
    args = parser.parse_args(argv)
    args.servers = args.servers or ",".join(DEFAULT_SERVERS[args.workload])
    args.servers = list(dict.fromkeys(s.strip() for s in args.servers.split(",") if s.strip()))
    if args.offline and args.workload != "uniform":
        parser.error("--offline times greedy forced-length generate: the uniform workload's requests")
    if args.sllm_without_cb and "sllm" not in args.servers:
        args.servers.append("sllm")
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers:
        parser.error(f"--servers: unknown {unknown}; choose from {', '.join(SERVERS)}")
    commands = {}
    for item in args.command:
        name, sep, template = item.partition("=")
        if not sep or name not in SERVERS:
            parser.error(f"--command {item!r}: give NAME=TEMPLATE, NAME one of {', '.join(SERVERS)}")
        commands[name] = template
    args.command = commands
    if min([*args.clients, *args.prompts, args.new_tokens, args.repeats, args.capacity_prompt,
            *args.capacity_batches]) < 1:  # fmt: skip
        parser.error("sizes, --new-tokens and --repeats must be positive")
    args.cell_list = parse_cells(args)
    try:
        args.rpc = {cell_id(c): requests_per_client(args.requests_per_client, c[0]) for c in args.cell_list}
    except ValueError:
        parser.error(f"--requests-per-client {args.requests_per_client!r}: give N or CLIENTS:N,...")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def on_sigterm(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.peer)
    same = (args.sllm / "tokenizer.json").read_bytes() == (args.peer / "tokenizer.json").read_bytes()
    corpus = corpus_file(args)
    per_repeat = sum(c * args.rpc[cell_id((c, p))] * (p + SHIFT_LIMIT) for c, p in args.cell_list)
    warm = (args.warmup_requests * len(args.servers)) * (WARMUP_PROMPT + SHIFT_LIMIT)
    needed = args.repeats * per_repeat + warm + args.capacity_prompt * max(args.capacity_batches)
    prompts = Prompts(tokenizer, corpus, needed)
    commands = server_commands(args)
    results = run_header(torch.device("cpu")) | {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("cell_list",)},
        "corpus": str(corpus), "corpus_is_excerpt": corpus == EXCERPT, "tokenizers_identical": same,
        "server_commands": {}, "servers": {}, "runs": [], "capacity": None,
    }  # fmt: skip
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def save():
        results["prompts"] = {"stream_tokens": len(prompts.stream), "cycled": prompts.cycled,
                              "windows_moved": prompts.shifted, "windows_inexact": prompts.inexact}  # fmt: skip
        (args.output_dir / "serving.json").write_text(json.dumps(results, indent=2))

    if not args.no_capacity:
        print("capacity: offline generate of both models ...", flush=True)
        try:
            results["capacity"] = capacity(tokenizer, prompts, args)
            report_capacity(results["capacity"])
        except Exception as error:  # noqa: BLE001 - reported, the serving grid goes on
            results["capacity"] = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"capacity failed: {results['capacity']['error']}", flush=True)
        gc.collect()
        save()

    servers: dict[str, Server] = {}
    try:
        for i, name in enumerate(args.servers):
            port = args.base_port + i if args.base_port else free_port(args.host, {s.port for s in servers.values()})
            folder = args.sllm if name in SLLM_MODES else args.peer
            argv = [part.format(folder=folder, host=args.host, port=port) for part in commands[name]]
            results["server_commands"][name] = shlex.join(argv)
            servers[name] = Server(name, argv, args.host, port, args.output_dir / "logs" / f"{name}.log")
            servers[name].start()
            process = servers[name].process
            print(f"{f'started {name} (pid {process.pid})' if process else f'could not start {name}'}: "
                  f"{shlex.join(argv)}", flush=True)  # fmt: skip
        deadline = time.perf_counter() + args.startup_timeout
        for name, server in servers.items():
            server.wait_ready(deadline)
            entry = results["servers"].setdefault(name, {"label": LABELS[name]})
            if server.failure:
                entry["failure"] = server.failure
                print(f"{name}: FAILED to start: {server.failure}", flush=True)
                continue
            warm_prompts = [make_request(prompts.text(WARMUP_PROMPT), args, random.Random(i))
                            for i in range(args.warmup_requests)]  # fmt: skip
            entry |= {"startup_s": server.startup_s, "pid": server.process.pid,
                      "rss_after_start_bytes": rss_bytes(server.pids)}  # fmt: skip
            entry["warmup"] = warm_up(server, warm_prompts, args) if warm_prompts else None
            entry["rss_after_warmup_bytes"] = rss_bytes(server.pids)
            print(f"{name}: ready in {server.startup_s:.0f} s, warm-up {entry['warmup']}", flush=True)
        save()
        live = [n for n in args.servers if not servers[n].failure]
        offline_models = load_offline(args)
        singles = sum(1 for c, _ in args.cell_list if c == 1)
        total = args.repeats * (len(args.cell_list) * len(live) + singles * len(offline_models))
        count = 0
        for repeat in range(args.repeats):
            shift = repeat % max(len(live), 1)
            order = live[shift:] + live[:shift]
            for cell in args.cell_list:
                clients, length = cell
                rng = random.Random(f"{repeat} {cell_id(cell)}")  # the mixed workload's settings, the same for all
                cell_prompts = [[make_request(prompts.text(length), args, rng) for _ in range(args.rpc[cell_id(cell)])]
                                for _ in range(clients)]  # fmt: skip
                if clients == 1 and offline_models:
                    for name, (model, model_tokenizer) in offline_models.items():
                        count += 1
                        run = {"repeat": repeat, "cell": cell_id(cell), "clients": 1, "prompt": length, "server": name,
                               "requests_per_client": args.rpc[cell_id(cell)]}  # fmt: skip
                        run |= offline_run(model, model_tokenizer, cell_prompts[0])
                        results["runs"].append(run)
                        report_run(run, count, total)
                for name in order:
                    server = servers[name]
                    count += 1
                    run = {"repeat": repeat, "cell": cell_id(cell), "clients": clients, "prompt": length,
                           "server": name, "requests_per_client": args.rpc[cell_id(cell)]}  # fmt: skip
                    if not server.alive():
                        run["status"] = "not run: server is down"
                    else:
                        run |= run_cell(server, cell_prompts, args)
                        if run["status"] != "ok" and server.alive():
                            run["quiet_wait_s"] = server.wait_quiet(args.request_timeout)
                    results["runs"].append(run)
                    report_run(run, count, total)
                    save()
    except (KeyboardInterrupt, Stop) as stop:
        results["interrupted"] = type(stop).__name__
        print(f"interrupted ({type(stop).__name__}): stopping the servers", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave a server running
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, server in servers.items():
            outcome = server.stop()
            results["servers"].setdefault(name, {"label": LABELS[name]})["stop"] = outcome
            print(f"stopped {name}: {outcome}", flush=True)
    results["wall_seconds"] = time.perf_counter() - started
    results["table"] = aggregate(results, args)
    results["ratios"] = ratios(results, args)
    write_results(results, args.output_dir)
    print(f"wrote {args.output_dir}/serving.{{json,md,png}} in {results['wall_seconds']:.0f} s", flush=True)


def make_request(prompt: str, args, rng: random.Random) -> Request:
    """A request of the benchmark's workload."""
    return uniform(prompt, args.new_tokens) if args.workload == "uniform" else mixed(prompt, rng)


def load_offline(args) -> dict:
    """{offline name: (model, tokenizer)} for --offline, loaded in this process as the capacity figures load them."""
    if not args.offline:
        return {}
    folders = {"sllm-offline": args.sllm, "peer-offline": args.peer}
    return {name: (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval(),
                   AutoTokenizer.from_pretrained(folder)) for name, folder in folders.items()}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- output


if __name__ == "__main__":
    main()
