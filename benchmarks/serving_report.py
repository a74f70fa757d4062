"""benchmarks/serving.py's results: a line per run, the table over repeats, the ratios (SLLM / the peer's best
qualifying mode, and served / offline), serving.{json,md,png}."""

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter
from measure import save_results, spread  # selects matplotlib's Agg backend
from serving_client import median_of
from serving_servers import LABELS, OFFLINE, QUALIFYING_PEERS, SLLM_MODES

def cell_id(cell: tuple[int, int]) -> str:
    return f"{cell[0]}x{cell[1]}"


def report_run(run: dict, count: int, total: int) -> None:
    """One line per cell run, flushed."""
    head = f"[{count}/{total}] repeat {run['repeat'] + 1} {run['cell']} {run['server']}:"
    if "tokens_per_s" not in run:
        print(f"{head} {run['status']}", flush=True)
        return
    print(f"{head} {fmt(run['tokens_per_s'], '.1f')} tok/s, {fmt(run['requests_per_s'], '.2f')} req/s, TTFT p50/p95 "
          f"{fmt(run['ttft_p50_s'], '.3f')}/{fmt(run['ttft_p95_s'], '.3f')} s, latency p50/p95 "
          f"{fmt(run['latency_p50_s'], '.2f')}/{fmt(run['latency_p95_s'], '.2f')} s, RSS {mib(run['rss_before_bytes'])}"
          f" -> peak {mib(run['rss_peak_bytes'])}, cores: server {fmt(run['cores_busy'], '.2f')} client "
          f"{fmt(run['client_cores'], '.2f')} others {fmt(run['other_cores'], '.2f')}, prompt tokens seen "
          f"{run['prompt_tokens_seen']}, errors {run['errors']}/{run['requests']} {run['error_kinds'] or ''} "
          f"[{run['status']}] in {run['wall_s']:.1f} s", flush=True)  # fmt: skip


def report_capacity(cap: dict) -> None:
    for batch, entry in cap["per_batch"].items():
        print(f"capacity batch {batch}: SLLM {entry['sllm']['per_request_bytes'] / 2**20:,.3f} MiB/request, peer "
              f"{entry['peer']['per_request_bytes'] / 2**20:,.3f} MiB/request, ratio "
              f"{entry['ratio_peer_over_sllm']:.2f}x", flush=True)  # fmt: skip


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def aggregate(results: dict, args) -> list[dict]:
    """Per cell and server: figures over repeats (median, tok/s with min-max, peak RSS the max, errors summed)."""
    rows = []
    for cell in args.cell_list:
        for name in [*args.servers, *(OFFLINE if args.offline and cell[0] == 1 else ())]:
            runs = [r for r in results["runs"] if r["cell"] == cell_id(cell) and r["server"] == name]
            measured = [r for r in runs if "tokens_per_s" in r]
            row = {"cell": cell_id(cell), "clients": cell[0], "prompt": cell[1], "server": name,
                   "runs": len(runs), "statuses": [r["status"] for r in runs]}  # fmt: skip
            if measured:
                row |= {
                    "tokens_per_s": spread([r["tokens_per_s"] for r in measured if r["tokens_per_s"] is not None]),
                    "requests_per_s": median_of([r["requests_per_s"] for r in measured]),
                    **{k: median_of([r[k] for r in measured])
                       for k in ("ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s", "cores_busy",
                                 "client_cores", "other_cores")},
                    "rss_before_bytes": median_of([r["rss_before_bytes"] for r in measured]),
                    "rss_peak_bytes": max((r["rss_peak_bytes"] or 0) for r in measured) or None,
                    "errors": sum(r["errors"] for r in measured), "requests": sum(r["requests"] for r in measured),
                    "prompt_tokens_seen": sorted({t for r in measured for t in r["prompt_tokens_seen"]}),
                }  # fmt: skip
            rows.append(row)
    return rows


def ratios(results: dict, args) -> list[dict]:
    """Per cell and SLLM mode: SLLM / best peer mode tok/s and peer / SLLM TTFT p50, per repeat and over them."""
    table = {(r["cell"], r["server"]): r for r in results["table"]}
    out = []
    for cell in args.cell_list:
        cid = cell_id(cell)
        peers = [m for m in QUALIFYING_PEERS[args.workload] if table.get((cid, m), {}).get("tokens_per_s")]
        best = max(peers, key=lambda m: table[(cid, m)]["tokens_per_s"]["median"]) if peers else None
        against = [(mode, best) for mode in SLLM_MODES if mode in args.servers and best]
        against += [(served, offline) for offline, model in OFFLINE.items() if table.get((cid, offline))
                    for served in args.servers if served.startswith(model)]  # fmt: skip
        for mode, other in against:
            tok, ttft = [], []
            for repeat in range(args.repeats):
                pair = {n: next((r for r in results["runs"] if r["cell"] == cid and r["server"] == n
                                 and r["repeat"] == repeat), None) for n in (mode, other)}  # fmt: skip
                if any(r is None or r["status"] != "ok" for r in pair.values()):
                    continue
                tok.append(pair[mode]["tokens_per_s"] / pair[other]["tokens_per_s"])
                if pair[mode]["ttft_p50_s"] and pair[other]["ttft_p50_s"]:
                    ttft.append(pair[other]["ttft_p50_s"] / pair[mode]["ttft_p50_s"])
            modes = peers if other == best else [other]
            out.append({"cell": cid, "sllm": mode, "peer_best": other,
                        "peer_modes_tokens_per_s": {m: table[(cid, m)]["tokens_per_s"]["median"] for m in modes},
                        "tokens_per_s_ratio_per_repeat": tok, "tokens_per_s_ratio": spread(tok),
                        "ttft_p50_ratio_per_repeat": ttft, "ttft_p50_ratio": spread(ttft)})  # fmt: skip
    return out


def ratio_text(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def write_results(results: dict, output_dir: Path) -> None:
    """serving.json, serving.md (header, table, ratios, capacity) and serving.png (tok/s against clients)."""
    machine, versions, s = results["machine"], results["versions"], results["settings"]
    lines = [
        "# Serving: SLLM against its token-level peer under concurrent load",
        "",
        (f"`{results['command']}`; {results['date']}, commit {results['git_commit']}"
         f"{' (uncommitted changes)' if results['git_dirty'] else ''}; {machine['cpu']}, {machine['cpu_count']} "
         f"CPUs; torch {versions['torch']}, transformers {versions['transformers']}; prompts from "
         f"{Path(results['corpus']).name}{' (cycled)' if results['prompts']['cycled'] else ''}."),
        "",
        *[f"- `{n}` ({LABELS[n]}): `{c}`" for n, c in results["server_commands"].items()],
        *[f"- `{n}`: failed to start: {e['failure'][:300]}" for n, e in results["servers"].items() if e.get("failure")],
        *([f"- interrupted ({results['interrupted']}): the runs below are those finished before"]
          if results.get("interrupted") else []),
        "",
        (("/v1/completions, streamed, greedy, " + f"{s['new_tokens']} new tokens forced per request"
          if s["workload"] == "uniform" else "the mixed workload (benchmarks/serving_workloads.py: each request its "
          "own temperature, top_p, seed, stop strings, max_tokens 16-128)") + "; each client sends "
         f"one request at a time (requests per client: {s['requests_per_client']}). tok/s = completion tokens / wall "
         f"time of the cell, median (min-max) of {s['repeats']} interleaved repeats; req/s, TTFT (to the first "
         "chunk with text) and latency: medians over repeats of each run's p50 / p95; RSS: the server's VmRSS "
         "before the cell (median) -> its peak during the cell (max over repeats); cores: CPU time / wall time of the "
         "server, of this client and of every other process (medians; others > 0: a shared machine disturbed the "
         "run); errors: failed or short requests / all."),
        "",
        "| clients x prompt | server | prompt tokens seen | tok/s | req/s | TTFT p50 / p95 (s) | latency p50 / p95 (s) "
        "| RSS before -> peak | cores: server / client / others | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in results["table"]:
        head = f"| {row['clients']} x {row['prompt']:,} | {row['server']} |"
        if "tokens_per_s" not in row:
            failed = results["servers"].get(row["server"], {}).get("failure")
            why = ", ".join(row["statuses"]) or ("not run: the server failed to start" if failed else "not run")
            lines.append(head + f" {why} |" + " |" * 7)
            continue
        t = row["tokens_per_s"]
        flag = "" if set(row["statuses"]) == {"ok"} else f" ({', '.join(sorted(set(row['statuses'])))})"
        lines.append(
            head + f" {', '.join(map(str, row['prompt_tokens_seen'])) or '-'} | "
            f"{t['median']:,.1f} ({t['min']:,.1f}-{t['max']:,.1f}) | {fmt(row['requests_per_s'], '.2f')} | "
            f"{fmt(row['ttft_p50_s'], '.3f')} / {fmt(row['ttft_p95_s'], '.3f')} | "
            f"{fmt(row['latency_p50_s'], '.2f')} / {fmt(row['latency_p95_s'], '.2f')} | "
            f"{mib(row['rss_before_bytes'])} -> {mib(row['rss_peak_bytes'])} | {fmt(row['cores_busy'], '.2f')} / "
            f"{fmt(row['client_cores'], '.2f')} / {fmt(row['other_cores'], '.2f')} | "
            f"{row['errors']}/{row['requests']}{flag} |")  # fmt: skip
    lines += ["", "## SLLM / the peer's best mode (and served / offline)", ""]
    if results["ratios"]:
        lines += ["Per cell the peer's best mode is the one with the higher median tok/s among those that run the "
                  f"workload's requests as asked ({', '.join(QUALIFYING_PEERS[s['workload']])}); rows against an "
                  "offline mode compare a server with its model's offline generate on the same prompts. Ratios per "
                  "repeat (runs without errors only), median (min-max). TTFT ratio = the other's TTFT p50 / this "
                  "one's (> 1: this one answers first).", "",
                  "| clients x prompt | SLLM mode | peer best mode (tok/s of each) | tok/s ratio | TTFT p50 ratio |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in results["ratios"]:
            modes = ", ".join(f"{m} {v:,.1f}" for m, v in r["peer_modes_tokens_per_s"].items())
            lines.append(f"| {r['cell']} | {r['sllm']} | {r['peer_best']} ({modes}) | "
                         f"{ratio_text(r['tokens_per_s_ratio'])} | {ratio_text(r['ttft_p50_ratio'])} |")  # fmt: skip
    else:
        lines.append("No ratios: an SLLM mode and a peer mode must both have been measured.")
    lines += ["", "## Capacity: requests the same cache memory holds", ""]
    cap = results["capacity"]
    if cap is None:
        lines.append("Not measured (--no-capacity).")
    elif cap.get("status") == "failed":
        lines.append(f"Failed: {cap['error'][:500]}")
    else:
        lines += [f"Offline greedy generate in one process, fp32, {cap['prompt_tokens']:,}-token prompts + "
                  f"{cap['new_tokens']} new tokens forced: the SLLM's peak_cache_bytes, the peer's KV cache "
                  "(cache_nbytes) after the call; per request = bytes / batch.", "",
                  "| batch | SLLM cache / request | peer cache / request | peer / SLLM |", "|---|---|---|---|"]
        for batch, e in cap["per_batch"].items():
            lines.append(f"| {batch} | {e['sllm']['per_request_bytes'] / 2**20:,.2f} MiB | "
                         f"{e['peer']['per_request_bytes'] / 2**20:,.2f} MiB | {e['ratio_peer_over_sllm']:.2f}x |")
        b = cap["budget"]
        lines += ["", f"Within {b['bytes'] / 2**20:,.1f} MiB ({b['what']}; batch-{b['from_batch']} figures): "
                  f"SLLM {b['requests']['sllm']:,} requests, peer {b['requests']['peer']:,} "
                  f"({cap['ratio']:.2f}x as many)."]  # fmt: skip
    lengths = sorted({row["prompt"] for row in results["table"]})
    panels = max(len(lengths), 1)
    fig, axes = plt.subplots(1, panels, figsize=(max(5.5 * panels, 8), 4.5), squeeze=False)
    fig.suptitle(f"Output tokens/s under concurrent load\n({s['new_tokens']} new tokens per request, streamed; "
                 "bars: min-max over repeats)", fontsize=10)  # fmt: skip
    for ax, length in zip(axes[0], lengths):
        for name in s["servers"]:  # offline modes have one client only: not drawn
            rows = sorted((r for r in results["table"] if r["prompt"] == length and r["server"] == name
                           and "tokens_per_s" in r), key=lambda r: r["clients"])  # fmt: skip
            if not rows:
                continue
            x = [r["clients"] for r in rows]
            y = [r["tokens_per_s"]["median"] for r in rows]
            err = [[m - r["tokens_per_s"]["min"] for m, r in zip(y, rows)],
                   [r["tokens_per_s"]["max"] - m for m, r in zip(y, rows)]]  # fmt: skip
            style = "-" if name in SLLM_MODES else "--"
            ax.errorbar(x, y, yerr=err, fmt="o" + style, capsize=3, label=LABELS[name])
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["clients"] for r in results["table"]}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{length:,}-token prompts")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save_results(output_dir, "serving", results, lines, fig)
