"""Stage-1 (Sentence-VAE reconstruction) training efficiency on this CPU: variants side by side.

    python benchmarks/train_efficiency.py --minutes 4
    python benchmarks/train_efficiency.py --list              # the variants (benchmarks/variants/train_efficiency.json)

Backbone: the embedded SmolLM2-135M (its embeddings and output matrix shared and frozen).
Training sentences: 4-32 tokens from ../shared/data/linux-docs.txt; held-out: sentences of at
most 32 tokens from python-docs.txt (never trained on); without those corpora, the shipped excerpt
for both (`measure.TRAIN_TEXT`, `measure.HELD_OUT_TEXT`). Each variant is a pinned configuration
(every sentence-module field of SLLMConfig, as it was run) read from --variants-file; each trains for
the same wall-clock budget with AdamW, batch 32 sentences, seed 0, and is evaluated (full softmax,
greedy teacher-forced token accuracy and exact-match reconstruction) at fixed times. Writes
JSON, a Markdown table and a PNG plot (held-out metrics against minutes) to benchmarks/results.

The training loop is a bare AdamW loop, not SLLMTrainer: what it measures is sentences per second of the
training step alone (forward, backward, clipping, AdamW, timed per step with perf_counter; batch building
and evaluation are not counted), with bf16 autocast switched per variant; a Trainer would count its data
loading, callbacks and logging in that time.
"""

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from measure import (
    variants_file_option,
    HELD_OUT_TEXT,
    TRAIN_TEXT,
    VARIANTS_DIR,
    corpus_sentences,
    differing_fields,
    load_study,
    pad,
    reconstruction_metrics,
    save_results,
    two_panels,
)
from tqdm import tqdm

from modeling_sllm import SLLMForCausalLM
from modeling_sllm.embedded_backbone import load_smollm2

DEFAULT_VARIANTS_FILE = VARIANTS_DIR / "train_efficiency.json"


def run_variant(name, variant, llm, tokenizer, train, held_out, args) -> dict:
    torch.manual_seed(0)
    random.seed(0)
    config = variant["config"]
    model = SLLMForCausalLM.from_base_model(llm, tokenizer, objective="reconstruction", **config)
    differ = differing_fields(model.config, config)
    if differ:  # from_base_model must build exactly the pinned modules
        raise RuntimeError(f"{name}: from_base_model did not build the pinned config (built, pinned): {differ}")
    model.llm.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant["bf16"] else contextlib.nullcontext()
    curve = [{"minutes": 0.0, "sentences": 0, **reconstruction_metrics(model, held_out)}]
    budget, eval_every = 60 * args.minutes, 60 * args.minutes / args.evals
    trained_s, seen, next_eval, step = 0.0, 0, eval_every, 0
    bar = tqdm(total=round(budget), desc=name, unit="s")
    while trained_s < budget:
        batch = pad(random.sample(train, args.batch_size))
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        trained_s, seen, step = trained_s + elapsed, seen + args.batch_size, step + 1
        bar.update(round(trained_s) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.3f}", sent_per_s=f"{seen / trained_s:.1f}")
        if trained_s >= next_eval or trained_s >= budget:  # evaluation time is not counted as training
            curve.append({"minutes": trained_s / 60, "sentences": seen, **reconstruction_metrics(model, held_out)})
            next_eval += eval_every
    bar.close()
    return {"name": name, "bf16": variant["bf16"], "config": config, "steps": step,
            "sentences_per_s": seen / trained_s, "curve": curve}  # fmt: skip


def main():
    pre, variants_file = variants_file_option(DEFAULT_VARIANTS_FILE, "the study's pinned variants (JSON: every sentence-module field of SLLMConfig)")
    variants = load_study(variants_file, extra_keys=("bf16",))["variants"]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre]
    )
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per variant")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per variant")
    parser.add_argument("--variants", nargs="*", default=list(variants)[:4], choices=list(variants))
    parser.add_argument("--list", action="store_true", help="print the variants of --variants-file and stop")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--append", action="store_true", help="add the variants to an existing results file (none: rewrite its table)"
    )
    args = parser.parse_args()
    if args.list:
        print("\n".join(variants))
        return
    torch.manual_seed(0)
    llm, tokenizer = load_smollm2()
    probe = SLLMForCausalLM.from_base_model(llm, tokenizer, max_sentence_len=64)  # segments the data as the runs did
    train = corpus_sentences(probe, tokenizer, TRAIN_TEXT, 20000, 4, 32) if args.variants else []
    held_out = corpus_sentences(probe, tokenizer, HELD_OUT_TEXT, args.held_out, 1, 32)
    print(f"{len(train)} training sentences ({TRAIN_TEXT.name}), {len(held_out)} held-out ({HELD_OUT_TEXT.name})")
    settings = vars(args) | {"output_dir": str(args.output_dir), "variants_file": str(args.variants_file)}
    results = {"settings": settings, "variants": []}
    if args.append:
        results = json.loads((args.output_dir / "train_efficiency.json").read_text())
    results["held_out_targets_per_sentence"] = sum(len(s) + 1 for s in held_out) / len(held_out)  # tokens + end
    for name in args.variants:
        results["variants"].append(run_variant(name, variants[name], llm, tokenizer, train, held_out, args))
        last = results["variants"][-1]
        print(
            f"{name}: {last['sentences_per_s']:.1f} sentences/s, held-out token accuracy "
            f"{last['curve'][-1]['token_accuracy']:.3f}, exact match {last['curve'][-1]['exact_match']:.3f}"
        )
    write_results(results, args.output_dir)


def error_power_law(curve: list[dict]) -> tuple[float, float] | None:
    """(a, k) of held-out token error = a * minutes^-k, fitted over the second half of the curve;
    None when the curve is too short or its error is not falling."""
    late = [p for p in curve if p["minutes"] > 0][-(len(curve) // 2) :]
    if len(late) < 3:
        return None
    minutes, errors = np.log([p["minutes"] for p in late]), np.log([1 - p["token_accuracy"] for p in late])
    slope, intercept = np.polyfit(minutes, errors, 1)
    return (float(np.exp(intercept)), float(-slope)) if slope < 0 else None


def write_results(results: dict, output_dir: Path) -> None:
    base = results["variants"][0]["sentences_per_s"]
    lines = [
        "| variant | sentences/s | vs first | steps | minutes | held-out token acc | held-out exact match |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in results["variants"]:
        end = v["curve"][-1]
        lines.append(f"| {v['name']} | {v['sentences_per_s']:.1f} | {v['sentences_per_s'] / base:.2f}x | {v['steps']} | "
                     f"{end['minutes']:.0f} | {end['token_accuracy']:.3f} | {end['exact_match']:.3f} |")  # fmt: skip
    if "held_out_targets_per_sentence" in results:
        # exact match needs every target of a sentence right: about accuracy ** targets_per_sentence
        needed = 0.9 ** (1 / results["held_out_targets_per_sentence"])
        lines += ["", f"Token accuracy for ~90% exact match on these sentences: {needed:.4f}. Extrapolated:", ""]
        for v in results["variants"]:
            fit = error_power_law(v["curve"])
            if fit is None:
                lines.append(f"- {v['name']}: no estimate (curve too short or not improving)")
                continue
            a, k = fit
            hours = ((1 - needed) / a) ** (-1 / k) / 60
            estimate = f"{hours:,.0f} hours" if hours < 1e5 else "more than 100,000 hours"
            lines.append(f"- {v['name']}: error = {a:.2f} * minutes^-{k:.3f}, so {estimate}")
    fig, left, right = two_panels(
        "Sentence-VAE stage 1 on SmolLM2-135M: train linux-docs, held-out python-docs",
        ("training minutes (2 CPU cores)",) * 2, ("held-out token accuracy", "held-out exact-match reconstruction"),
    )  # fmt: skip
    for v in results["variants"]:
        minutes = [p["minutes"] for p in v["curve"]]
        left.plot(minutes, [p["token_accuracy"] for p in v["curve"]], "o-", label=v["name"])
        right.plot(minutes, [p["exact_match"] for p in v["curve"]], "o-", label=v["name"])
    left.legend(fontsize=7)
    save_results(output_dir, "train_efficiency", results, lines, fig)


if __name__ == "__main__":
    main()
