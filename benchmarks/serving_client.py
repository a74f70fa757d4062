"""The client of benchmarks/serving.py: concurrent streaming clients, one request at a time each (httpx), every
request's timings, usage and error, and a run's summary."""

import asyncio
import json
import statistics
import time

import httpx
import numpy as np
from serving_workloads import Request, request_problem

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    return float(np.percentile(values, q)) if values else None


def median_of(values: list) -> float | None:
    """The median of the values that are not None (None if none is)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ---------------------------------------------------------------------------------------------------- prompts


async def one_request(client: httpx.AsyncClient, url: str, request: Request, origin: float) -> dict:
    """Send one streamed request and read it to its end: its timings, usage and error (None if it is good)."""
    record = {"sent_s": time.perf_counter() - origin, "ttft_s": None, "latency_s": None, "prompt_tokens": None,
              "completion_tokens": None, "finish_reason": None, "chunks": 0, "error": None}  # fmt: skip
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=request.body) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record["error"] = f"HTTP {response.status_code}: {body[:300]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    record["error"] = f"error chunk: {str(chunk['error'])[:300]}"
                    return record
                record["chunks"] += 1
                choices = chunk.get("choices") or [{}]
                if record["ttft_s"] is None and choices[0].get("text"):
                    record["ttft_s"] = time.perf_counter() - start
                if choices[0].get("finish_reason"):
                    record["finish_reason"] = choices[0]["finish_reason"]
                if chunk.get("usage"):
                    record["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
                    record["completion_tokens"] = chunk["usage"].get("completion_tokens")
        record["latency_s"] = time.perf_counter() - start
        record["error"] = request_problem(request, record["completion_tokens"], record["finish_reason"])
    except asyncio.CancelledError:
        record["error"] = "cancelled at the cell timeout"
        raise
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as error:
        record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        if record["latency_s"] is None and record["error"] is None:
            record["error"] = "unfinished"
    return record


async def drive(url: str, prompts: list[list[Request]], request_timeout: float,
                cell_timeout: float) -> tuple[list[dict], float, bool]:  # fmt: skip
    """Run one cell: one task per client, each sending its requests one at a time. Returns (per-request records in
    client order, wall seconds from the first request to the last end, whether the cell timed out)."""
    records: list[list[dict]] = [[] for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    timeout = httpx.Timeout(request_timeout, connect=30)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        origin = time.perf_counter()

        async def client_loop(i: int):
            for j, prompt in enumerate(prompts[i]):
                entry = {"client": i, "index": j}
                try:
                    record = await asyncio.wait_for(one_request(client, url, prompt, origin), request_timeout)
                except TimeoutError:
                    record = {"error": f"request timeout ({request_timeout:g} s)"}
                except Exception as error:  # noqa: BLE001 - anything else a request raises is its error
                    record = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                records[i].append(entry | record | {"ended_s": time.perf_counter() - origin})

        tasks = [asyncio.create_task(client_loop(i)) for i in range(len(prompts))]
        done, pending = await asyncio.wait(tasks, timeout=cell_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - origin
    ends = [r["ended_s"] for rows in records for r in rows]
    if not pending and ends:
        wall = max(ends)  # the last response's end
    flat = []
    for i, rows in enumerate(records):
        for j in range(len(prompts[i])):
            if j < len(rows):
                flat.append(rows[j])
            else:
                flat.append({"client": i, "index": j, "error": "not finished at the cell timeout"})
    return flat, wall, bool(pending)


def summarise(records: list[dict], wall: float, new_tokens: int) -> dict:
    """A run's figures from its per-request records."""
    good = [r for r in records if r.get("error") is None]
    tokens = sum(r.get("completion_tokens") or 0 for r in records)
    ttft = [r["ttft_s"] for r in good if r.get("ttft_s") is not None]
    latency = [r["latency_s"] for r in good]
    prompt_tokens = sorted({r["prompt_tokens"] for r in records if r.get("prompt_tokens") is not None})
    return {
        "requests": len(records), "good": len(good), "errors": len(records) - len(good),
        "error_kinds": sorted({r["error"].split(":")[0] for r in records if r.get("error")}),
        "completion_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(good) / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
        "prompt_tokens_seen": prompt_tokens, "new_tokens": new_tokens,
    }  # fmt: skip
