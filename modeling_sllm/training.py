"""Training of an SLLM with Trainer: Sentence-VAE reconstruction (stage 1), next-sentence LM (stage 2), or both.

The library side of `examples/train_sllm.py` (whose command line is `main`), also used by the
quickstart and the benchmarks. Not part of the remote code: saved checkpoints do not carry it. It has no
default data: the scripts that have one (the repository's corpora) pass it as --train_file/--eval_file.
"""

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    PreTrainedConfig,
    PreTrainedModel,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState

from .configuration_sllm import SLLMConfig
from .loading import SENTENCE_MODULES, checkpoint_folder, load_base_model, load_sllm, load_tokenizer
from .modeling_sllm import SLLMForCausalLM
from .from_scratch import build_scratch_sllm, scratch_llama_config
from .tokenizer_training import train_bpe_tokenizer
from .training_options import (
    NOT_OPTIONS,
    OPTION_CHOICES,
    STAGES,
    SCRATCH_SIZE_OPTIONS,
    TRAINING_TIME_OPTIONS,
    DataArguments,
    ModelArguments,
    SLLMConfigArguments,
    SLLMTrainingArguments,
    Stage,
    config_docs,
    config_options,
    sllm_config_fields,
)
from .transformers_compat import load_checkpoint_weights

# Their old import path: the loaders and the options are defined in loading.py and training_options.py.
__all__ = ["SENTENCE_MODULES", "checkpoint_folder", "load_sllm", "main", "ModelArguments", "DataArguments",
           "SLLMTrainingArguments", "SLLMConfigArguments", "NOT_OPTIONS", "OPTION_CHOICES", "config_docs",
           "config_options", "sllm_config_fields"]  # fmt: skip

RUN_FILE = "sllm_run.json"
METRICS_FILE = "sllm_metrics.json"
# Options that change where a run writes, what it reports or which process this is, not what it trains:
# a resumed run may differ from the interrupted one in these.
# The budget (max_steps, max_minutes) is not compared either: a larger one extends a run.
NOT_COMPARED = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank", "disable_tqdm",
                "report_to", "run_name", "project", "push_to_hub", "max_steps", "max_minutes"}  # fmt: skip
NOT_COMPARED_PREFIXES = ("logging_", "log_", "trackio_", "hub_", "save_")


# The clock of the time budget (RunBudget, TimeBudgetBar): a module attribute, so tests can drive it.
clock = time.monotonic


class RunBudget(TrainerCallback, ExportableState):
    """A stage's clock across resumes: the seconds trained in every segment of the run (kept in each checkpoint's
    trainer_state.json, read back by `stage_progress`) and the segments so far. With `minutes`, it stops training
    once they are spent and saves that last step as a checkpoint, so a resume drops nothing trained."""

    def __init__(self, minutes: float | None = None, trained_seconds: float = 0.0, segments: int = 0):
        self.minutes, self.trained_seconds, self.segments = minutes, trained_seconds, segments
        self.segment_start: float | None = None

    def seconds(self) -> float:
        """Seconds trained so far, this segment included."""
        running = clock() - self.segment_start if self.segment_start is not None else 0.0
        return self.trained_seconds + running

    def state(self) -> dict:
        return {"args": {"minutes": self.minutes},
                "attributes": {"trained_seconds": self.seconds(), "segments": self.segments}}  # fmt: skip

    def on_train_begin(self, args, state, control, **kwargs):
        self.segment_start, self.segments = clock(), self.segments + 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes is not None and self.seconds() > 60 * self.minutes:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"

    def on_train_end(self, args, state, control, **kwargs):
        self.trained_seconds, self.segment_start = self.seconds(), None


class TimeBudgetBar(ProgressCallback):
    """Trainer's progress bar counted in seconds of the time budget (those trained before a resume included), for
    runs that a time limit ends (their max_steps, if any, is a ceiling they do not reach)."""

    def __init__(self, budget: RunBudget, description: str):
        super().__init__()
        self.budget, self.description = budget, description
        self.seconds = round(60 * budget.minutes)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=self.seconds, desc=self.description, dynamic_ncols=True,
                initial=min(round(self.budget.seconds()), self.seconds),
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s of the time budget{postfix}",
            )  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            elapsed = min(round(self.budget.seconds()), self.seconds)
            self.training_bar.update(elapsed - self.training_bar.n)
            self.training_bar.set_postfix(step=state.global_step)


class SLLMTrainer(Trainer):
    """Trainer that trains on the SLLM's text loss (`loss_over="text"`: the first token and the end of text
    scored too, which the causal loss leaves out), and whose evaluation reports the README's metrics (the text
    loss), summed exactly over the eval set, kept against training minutes (evaluation excluded) in
    `eval_history`."""

    def __init__(
        self,
        *args,
        backbone_learning_rate: float | None = None,
        objective: str | None = None,
        training_vocab: str | None = None,
        **kwargs,
    ):
        """`objective` and `training_vocab`: the training choices it passes to the model's forward (None: the
        model config's defaults); they are arguments of the training, not written into the saved config."""
        super().__init__(*args, **kwargs)
        self.backbone_learning_rate = backbone_learning_rate
        choices = {"objective": objective, "training_vocab": training_vocab}
        self.choices = {name: value for name, value in choices.items() if value is not None}
        self.eval_history: list[dict] = []
        self.train_started = self.eval_seconds = None

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the backbone's trained weights moved to groups of their own learning rate
        (fresh sentence modules want a much larger one than a pretrained backbone)."""
        optimizer = super().create_optimizer(model)
        if self.backbone_learning_rate is None:
            return optimizer
        names = {id(p): n for n, p in (model or self.model).named_parameters()}
        for group in list(optimizer.param_groups):
            backbone = [p for p in group["params"] if names[id(p)].startswith("llm.") or ".llm." in names[id(p)]]
            if backbone:
                moved = {id(p) for p in backbone}
                group["params"] = [p for p in group["params"] if id(p) not in moved]
                settings = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group(settings | {"params": backbone, "lr": self.backbone_learning_rate})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = inputs | {"loss_over": "text"} | self.choices
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        self.train_started, self.eval_seconds = time.perf_counter(), 0.0
        return super().train(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        eval_started = time.perf_counter()
        model = self.model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.args.device)  # nll, tokens, correct, targets, exact
        objective = self.choices.get("objective", self.accelerator.unwrap_model(model).config.objective)
        reconstruction = objective == "reconstruction"
        with torch.no_grad():
            for batch in self.get_eval_dataloader(eval_dataset):
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    out = model(**batch, return_logits=False, objective=objective)
                sums[0] += out.text_loss.double() * out.num_tokens
                sums[1] += out.num_tokens
                if reconstruction:
                    targets = out.num_tokens + out.num_sentences
                    sums[2] += out.token_accuracy.double() * targets
                    sums[3] += targets
                    sums[4] += out.exact_match.double() * out.num_sentences
        sums = self.accelerator.reduce(sums, reduction="sum")
        loss = (sums[0] / sums[1]).item()
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50))}
        if reconstruction:
            metrics[f"{metric_key_prefix}_token_accuracy"] = (sums[2] / sums[3]).item()
            metrics[f"{metric_key_prefix}_exact_match"] = (sums[4] / (sums[3] - sums[1])).item()
        self.log(dict(metrics))  # log() adds the epoch to the dict it gets
        if self.train_started is not None:
            minutes = (eval_started - self.train_started - self.eval_seconds) / 60
            self.eval_history.append({"step": self.state.global_step, "train_minutes": minutes, **metrics})
            self.eval_seconds += time.perf_counter() - eval_started
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        model.train()
        return metrics


def load_texts(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets with a `text` column; fails early with a clear message."""
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        if "train" not in raw:
            raise ValueError(f"the dataset {data_args.dataset_name!r} has no 'train' split; splits: {list(raw)}")
        held_out_split = next((name for name in ("validation", "test") if name in raw), None)
        train, held_out = raw["train"], raw[held_out_split] if held_out_split else None
    else:
        train_file, eval_file = data_args.train_file, data_args.eval_file
        if train_file is None:
            raise ValueError("no training data: pass --train_file (text files) or --dataset_name")
        files = {"train": train_file.split(",")} | ({"eval": eval_file.split(",")} if eval_file else {})
        raw = load_dataset("text", data_files=files, sample_by=data_args.sample_by)
        train, held_out = raw["train"], raw["eval"] if eval_file else None
    if held_out is None and len(train) > 1:  # no held-out split: hold out 10% of the training documents
        split = train.train_test_split(test_size=0.1, seed=0)
        train, held_out = split["train"], split["test"]
    for name, ds in (("training", train), ("evaluation", held_out)):
        if ds is None:
            continue
        if data_args.text_column not in ds.column_names:
            raise ValueError(
                f"the {name} data has no text column {data_args.text_column!r}; columns: {ds.column_names}"
            )
        if len(ds) == 0:
            raise ValueError(f"the {name} data is empty")
    return train, held_out


def tokenize(dataset: Dataset, tokenizer, data_args: DataArguments, limit: int | None) -> Dataset:
    """Documents -> rows of at most block_size tokens (long documents are chunked, nothing dropped)."""
    column = data_args.text_column

    def chunk(batch):
        rows = []
        for text in batch[column]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows += [ids[i : i + data_args.block_size] for i in range(0, len(ids), data_args.block_size)]
        return {"input_ids": rows}

    dataset = dataset.filter(lambda row: bool(row[column] and row[column].strip()))
    dataset = dataset.map(chunk, batched=True, remove_columns=dataset.column_names)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("no tokens left after tokenization: the data holds only empty documents")
    return dataset


def scratch_backbone_config(model_args: ModelArguments, tokenizer) -> PreTrainedConfig:
    """The config of a --base_config backbone: 'llama' sized by the size options (`scratch_llama_config`), or
    a causal LM's config with the size options over its values; the vocabulary and special ids are the
    tokenizer's."""
    sizes = {name: getattr(model_args, name) for name in SCRATCH_SIZE_OPTIONS if getattr(model_args, name) is not None}
    if model_args.base_config == "llama":
        missing = [f"--{name}" for name in ("hidden_size", "num_hidden_layers", "num_attention_heads")
                   if name not in sizes]  # fmt: skip
        if missing:
            raise ValueError(f"--base_config llama needs {', '.join(missing)}")
        return scratch_llama_config(sizes, tokenizer)
    config = AutoConfig.from_pretrained(model_args.base_config)
    if {"hidden_size", "num_attention_heads"} & set(sizes) and getattr(config, "head_dim", None):
        heads = sizes.get("num_attention_heads", config.num_attention_heads)
        sizes["head_dim"] = sizes.get("hidden_size", config.hidden_size) // heads
    for name, value in sizes.items():
        setattr(config, name, value)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def build_scratch_model(model_args: ModelArguments, train_texts: list[str]) -> tuple[SLLMForCausalLM, object, str]:
    """(SLLM model, tokenizer, name) for --base_config: the tokenizer (--tokenizer, else a byte-level BPE
    trained on `train_texts`), then an SLLM around a randomly initialised backbone (`build_scratch_sllm`)."""
    if model_args.tokenizer:
        tokenizer = load_tokenizer(model_args.tokenizer)
    else:
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size=model_args.tokenizer_vocab_size)
    text_config = scratch_backbone_config(model_args, tokenizer)
    model = build_scratch_sllm(text_config, tokenizer, **config_options(model_args))
    size = f"{text_config.hidden_size}x{text_config.num_hidden_layers}"
    return model, tokenizer, f"{model_args.base_config} {size} from scratch"


def build_model(
    model_args: ModelArguments, train_texts: list[str] | None = None
) -> tuple[SLLMForCausalLM, object, str]:
    """(SLLM model, tokenizer, base model name) from --init_from (`load_sllm`), from scratch (--base_config;
    its tokenizer is trained on `train_texts` unless --tokenizer is given) or by wrapping --base_model
    with the SLLMConfig options.

    The tokenizer gets a pad token (eos) before the model is built, so the saved generation config has it.
    An --init_from checkpoint keeps its modules' configuration: an option that defines them, given another
    value than both its default and the checkpoint's, stops the run; the options read at every training
    step (TRAINING_TIME_OPTIONS) are set on it."""
    options = config_options(model_args)
    if model_args.base_config:
        if train_texts is None and not model_args.tokenizer:
            raise ValueError("--base_config without --tokenizer trains one: build_model needs the training texts")
        return build_scratch_model(model_args, train_texts)
    if not model_args.init_from:
        llm, tokenizer, name = load_base_model(model_args.base_model)
        return SLLMForCausalLM.from_base_model(llm, tokenizer, **options), tokenizer, name
    model, tokenizer, name = load_sllm(model_args.init_from, model_args.base_model, model_args.allow_other_backbone)
    conflicts = [
        f"--{option} {value!r} (the checkpoint has {getattr(model.config, option)!r})"
        for option, value in options.items()
        if option not in TRAINING_TIME_OPTIONS
        and value != getattr(SLLMConfig, option)
        and value != getattr(model.config, option)
    ]
    if conflicts:
        raise ValueError(
            f"--init_from {model_args.init_from} keeps the configuration its modules were trained with: drop "
            f"{', '.join(conflicts)}"
        )
    changed = {option: options[option] for option in TRAINING_TIME_OPTIONS}
    SLLMConfig.from_dict(model.config.to_dict() | changed)  # checks the values as a new model's config would
    for option, value in changed.items():
        setattr(model.config, option, value)
    return model, tokenizer, name


def check_lora_target(model: SLLMForCausalLM, model_args: ModelArguments) -> None:
    """Before stage 1: stage 2's LoRA needs a --lora_target that names some of the model's modules."""
    if not any(re.fullmatch(model_args.lora_target, name) for name, _ in model.named_modules()):
        raise ValueError(f"--lora_target {model_args.lora_target!r} matches none of the model's module names")


def freeze_embedding_placeholders(model) -> None:
    """The sentence modules' own layer stacks read embeddings, not ids: their 1-token input-embedding
    placeholders never train, also in PEFT's trained copies of them (a shared decoder has no stack of its own)."""
    sllm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = {id(module) for module in sllm.llm.modules()}
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module is not sllm and id(module) not in backbone:
            module.get_input_embeddings().requires_grad_(False)


def stage_vocab(model_args: ModelArguments, objective: str) -> str:
    """A stage's training softmax: --stage1_vocab for reconstruction, --stage2_vocab for next_sentence."""
    return model_args.stage1_vocab if objective == "reconstruction" else model_args.stage2_vocab


def prepare_for_training(model: SLLMForCausalLM, model_args: ModelArguments, objective: str):
    """Set what trains for `objective`: the sentence modules always; the backbone per --backbone in stage 2,
    never in stage 1 (with --decoder_shares_backbone the decoder's layers are the backbone's, frozen there too).
    The objective and its softmax are the trainer's arguments (`stage_trainer`), not config fields."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(True)
    freeze_embedding_placeholders(model)
    if objective == "reconstruction" or model_args.backbone == "frozen":
        model.llm.requires_grad_(False)
        return model
    if model_args.backbone == "lora":
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=model_args.lora_target,
            modules_to_save=SENTENCE_MODULES,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        freeze_embedding_placeholders(model)  # PEFT's copies of the sentence modules train whole
    return model


def run_options(model_args: ModelArguments, data_args: DataArguments, training_args: SLLMTrainingArguments) -> dict:
    """The options that define a run, as JSON values: {option: value} (no tokens, nothing in NOT_COMPARED)."""
    options = asdict(model_args) | asdict(data_args) | training_args.to_dict()
    options = json.loads(json.dumps(options, default=str))
    return {
        name: value
        for name, value in sorted(options.items())
        if name not in NOT_COMPARED and not name.startswith(NOT_COMPARED_PREFIXES) and not name.endswith("_token")
    }


def differing_options(output_dir: Path, options: dict) -> list[str]:
    """The options in which the run recorded in output_dir (RUN_FILE) differs from `options`, as messages."""
    stored = json.loads((output_dir / RUN_FILE).read_text())
    return [f"--{name}: {stored.get(name)!r} there, {options.get(name)!r} now"
            for name in sorted(set(stored) | set(options)) if stored.get(name) != options.get(name)]  # fmt: skip


def prepare_output_dir(output_dir: Path, options: dict, training_args: SLLMTrainingArguments) -> None:
    """Start over (--overwrite_output_dir), or go on in an output_dir whose checkpoints come from a run
    with the same options (recorded in RUN_FILE); anything else stops with the differing options."""
    checkpoints = [*output_dir.glob("checkpoint-*"), *output_dir.glob("stage1-*/checkpoint-*")]
    record = output_dir / RUN_FILE
    if training_args.overwrite_output_dir:
        if training_args.process_index == 0:
            for folder in checkpoints:
                shutil.rmtree(folder)
    elif record.exists():
        if differing := differing_options(output_dir, options):
            raise ValueError(
                f"{output_dir} holds a run with other options ({'; '.join(differing)}): pass the same options "
                "to resume it, --overwrite_output_dir to start over, or another --output_dir"
            )
    elif checkpoints:
        raise ValueError(
            f"{output_dir} holds checkpoints but no record of their options ({RUN_FILE}): pass "
            "--overwrite_output_dir to start over, or another --output_dir"
        )
    if training_args.process_index == 0:  # written whole, then renamed: other processes never read half a file
        output_dir.mkdir(parents=True, exist_ok=True)
        partial = output_dir / f"{RUN_FILE}.partial"
        partial.write_text(json.dumps(options, indent=2))
        os.replace(partial, record)


def stage_trainer(
    stage: Stage, budget: RunBudget, model, tokenizer, model_args, training_args, train_ds, eval_ds
) -> SLLMTrainer:
    """An SLLMTrainer for one stage: the run's TrainingArguments with the stage's folder and budget."""
    args = training_args.to_dict() | {"output_dir": str(stage.output_dir)}
    args = {k: v for k, v in args.items() if k in TrainingArguments.__dataclass_fields__ and not k.startswith("_")}
    args |= {"max_steps": stage.max_steps, "push_to_hub": False, "remove_unused_columns": False}
    args.pop("push_to_hub_token", None)
    trainer = SLLMTrainer(
        model=prepare_for_training(model, model_args, stage.objective),
        args=TrainingArguments(**args),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,  # saved in every checkpoint
        callbacks=[budget],
        backbone_learning_rate=training_args.backbone_learning_rate,
        objective=stage.objective,
        training_vocab=stage_vocab(model_args, stage.objective),
    )
    if stage.max_minutes and not training_args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TimeBudgetBar(budget, stage.objective))
    return trainer


def stage_progress(checkpoint: str | None) -> dict | None:
    """What a checkpoint's trainer_state.json says of its stage: steps, the steps and minutes it was trained
    towards, and RunBudget's seconds trained and segments over every resume; None without a checkpoint."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    budget = state.get("stateful_callbacks", {}).get(RunBudget.__name__, {})
    return {"steps": state["global_step"], "planned_steps": state["max_steps"],
            "minutes": budget.get("args", {}).get("minutes"),
            "seconds": budget.get("attributes", {}).get("trained_seconds", 0.0),
            "segments": budget.get("attributes", {}).get("segments", 1)}  # fmt: skip


def reached(stage: Stage, steps: int, seconds: float, planned_steps: int) -> bool:
    """Whether a stage that trained `steps` steps in `seconds` has spent its budget: its max_steps, its minutes,
    or, with neither, the steps Trainer planned for its epochs."""
    if stage.max_steps > 0 or stage.max_minutes is not None:
        return (0 < stage.max_steps <= steps) or (stage.max_minutes is not None and seconds >= 60 * stage.max_minutes)
    return steps >= planned_steps


def run_stage(
    stage: Stage, model, tokenizer, model_args, training_args, train_ds, eval_ds, recorded: dict | None
) -> tuple:
    """Train one stage in its folder, resuming from its last checkpoint unless starting over, never past its
    budget (steps, or minutes counted over every resume); a stage whose checkpoint has spent it is not trained
    again (its weights are loaded, its `recorded` metrics kept). Returns (SLLM model, the stage's metrics)."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and not training_args.overwrite_output_dir:
        checkpoint = last_complete_checkpoint(stage.output_dir)
    progress = stage_progress(checkpoint)
    budget = RunBudget(stage.max_minutes, progress["seconds"], progress["segments"]) if progress else RunBudget(
        stage.max_minutes
    )
    trainer = stage_trainer(stage, budget, model, tokenizer, model_args, training_args, train_ds, eval_ds)
    if progress and reached(stage, progress["steps"], progress["seconds"], progress["planned_steps"]):
        print(f"{stage.objective} is done: {progress['steps']} steps, {progress['seconds'] / 60:.3g} training "
              f"minutes ({checkpoint})")  # fmt: skip
        load_checkpoint_weights(trainer, checkpoint)
        metrics = {"train_steps": progress["steps"], "train_minutes": progress["seconds"] / 60,
                   "resumed": progress["segments"] - 1, "planned_steps": progress["planned_steps"]}  # fmt: skip
        if recorded is not None and recorded.get("train_steps") == progress["steps"]:
            return model, recorded
    else:
        if progress:
            print(f"resuming {stage.objective} from {checkpoint}")
            grown = [f"--{name} {was} -> {now}" for name, was, now in (
                ("max_steps", progress["planned_steps"], stage.max_steps),
                ("max_minutes", progress["minutes"], stage.max_minutes)) if now is not None and was is not None and
                now > was]  # fmt: skip
            if grown:
                print(f"extending {stage.objective} ({', '.join(grown)}): the learning-rate schedule follows the "
                      "new budget")  # fmt: skip
        result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = {"train_loss": result.training_loss, "train_steps": result.global_step,
                   "train_minutes": budget.trained_seconds / 60, "resumed": budget.segments - 1,
                   "planned_steps": trainer.state.max_steps}  # fmt: skip
    if eval_ds is not None:
        metrics |= trainer.evaluate()
        metrics["eval_history"] = trainer.eval_history
    if model_args.backbone == "lora" and stage.objective == "next_sentence":
        trainer.model.save_pretrained(stage.output_dir / "adapter")
        model = trainer.model.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(stage.output_dir)
        tokenizer.save_pretrained(stage.output_dir)
    return model, metrics


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint whose save finished (trainer_state.json is written last), so a run
    killed while saving resumes from the one before."""
    complete = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def flat_metrics(metrics: dict) -> dict:
    """The final figures of every stage as {"stage/name": number} (the eval history left out)."""
    return {
        f"{stage}/{name}": value
        for stage, values in metrics["stages"].items()
        for name, value in values.items()
        if isinstance(value, (int, float))
    }


def push_trained(model, tokenizer, metrics: dict, model_args, data_args, training_args) -> None:
    """Upload the trained model with a model card filled from the run (--push_to_hub)."""
    from .hub import build_model_card, push_to_hub_with_card

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    training = {
        "stages": STAGES[training_args.stage],
        "data": data_args.dataset_name or data_args.train_file,
        "backbone": model_args.backbone,
        "steps": metrics["train_steps"],  # over every stage and resume
        "training minutes": round(metrics["train_minutes"], 2),
        "times resumed": metrics["resumed"],
    }
    card = build_model_card(model, metrics["base_model"], metrics=flat_metrics(metrics), training=training,
                            repo_id=repo_id)  # fmt: skip
    url = push_to_hub_with_card(model, repo_id, card, token=training_args.hub_token,
                                private=training_args.hub_private_repo, tokenizer=tokenizer)  # fmt: skip
    print(f"pushed to {url}")


def main(argv: list[str] | None = None) -> dict:
    """The training script: parse the options (argv, else the command line), check everything the stages
    need, run them, write sllm_metrics.json; returns the metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, SLLMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    output_dir = Path(training_args.output_dir)
    options = run_options(model_args, data_args, training_args)
    recorded = recorded_metrics(output_dir, options, training_args)
    if finished(recorded, training_args):
        steps, minutes = (sum(stage[name] for stage in recorded["stages"].values()) for name in ("train_steps",
                          "train_minutes"))  # fmt: skip
        print(f"the run in {output_dir} is complete ({steps} steps, {minutes:.3g} training minutes): its model "
              f"and {METRICS_FILE} are there")  # fmt: skip
        end_process_group()
        return recorded
    train_texts, eval_texts = load_texts(data_args)  # data errors surface before any model is loaded
    model, tokenizer, base_name = build_model(model_args, train_texts[data_args.text_column])
    if model_args.backbone == "lora" and "next_sentence" in STAGES[training_args.stage]:
        check_lora_target(model, model_args)
    train_ds = tokenize(train_texts, tokenizer, data_args, data_args.max_train_samples)
    eval_ds = tokenize(eval_texts, tokenizer, data_args, data_args.max_eval_samples) if eval_texts else None
    output_dir = Path(training_args.output_dir)
    prepare_output_dir(output_dir, options, training_args)

    metrics = {"base_model": base_name, "stages": {}}
    for stage in training_args.stages():
        model, metrics["stages"][stage.objective] = run_stage(
            stage, model, tokenizer, model_args, training_args, train_ds, eval_ds, recorded["stages"].get(stage.objective)
        )
    last = list(metrics["stages"].values())[-1]
    print(
        f"[rank {training_args.process_index}/{training_args.world_size}] trained {last['train_steps']} steps",
        flush=True,
    )
    if training_args.process_index == 0:
        metrics |= {name: sum(stage[name] for stage in metrics["stages"].values()) for name in ("train_steps",
                    "train_minutes", "resumed")}  # fmt: skip
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        summary = ", ".join(f"{name}={value:.4g}" for name, value in flat_metrics(metrics).items())
        print(f"done -> {output_dir} | {summary}")
        if training_args.push_to_hub:
            push_trained(model, tokenizer, metrics, model_args, data_args, training_args)
    end_process_group()
    return metrics


def recorded_metrics(output_dir: Path, options: dict, training_args: SLLMTrainingArguments) -> dict:
    """The metrics output_dir holds from a run with these options (METRICS_FILE, written when it finished), or
    an empty record: starting over, no such file, other options."""
    path = output_dir / METRICS_FILE
    if (
        training_args.overwrite_output_dir
        or not (path.exists() and (output_dir / RUN_FILE).exists())
        or differing_options(output_dir, options)
    ):
        return {"stages": {}}
    return json.loads(path.read_text())


def finished(recorded: dict, training_args: SLLMTrainingArguments) -> bool:
    """Whether a recorded run has trained every stage to this budget (a larger budget extends it)."""
    stages = training_args.stages()
    return all(
        (done := recorded["stages"].get(stage.objective)) is not None
        and reached(stage, done["train_steps"], 60 * done["train_minutes"], done.get("planned_steps", -1))
        for stage in stages
    )


def end_process_group() -> None:
    """Under torchrun / accelerate: wait for rank 0's writes, then close the process group. A gloo
    process that exits with its group open can abort in teardown ("terminate called without an
    active exception"), which fails the launch although every rank finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
