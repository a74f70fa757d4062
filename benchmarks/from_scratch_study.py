"""From scratch at equal compute: token-level Llamas against SLLMs around the same kind of Llama (issue 21).

    python benchmarks/from_scratch_study.py run --minutes 6 --parallel 2 --runs ../runs/scratch   # everything
    python benchmarks/from_scratch_study.py train --variant NAME --minutes 6 --runs ../runs/scratch   # one model
    python benchmarks/from_scratch_study.py report --runs ../runs/scratch    # measure the trained models, write results
    python benchmarks/from_scratch_study.py run --smoke                       # the whole pipeline at tiny sizes, 20 s each
    python benchmarks/from_scratch_study.py list                              # the models, one a line
    python benchmarks/from_scratch_study.py run --models "token LM 192x5" "SLLM 192x5, decoder 1 layer" \
        --minutes 30 --runs ../runs/scratch-headline --output-dir benchmarks/results/scratch-headline  # a pair
    python benchmarks/from_scratch_study.py export --runs ../runs/scratch-headline --to checkpoints   # ship them

Models: benchmarks/variants/scratch.json (--variants-file): `token_lms` (plain Llamas) and `variants` (SLLMs),
each with every Llama field that defines its architecture written out and, for SLLMs, every sentence-module
field of SLLMConfig; the tokenizer and training settings are pinned there too.

Data: a byte-level BPE tokenizer (modeling_sllm.tokenizer_training, 8,192 tokens) trained on the linux-docs
training split, cached in --runs; the last 5% of linux-docs' documents (lines) are the in-domain test split,
python-docs.txt the out-of-domain one (its last rows are scored: examples/data ships its start, so these are
texts not in this repository). Texts are packed into rows of 256 tokens (each document followed by a newline);
the same rows are scored for every model.

Training: each model for the same wall-clock budget (--minutes of training; the held-out evaluations every
quarter of it and the checkpoint saves are not counted, see `Budget`), one thread each (--threads 1), two
side by side (--parallel 2, subprocesses), through Trainer (SLLMTrainer for the SLLMs), batch 8 x 256 tokens,
AdamW with a learning rate that follows the share of the budget spent (warm-up, then cosine decay).
Checkpoints, logs and the trained models go to --runs (outside the repository); a model with a result.json
there is skipped when the study is run again, an interrupted one resumes from its last checkpoint.
`--device cuda` trains and measures on a GPU (bf16 autocast).

Measured per model (`report`), on the same tokens with the same tokenizer: parameters, training steps and
text tokens, analytic multiply-adds per generated token (modeling_sllm.from_scratch.multiply_adds_per_token; an
SLLM's per-sentence costs amortised over its measured tokens per sentence on the in-domain test rows),
held-out perplexity per text token in and out of domain (measure.same_tokens_perplexity: an SLLM's exp(loss),
every token and its sentence-end and end-of-text decisions; a token LM's exp(mean NLL) of bos + row + eos,
every text token and the eos; both over the number of text tokens), greedy generation tokens/s at batch 1,
8 and 64 after a short and a 1,024-token prompt (each model writes exactly --new-tokens tokens per row: eos is
held off until then, and an SLLM still ends its sentences where its rule and decoder say; all models timed in
turns, --repeats times, median and min-max), the peak bytes of every cache while generating, and generate's
per-token time of a 1-layer width-8 model of each family (the Python and framework overhead a model's
per-token time must be well above for the speed ratios to measure the architecture). Equal-perplexity pairs:
each SLLM beside the token LM nearest its in-domain perplexity, with the speed ratio in every setting (median
and min-max of the per-repeat ratios: the repeats took turns).
Writes benchmarks/results/scratch/scratch.{json,md,png} (--output-dir): the tables, the frontiers at batch 1
after a short prompt and at batch 64 after a long one, and the training curves.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import (
    SHARED_CORPORA,
    VARIANTS_DIR,
    corpus_lines,
    differing_fields,
    load_study,
    pack,
    pareto_front,
    same_tokens_perplexity,
    save_results,
    spread,
    time_alternately,
    tokens_per_sentence,
    variants_file_option,
)
import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from modeling_sllm import SLLMForCausalLM, cache_nbytes
from modeling_sllm.from_scratch import build_scratch_sllm, build_scratch_token_lm, multiply_adds_per_token
from modeling_sllm.tokenizer_training import train_bpe_tokenizer
from modeling_sllm.training import SLLMTrainer, last_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_TEXT, HELD_OUT_TEXT = SHARED_CORPORA  # the corpora themselves, never the excerpt (corpus_lines)
DEFAULT_VARIANTS_FILE = VARIANTS_DIR / "scratch.json"
DEFAULT_RUNS = REPO.parent / "runs" / "scratch"
SMOKE_RUNS = REPO.parent / "runs" / "scratch-smoke"
RESULT_FILE, BUDGET_FILE = "result.json", "budget.json"
BATCHES = (1, 8, 64)  # generation is timed at each batch size, after short and after long prompts
PAIR_TOLERANCE = 0.05  # an SLLM and a token LM are an equal-perplexity pair within 5% in-domain perplexity
FRONTIERS = ("batch 1", f"batch {BATCHES[-1]}, long prompt")  # the regimes plotted
# What --smoke changes: tiny models (width / 8, at most 2 layers), a small tokenizer and data, short measurements.
SMOKE = {"minutes": 20 / 60, "vocab_size": 1024, "train_documents": 3000, "test_documents": 400, "eval_rows": 16,
         "curve_rows": 8, "new_tokens": 16, "prompt_tokens": 32, "long_prompt_tokens": 128}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the study file


def read_study(path: Path, smoke: bool) -> dict:
    """The study file, checked ({name: model} in `models`, a token LM and an SLLM taking turns so that each
    pair trained side by side holds one of each); with `smoke`, every model shrunk."""
    study = load_study(path, extra_keys=("llama",))
    fields = set(next(iter(study["variants"].values()))["llama"])
    token_lms = {}
    for i, entry in enumerate(study.get("token_lms") or []):
        where = f"{path}: token_lms[{i}] ({entry.get('name', 'no name')!r})"
        if not {"name", "llama", "as_run"} <= set(entry):
            raise SystemExit(f"{where}: needs name, llama and as_run")
        if entry["name"] in token_lms or entry["name"] in study["variants"]:
            raise SystemExit(f"{where}: the name is used twice")
        token_lms[entry["name"]] = entry
    for name, entry in [*token_lms.items(), *study["variants"].items()]:
        if set(entry["llama"]) != fields:
            raise SystemExit(f"{path}: {name!r} must write out the same Llama fields as the others: {sorted(fields)}")
    for key in ("tokenizer", "training"):
        if key not in study:
            raise SystemExit(f"{path}: no {key!r} settings")
    token_list = [{"family": "token", "config": None, **v} for v in token_lms.values()]
    sllm_list = [{"family": "sllm", **v} for v in study["variants"].values()]
    order = [m for pair in zip(token_list, sllm_list) for m in pair]
    order += token_list[len(sllm_list) :] + sllm_list[len(token_list) :]
    if smoke:
        order = [m | {"llama": smoke_llama(m["llama"])} for m in order]
    return study | {"models": {m["name"]: m for m in order}}


def smoke_llama(llama: dict) -> dict:
    """A tiny version of a pinned Llama: width / 8 (head size 8), at most 2 layers."""
    hidden = llama["hidden_size"] // 8
    heads = max(1, hidden // 8)
    return llama | {"hidden_size": hidden, "intermediate_size": 8 * math.ceil(2.6875 * hidden / 8),
                    "num_hidden_layers": min(2, llama["num_hidden_layers"]), "num_attention_heads": heads,
                    "num_key_value_heads": heads, "head_dim": hidden // heads}  # fmt: skip


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def build_model(entry: dict, tokenizer):
    """The model a study entry pins, randomly initialised (seeded by the caller)."""
    if entry["family"] == "token":
        return build_scratch_token_lm(entry["llama"], tokenizer)
    model = build_scratch_sllm(entry["llama"], tokenizer, **entry["config"])
    differ = differing_fields(model.config, entry["config"])
    if differ:
        raise RuntimeError(f"{entry['name']}: build_scratch_sllm did not build the pinned config: {differ}")
    return model


# ------------------------------------------------------------------------------------------ tokenizer and data


def prepare(args) -> tuple[object, dict]:
    """(tokenizer, data rows {train, in_domain, out_of_domain}), built once and cached in --runs."""
    settings, training = args.study["tokenizer"], args.study["training"]
    lines = corpus_lines(TRAIN_TEXT)
    split = round(len(lines) * (1 - settings["held_out_share"]))
    train_lines, test_lines = lines[:split], lines[split:]
    vocab_size = settings["vocab_size"]
    if args.smoke:
        train_lines, test_lines = train_lines[: SMOKE["train_documents"]], test_lines[: SMOKE["test_documents"]]
        vocab_size = SMOKE["vocab_size"]
    meta = {"corpus": TRAIN_TEXT.name, "train_documents": len(train_lines), "test_documents": len(test_lines),
            "first_test_document": test_lines[0][:80], "vocab_size": vocab_size,
            "min_frequency": settings["min_frequency"], "block_size": training["block_size"],
            "out_of_domain": HELD_OUT_TEXT.name}  # fmt: skip
    folder, data_file = args.runs / "tokenizer", args.runs / "data.pt"
    args.runs.mkdir(parents=True, exist_ok=True)
    if (folder / "study_meta.json").exists() and json.loads((folder / "study_meta.json").read_text()) == meta:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        started = time.perf_counter()
        tokenizer = train_bpe_tokenizer(train_lines, vocab_size=vocab_size, min_frequency=settings["min_frequency"])
        tokenizer.save_pretrained(folder)
        (folder / "study_meta.json").write_text(json.dumps(meta, indent=2))
        print(f"trained the tokenizer ({vocab_size} tokens) in {time.perf_counter() - started:.0f} s -> {folder}")
        data_file.unlink(missing_ok=True)
    if data_file.exists():
        data = torch.load(data_file)
        if data.get("meta") == meta:
            return tokenizer, data
    block = training["block_size"]
    data = {
        "meta": meta,
        "train": pack(tokenizer, train_lines, block),
        "in_domain": pack(tokenizer, test_lines, block),
        "out_of_domain": pack(tokenizer, corpus_lines(HELD_OUT_TEXT), block),
    }
    torch.save(data, data_file)
    print(", ".join(f"{k}: {tuple(v.shape)} rows x tokens" for k, v in data.items() if k != "meta"))
    return tokenizer, data


# --------------------------------------------------------------------------------------------------- training


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.LongTensor):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


class SLLMBatch:
    """Rows as an SLLM reads them: every token scored."""

    def __call__(self, features):
        ids = torch.stack([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TokenLMBatch:
    """Rows as a token LM reads them, as `same_tokens_perplexity` scores it: bos + row + eos, every text
    token and the eos predicted (the bos is no target)."""

    def __init__(self, bos: int, eos: int):
        self.bos, self.eos = bos, eos

    def __call__(self, features):
        rows = torch.stack([f["input_ids"] for f in features])
        column = rows.new_ones(len(rows), 1)
        ids = torch.cat([column * self.bos, rows, column * self.eos], 1)
        labels = ids.clone()
        labels[:, 0] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def lr_share(progress: float, warmup: float, final: float) -> float:
    """The learning rate's share of its peak at `progress` (share of the time budget spent): linear warm-up
    over `warmup`, then cosine decay to `final`."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    decay = min(1.0, (progress - warmup) / (1 - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * decay))


class Budget(TrainerCallback):
    """Ends training after `minutes` of training time and evaluates `evals` times on the way (and at the start).

    Training time is the wall-clock time between the ends of consecutive steps (forward, backward, optimizer,
    data loading, logging), without the evaluations it runs and the checkpoint saves it asks for after each
    (a checkpoint per evaluation, so an interrupted run resumes with its time and curve, kept in BUDGET_FILE).
    """

    def __init__(self, minutes: float, evals: int, evaluate, device: str):
        self.seconds, self.evals, self.evaluate, self.cuda = 60 * minutes, evals, evaluate, device == "cuda"
        self.record = {"budget_seconds": self.seconds, "train_seconds": 0.0, "curve": []}
        self.mark = None

    def resume(self, checkpoint: str | None) -> None:
        """Go on from a checkpoint's training time and curve (the same budget only)."""
        if checkpoint is None:
            return
        if not (Path(checkpoint) / BUDGET_FILE).exists():
            raise SystemExit(f"{checkpoint} has no {BUDGET_FILE}: delete its folder to start the model over")
        record = json.loads((Path(checkpoint) / BUDGET_FILE).read_text())
        if record["budget_seconds"] != self.seconds:
            raise SystemExit(f"{checkpoint} is a run of {record['budget_seconds'] / 60:g} minutes, not "
                             f"{self.seconds / 60:g}: pass that --minutes, or another --runs")  # fmt: skip
        self.record = record

    def progress(self) -> float:
        return min(1.0, self.record["train_seconds"] / self.seconds)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.record["curve"]:
            self.point(model, state)
        self.mark = self.now()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.record["train_seconds"] += self.now() - self.mark
        due = len(self.record["curve"]) * self.seconds / self.evals
        if self.record["train_seconds"] >= self.seconds:
            control.should_training_stop = True
            self.point(model, state)
        elif self.record["train_seconds"] >= due:
            self.point(model, state)
            control.should_save = True
        self.mark = self.now()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / BUDGET_FILE).write_text(json.dumps(self.record))
        self.mark = self.now()

    def point(self, model, state) -> None:
        point = {"train_minutes": self.record["train_seconds"] / 60, "step": state.global_step, **self.evaluate(model)}
        self.record["curve"].append(point)
        print(json.dumps({"eval": point}), flush=True)


class TimeScheduled:
    """A Trainer whose learning rate follows the share of the time budget spent (`Budget.progress`), since the
    number of steps a budget allows is not known in advance."""

    budget: Budget
    lr_settings: tuple[float, float]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            warmup, final = self.lr_settings
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                         lambda _: lr_share(self.budget.progress(), warmup, final))  # fmt: skip
        return self.lr_scheduler


class SLLMStudyTrainer(TimeScheduled, SLLMTrainer):
    pass


class TokenLMStudyTrainer(TimeScheduled, Trainer):
    pass


def autocast_dtype(device: str):
    return torch.bfloat16 if device == "cuda" else None


def train_one(args) -> None:
    """Train one model of the study for the budget (resuming if interrupted); write its model and result.json."""
    entry = args.study["models"][args.variant]
    run_dir = args.runs / slug(args.variant)
    if (run_dir / RESULT_FILE).exists():
        print(f"{args.variant}: trained ({run_dir / RESULT_FILE})")
        return
    torch.set_num_threads(args.threads)
    tokenizer, data = prepare(args)
    training = args.study["training"]
    torch.manual_seed(training["seed"])
    model = build_model(entry, tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    curve_rows = data["in_domain"][: args.curve_rows].tolist()
    family_tokens = (None, None) if entry["family"] == "sllm" else (bos, eos)
    dtype = autocast_dtype(args.device)

    def evaluate(m) -> dict:
        scored = same_tokens_perplexity(m, curve_rows, 8, *family_tokens, autocast_dtype=dtype)
        return {"in_domain": scored["perplexity"]}

    budget = Budget(args.minutes, training["evals"], evaluate, args.device)
    trainer_dir = run_dir / "trainer"
    targs = TrainingArguments(
        output_dir=str(trainer_dir), per_device_train_batch_size=training["batch_size"],
        learning_rate=training["learning_rate"], weight_decay=training["weight_decay"],
        adam_beta1=training["adam_beta1"], adam_beta2=training["adam_beta2"], max_grad_norm=training["max_grad_norm"],
        max_steps=10**7, save_strategy="no", save_total_limit=1, logging_strategy="steps", logging_steps=25,
        report_to="none", use_cpu=args.device == "cpu", bf16=args.device == "cuda", seed=training["seed"],
        data_seed=training["seed"], dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer_class, collator = (
        (SLLMStudyTrainer, SLLMBatch()) if entry["family"] == "sllm" else (TokenLMStudyTrainer, TokenLMBatch(bos, eos))
    )
    trainer = trainer_class(model=model, args=targs, train_dataset=Rows(data["train"]), data_collator=collator,
                            callbacks=[budget])  # fmt: skip
    trainer.budget, trainer.lr_settings = budget, (training["warmup_share"], training["final_lr_share"])
    checkpoint = last_complete_checkpoint(trainer_dir)
    budget.resume(checkpoint)
    if checkpoint:
        print(f"{args.variant}: resuming from {checkpoint} at {budget.record['train_seconds'] / 60:.2f} minutes")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    model = trainer.model.eval()
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    steps = result.global_step
    record = {
        "name": args.variant, "family": entry["family"], "llama": entry["llama"], "config": entry["config"],
        "steps": steps, "train_minutes": budget.record["train_seconds"] / 60,
        "train_text_tokens": steps * training["batch_size"] * training["block_size"],
        "wall_minutes_this_session": (time.perf_counter() - started) / 60, "curve": budget.record["curve"],
        "device": args.device, "threads": args.threads, "budget_minutes": args.minutes, "smoke": args.smoke,
    }  # fmt: skip
    (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(trainer_dir, ignore_errors=True)  # the optimizer states: the trained model is kept
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}))


def passed_options(args) -> list[str]:
    options = ["--runs", str(args.runs), "--minutes", str(args.minutes), "--device", args.device,
               "--threads", str(args.threads), "--variants-file", str(args.variants_file),
               "--eval-rows", str(args.eval_rows), "--curve-rows", str(args.curve_rows)]  # fmt: skip
    return options + (["--smoke"] if args.smoke else [])


def train_all(args) -> None:
    """Every model not yet trained, --parallel at a time, each in its own process (log: its run folder)."""
    prepare(args)  # the tokenizer and the rows, once, before the processes that read them
    pending = [name for name in args.study["models"] if not (args.runs / slug(name) / RESULT_FILE).exists()]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    running, failed = {}, []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            run_dir = args.runs / slug(name)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir / "train.log").open("a")
            command = [sys.executable, str(Path(__file__).resolve()), "train", "--variant", name, *passed_options(args)]
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
            print(f"training {name!r} -> {run_dir / 'train.log'}", flush=True)
        time.sleep(1)
        for name, (process, log, started) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                print(f"{name!r}: {status} after {(time.time() - started) / 60:.1f} min", flush=True)
                if process.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"training failed for {failed}: see their train.log in {args.runs}")


# ------------------------------------------------------------------------------------------------ measurement


def parameters(model) -> dict:
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "non_embedding": total - embedding}


def generate_kwargs(new_tokens: int, pad_id: int, forced: bool = True) -> dict:
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens if forced else None, "do_sample": False,
            "pad_token_id": pad_id}  # fmt: skip


def generation_runs(models: dict, prompts: torch.LongTensor, new_tokens: int, pad_id: int, device: str) -> dict:
    """{name: a call that generates `new_tokens` per row after `prompts` [B, P] (greedy, eos held off)}."""
    inputs = {"input_ids": prompts.to(device), "attention_mask": torch.ones_like(prompts).to(device)}
    kwargs = generate_kwargs(new_tokens, pad_id)
    dtype = autocast_dtype(device)

    def run(model):
        def call():
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                out = model.generate(**inputs, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    return {name: run(model) for name, model in models.items()}


@torch.no_grad()
def peak_cache_bytes(model, family: str, prompts: torch.LongTensor, new_tokens: int, pad_id: int, device: str):
    """(peak bytes of every cache while generating, the new tokens [B, N]): the SLLM's own count (sentence
    cache and decoder cache), a token LM's KV cache at the end (it only grows)."""
    dtype = autocast_dtype(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out = model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                             return_dict_in_generate=True, **generate_kwargs(new_tokens, pad_id))  # fmt: skip
    peak = out.peak_cache_bytes if family == "sllm" else cache_nbytes(out.cache)
    return int(peak), out.sequences[:, prompts.shape[1] :].cpu()


@torch.no_grad()
def natural_length(model, prompt: torch.LongTensor, new_tokens: int, pad_id: int, eos: int, device: str) -> int:
    """New tokens a model writes after one prompt [1, P] when nothing holds eos off (at most `new_tokens`)."""
    dtype = autocast_dtype(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out = model.generate(input_ids=prompt.to(device), attention_mask=torch.ones_like(prompt).to(device),
                             **generate_kwargs(new_tokens, pad_id, forced=False))  # fmt: skip
    new = out[0, prompt.shape[1] :].cpu()
    ends = (new == eos).nonzero()
    return int(ends[0, 0]) + 1 if len(ends) else int((new != pad_id).sum())


def speed_summary(seconds: list[float], tokens: int) -> dict:
    """Tokens/s of repeated timings (`spread`), under this study's field names, with the seconds kept."""
    rates = spread([tokens / s for s in seconds])
    return {"tok_s": rates["median"], "tok_s_min": rates["min"], "tok_s_max": rates["max"], "seconds": seconds}


def overhead(tokenizer, prompts: torch.LongTensor, new_tokens: int, pad_id: int, device: str, repeats: int) -> dict:
    """generate's seconds per new token, batch 1, of a 1-layer width-8 model of each family: the per-step
    Python and framework cost that no model size removes."""
    tiny = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    torch.manual_seed(0)
    models = {"token": build_scratch_token_lm(tiny, tokenizer).eval().to(device),
              "sllm": build_scratch_sllm(tiny, tokenizer, sentence_dropout=0.0).eval().to(device)}  # fmt: skip
    seconds = time_alternately(generation_runs(models, prompts, new_tokens, pad_id, device), repeats)
    return {family: statistics.median(s) / new_tokens for family, s in seconds.items()}


def report(args) -> None:
    """Measure every trained model (one process, --threads threads) and write the results."""
    torch.set_num_threads(args.threads)
    tokenizer, data = prepare(args)
    pad_id, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    device, dtype = args.device, autocast_dtype(args.device)
    trained = {name: args.runs / slug(name) for name in args.study["models"]}
    trained = {name: folder for name, folder in trained.items() if (folder / RESULT_FILE).exists()}
    if not trained:
        raise SystemExit(f"no trained model in {args.runs}: run `train` or `run` first")
    records, models = {}, {}
    for name, folder in trained.items():
        record = json.loads((folder / RESULT_FILE).read_text())
        entry = args.study["models"][name]
        if record["llama"] != entry["llama"] or record["config"] != entry["config"]:
            raise SystemExit(f"{folder}: trained with another configuration than {args.variants_file} pins for "
                             f"{name!r}: retrain it (delete the folder) or use another --runs")  # fmt: skip
        loader = SLLMForCausalLM if record["family"] == "sllm" else LlamaForCausalLM
        models[name] = loader.from_pretrained(folder / "model").eval().to(device)
        records[name] = record
    # out of domain: python-docs' last rows, texts not in this repository (examples/data ships its start)
    in_rows, out_rows = data["in_domain"][: args.eval_rows], data["out_of_domain"][-args.eval_rows :]
    new_tokens = args.new_tokens
    batch = max(BATCHES)
    short = data["in_domain"][:batch, : args.prompt_tokens]
    rows_per_prompt = math.ceil(args.long_prompt_tokens / data["in_domain"].shape[1])
    if len(data["in_domain"]) < batch * rows_per_prompt:
        raise SystemExit(f"the in-domain test split is too short for {batch} prompts of {args.long_prompt_tokens} tokens")
    long = data["in_domain"][: batch * rows_per_prompt].reshape(batch, -1)[:, : args.long_prompt_tokens]
    settings = {f"batch {b}{label}": prompts[:b] for label, prompts in (("", short), (", long prompt", long))
                for b in BATCHES}  # fmt: skip

    variants_file = args.variants_file.resolve()
    variants_file = variants_file.relative_to(REPO) if variants_file.is_relative_to(REPO) else variants_file
    results = {"models": {}, "settings": {"new_tokens": new_tokens, "prompt_tokens": args.prompt_tokens,
               "long_prompt_tokens": args.long_prompt_tokens, "eval_rows": len(in_rows), "ood_rows": len(out_rows),
               "ood_rows_from": "the end of python-docs (not in this repository)",
               "block_size": data["in_domain"].shape[1], "repeats": args.repeats, "device": device,
               "threads": args.threads, "vocab_size": len(tokenizer), "data": data["meta"], "smoke": args.smoke,
               "variants_file": str(variants_file)}}  # fmt: skip
    for name, model in models.items():
        record, family = records[name], records[name]["family"]
        tokens = (None, None) if family == "sllm" else (bos, eos)
        started = time.perf_counter()
        quality = {split: same_tokens_perplexity(model, rows.tolist(), 8, *tokens, autocast_dtype=dtype)
                   for split, rows in (("in_domain", in_rows), ("out_of_domain", out_rows))}  # fmt: skip
        entry = {key: record[key] for key in ("family", "llama", "config", "steps", "train_minutes",
                                               "train_text_tokens", "curve")}  # fmt: skip
        entry |= {"parameters": parameters(model), "perplexity": {k: v["perplexity"] for k, v in quality.items()},
                  "scored_text_tokens": {k: v["tokens"] for k, v in quality.items()}}  # fmt: skip
        per_sentence = tokens_per_sentence(model, in_rows) if family == "sllm" else None
        entry["tokens_per_sentence"] = per_sentence
        for label, prompt_len in (("short", args.prompt_tokens), ("long", args.long_prompt_tokens)):
            context = prompt_len + new_tokens / 2
            macs = multiply_adds_per_token(model.config, context, per_sentence)
            entry[f"multiply_adds_per_token_{label}"] = {"context": context, **macs}
        entry["natural_new_tokens"] = natural_length(model, short[:1], new_tokens, pad_id, eos, device)
        entry["peak_cache_bytes"], written = {}, None
        for setting, prompts in settings.items():
            peak, new = peak_cache_bytes(model, family, prompts, new_tokens, pad_id, device)
            entry["peak_cache_bytes"][setting] = peak
            written_count = int((new != pad_id).sum())  # every model must write new_tokens per row
            entry.setdefault("new_tokens_written", {})[setting] = written_count
            if written_count != len(prompts) * new_tokens:
                print(f"WARNING {name}, {setting}: wrote {written_count} new tokens, not {len(prompts) * new_tokens}")
            written = new if written is None else written
        if family == "sllm":  # sentences it wrote after the first prompt, as it segments them
            entry["generated_tokens_per_sentence"] = tokens_per_sentence(model, written[:1])
        entry["sample"] = tokenizer.decode(written[0])
        seconds = time.perf_counter() - started
        print(f"{name}: perplexity {entry['perplexity']}, measured in {seconds:.0f} s", flush=True)
        results["models"][name] = entry
    for setting, prompts in settings.items():
        started = time.perf_counter()
        seconds = time_alternately(generation_runs(models, prompts, new_tokens, pad_id, device), args.repeats)
        for name, s in seconds.items():
            results["models"][name].setdefault("speed", {})[setting] = speed_summary(s, len(prompts) * new_tokens)
        print(f"speed, {setting}: {time.perf_counter() - started:.0f} s", flush=True)
    results["overhead_seconds_per_token"] = overhead(tokenizer, short[:1], new_tokens, pad_id, device, args.repeats)
    for entry in results["models"].values():
        seconds_per_token = 1 / entry["speed"]["batch 1"]["tok_s"]
        entry["overhead_share_batch1"] = results["overhead_seconds_per_token"][entry["family"]] / seconds_per_token
    results["pairs"] = equal_perplexity_pairs(results["models"])
    write_report(results, args.output_dir)


def equal_perplexity_pairs(models: dict) -> list[dict]:
    """Each SLLM beside the token LM whose in-domain perplexity is nearest its own: the perplexity ratios
    (SLLM / token LM; `equal` within PAIR_TOLERANCE) and the SLLM's speed over the token LM's in every setting,
    median and min-max of the per-repeat ratios (the repeats took turns, so each ratio is of one moment)."""
    token_lms = {n: m for n, m in models.items() if m["family"] == "token"}
    pairs = []
    for name, sllm in models.items():
        if sllm["family"] != "sllm" or not token_lms:
            continue
        peer = min(token_lms, key=lambda n: abs(math.log(token_lms[n]["perplexity"]["in_domain"]
                                                          / sllm["perplexity"]["in_domain"])))  # fmt: skip
        token = token_lms[peer]
        ratio = {split: sllm["perplexity"][split] / token["perplexity"][split] for split in sllm["perplexity"]}
        speed = {}
        for setting, timed in sllm["speed"].items():
            speed[setting] = spread([t / s for t, s in zip(token["speed"][setting]["seconds"], timed["seconds"])])
        pairs.append({"sllm": name, "token_lm": peer, "perplexity_ratio": ratio,
                      "equal": abs(ratio["in_domain"] - 1) <= PAIR_TOLERANCE, "speed_ratio": speed})  # fmt: skip
    return pairs


def speed_cell(summary: dict, key: str = "tok_s", low: str = "tok_s_min", high: str = "tok_s_max", form="{:.0f}"):
    """'median (min-max)' of a speed or ratio summary."""
    return f"{form.format(summary[key])} ({form.format(summary[low])}-{form.format(summary[high])})"


def write_report(results: dict, output_dir: Path) -> None:
    """scratch.json, scratch.md (the tables) and scratch.png (the frontiers and the training curves)."""
    s, models = results["settings"], results["models"]
    over = results["overhead_seconds_per_token"]
    settings = list(next(iter(models.values()))["speed"])
    short_names = [k.replace("batch ", "b").replace(", long prompt", ", long") for k in settings]
    table = [
        f"Trained from scratch for the same budget on linux-docs (BPE {s['vocab_size']} tokens), "
        f"{s['device']}, {s['threads']} thread(s). Perplexity per text token on {s['eval_rows']} x {s['block_size']}"
        f"-token rows: in domain (the last 5% of linux-docs), out of domain (python-docs: its last rows, not in this "
        f"repository). Generation: greedy, "
        f"{s['new_tokens']} new tokens per row for every model, after {s['prompt_tokens']}- and "
        f"{s['long_prompt_tokens']}-token ('long') prompts, median of {s['repeats']} interleaved repeats (min-max). "
        f"Multiply-adds per generated token at a {s['prompt_tokens'] + s['new_tokens'] / 2:.0f}-token context "
        f"(output projection's share). Per-token overhead of generate (1-layer width-8 model): token LM "
        f"{1000 * over['token']:.2f} ms, SLLM {1000 * over['sllm']:.2f} ms; 'overhead' = its share of the model's "
        f"batch-1 time per token.",
        "",
        "| model | params (non-emb.) | steps | train tokens | MACs/token (proj.) | tokens/sentence | ppl in | ppl out "
        f"| peak cache b1 / b1 long / {short_names[-1]} (KB) | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        macs, peak = m["multiply_adds_per_token_short"], m["peak_cache_bytes"]
        table.append(
            f"| {name} | {m['parameters']['total'] / 1e6:.2f}M ({m['parameters']['non_embedding'] / 1e6:.2f}M) "
            f"| {m['steps']} | {m['train_text_tokens'] / 1e6:.2f}M | {macs['total'] / 1e6:.2f}M "
            f"({macs['output_projection_share']:.0%}) "
            f"| {'-' if m['tokens_per_sentence'] is None else format(m['tokens_per_sentence'], '.1f')} "
            f"| {m['perplexity']['in_domain']:.1f} | {m['perplexity']['out_of_domain']:.1f} "
            f"| {peak['batch 1'] / 1024:.0f} / {peak['batch 1, long prompt'] / 1024:.0f} / {peak[settings[-1]] / 1024:.0f}"
            f" | {m['overhead_share_batch1']:.0%} |"
        )  # fmt: skip
    table += ["", "Generation tokens/s:", "", "| model | " + " | ".join(short_names) + " |",
              "|---|" + "---|" * len(settings)]  # fmt: skip
    table += [f"| {name} | " + " | ".join(speed_cell(m["speed"][k]) for k in settings) + " |" for name, m in models.items()]
    if results["pairs"]:
        table += ["", f"Each SLLM beside the token LM nearest its in-domain perplexity (a pair within "
                  f"{PAIR_TOLERANCE:.0%}): perplexity ratio and speed ratio (SLLM / token LM; median and min-max "
                  f"of the per-repeat ratios).", "",
                  "| SLLM | token LM | ppl in | ppl out | pair | " + " | ".join(short_names) + " |",
                  "|---|---|---|---|---|" + "---|" * len(settings)]  # fmt: skip
        for pair in results["pairs"]:
            ratio, speed = pair["perplexity_ratio"], pair["speed_ratio"]
            cells = [speed_cell(speed[k], "median", "min", "max", "{:.2f}") for k in settings]
            table.append(f"| {pair['sllm']} | {pair['token_lm']} | {ratio['in_domain']:.2f}x "
                         f"| {ratio['out_of_domain']:.2f}x | {'yes' if pair['equal'] else 'no'} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    fig, axes = plt.subplots(1, len(FRONTIERS) + 1, figsize=(16, 4.5))
    fig.suptitle("From scratch, equal training time: held-out perplexity (linux-docs test split)")
    colours = {"token": "tab:blue", "sllm": "tab:orange"}
    labels = {"token": "token-level Llama", "sllm": "SLLM"}
    largest = max(m["parameters"]["total"] for m in models.values())
    for family, colour in colours.items():
        members = {n: m for n, m in models.items() if m["family"] == family}
        for ax, regime in zip(axes, FRONTIERS):
            if not members:
                continue
            points = [(m["speed"][regime]["tok_s"], m["perplexity"]["in_domain"]) for m in members.values()]
            ax.scatter(*zip(*points), color=colour, label=labels[family])
            ax.plot(*zip(*pareto_front(points)), "-", color=colour, alpha=0.6)
            for n, point in zip(members, points):
                ax.annotate(n, point, fontsize=6)
        for n, m in members.items():
            trained = [p for p in m["curve"] if p["train_minutes"] > 0] or m["curve"]
            axes[-1].plot([p["train_minutes"] for p in trained], [p["in_domain"] for p in trained], "o-",
                          color=colour, alpha=0.4 + 0.6 * m["parameters"]["total"] / largest, label=n)  # fmt: skip
    for ax, regime in zip(axes, FRONTIERS):
        ax.set_xlabel(f"generation tokens/s, {regime} (greedy)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[-1].set_xlabel("training minutes")
    axes[-1].set_yscale("log")
    for ax in axes:
        ax.set_ylabel("perplexity per text token")
        ax.legend(fontsize=6)
    save_results(output_dir, "scratch", results, table, fig)
    print("\n".join(table))
    print(f"-> {output_dir}")


# ----------------------------------------------------------------------------------------------------- export


def export(args) -> None:
    """Each trained model as a checkpoint folder under --to: bf16 safetensors, its tokenizer, a model card
    (an SLLM's from `build_model_card`, remote code included; a token LM's a plain Llama folder)."""
    from huggingface_hub import ModelCard, ModelCardData

    from modeling_sllm.hub import build_model_card

    results_file = args.output_dir / "scratch.json"
    measured = json.loads(results_file.read_text())["models"] if results_file.exists() else {}
    together = " ".join(f'"{name}"' for name in args.study["models"])  # trained side by side
    for name, entry in args.study["models"].items():
        folder = args.runs / slug(name)
        if not (folder / RESULT_FILE).exists():
            raise SystemExit(f"{name!r} is not trained in {args.runs}")
        record = json.loads((folder / RESULT_FILE).read_text())
        loader = SLLMForCausalLM if entry["family"] == "sllm" else LlamaForCausalLM
        model = loader.from_pretrained(folder / "model").to(torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "model")
        target = args.to / f"scratch-{slug(name)}"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        figures = measured.get(name, {})
        metrics = {f"perplexity_{split}": value for split, value in figures.get("perplexity", {}).items()}
        metrics |= {f"tok_s_{setting.replace(', ', '_').replace(' ', '')}": speed["tok_s"]
                    for setting, speed in figures.get("speed", {}).items()}  # fmt: skip
        training = {"data": "linux-docs (the last 5% of documents held out)", "from_scratch": True,
                    "train_minutes": round(record["train_minutes"], 2), "steps": record["steps"],
                    "train_text_tokens": record["train_text_tokens"], "device": record["device"],
                    "command": f"python benchmarks/from_scratch_study.py run --models {together} "
                               f"--minutes {record['budget_minutes']:g} --runs RUNS"}  # fmt: skip
        if entry["family"] == "sllm":
            card = build_model_card(model, base_model=None, metrics=metrics, training=training)
        else:
            card = ModelCard.from_template(
                ModelCardData(library_name="transformers", pipeline_tag="text-generation", license="apache-2.0"),
                model_id=f"scratch-{slug(name)}",
                model_summary=f"{name}: a Llama trained from scratch, the token-level peer of the SLLM of the same "
                f"study (benchmarks/from_scratch_study.py). Training: {json.dumps(training)}. Measured: "
                f"{json.dumps(metrics)}. Plain Llama weights: AutoModelForCausalLM.from_pretrained(folder).",
            )
        card.save(target / "README.md")
    families = {entry["family"]: name for name, entry in args.study["models"].items()}
    if len(args.study["models"]) == 2 and set(families) == {"sllm", "token"}:  # the pair the others read
        pair = {"about": "The equal-perplexity pair shipped here (docs/study-scratch.md), named once: written by "
                "`python benchmarks/from_scratch_study.py export` when it exports one SLLM and one token LM; read by the "
                "quickstart, the benchmarks and the tests.",
                **{key: {"folder": f"scratch-{slug(families[family])}", "variant": families[family]}
                   for key, family in (("sllm", "sllm"), ("token_lm", "token"))}}  # fmt: skip
        (args.to / "shipped_pair.json").write_text(json.dumps(pair, indent=2) + "\n")
        size = sum(p.stat().st_size for p in target.iterdir()) / 2**20
        print(f"{name} -> {target} ({size:.1f} MiB)")


# ------------------------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> None:
    pre, variants_file = variants_file_option(
        DEFAULT_VARIANTS_FILE, "the pinned models, tokenizer and training settings (JSON)"
    )
    smoke = "--smoke" in (argv if argv is not None else sys.argv[1:])
    study = read_study(variants_file, smoke)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[pre])  # fmt: skip
    parser.add_argument("command", choices=["run", "train", "report", "list", "export"])
    parser.add_argument("--models", nargs="+", choices=list(study["models"]), default=None,
                        help="run, report, export: only these models (default: all)")
    parser.add_argument("--to", type=Path, default=REPO / "checkpoints",
                        help="export: the folder the trained models are written to (bf16, with tokenizer and card)")
    parser.add_argument("--variant", choices=list(study["models"]), help="train: the model to train")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 20 s each, short measurements")
    parser.add_argument("--runs", type=Path, default=None,
                        help=f"checkpoints, logs, models (outside the repo; default {DEFAULT_RUNS})")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per model (default 6)")
    parser.add_argument("--parallel", type=int, default=2, help="run: models trained side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (training and report)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out rows per split (default 256)")
    parser.add_argument("--curve-rows", type=int, default=None, help="in-domain rows of the curve (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens each model writes per row (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="short prompts (default 64)")
    parser.add_argument("--long-prompt-tokens", type=int, default=None, help="long prompts (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per speed measurement")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="results (default benchmarks/results/scratch; with --smoke: RUNS/results)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.models:
        study["models"] = {name: m for name, m in study["models"].items() if name in args.models}
    args.study, args.variants_file = study, variants_file
    defaults = {"minutes": 6.0, "eval_rows": 256, "curve_rows": 64, "new_tokens": 128, "prompt_tokens": 64,
                "long_prompt_tokens": 1024}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, SMOKE[name] if smoke and name in SMOKE else value)
    args.runs = (args.runs or (SMOKE_RUNS if smoke else DEFAULT_RUNS)).resolve()
    if args.runs.is_relative_to(REPO):
        raise SystemExit(f"--runs {args.runs} is inside the repository: checkpoints belong outside it")
    if args.output_dir is None:
        args.output_dir = args.runs / "results" if smoke else REPO / "benchmarks" / "results" / "scratch"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    if args.command == "list":
        print("\n".join(f"{m['family']}\t{name}" for name, m in study["models"].items()))
    elif args.command == "train":
        if args.variant is None:
            raise SystemExit("train needs --variant (see `list`)")
        train_one(args)
    elif args.command == "report":
        report(args)
    elif args.command == "export":
        export(args)
    else:
        train_all(args)
        report(args)


if __name__ == "__main__":
    main()
