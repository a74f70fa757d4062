"""Train an SLLM with Trainer: Sentence-VAE reconstruction (stage 1), next-sentence LM (stage 2), or both.

    python examples/train_sllm.py --output_dir runs/sllm --stage both --max_steps 2000
    accelerate launch --num_processes 2 examples/train_sllm.py ...   # same script, several processes

Base model: any Hub id or local path (`--base_model`), default the embedded SmolLM2-135M.
Data: local text files (one document per line, or per blank-line-separated block with
`--sample_by paragraph`) or a Hub dataset with a text column; defaults to
../shared/data/linux-docs.txt (train) and python-docs.txt (held-out) when present, else the
Python-docs excerpt shipped in examples/data. Without a held-out file, 10% of the training
documents are held out.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from modeling_sllm import SLLMConfig, SLLMForCausalLM
from modeling_sllm.embedded_backbone import load_smollm2

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXCERPT = Path(__file__).resolve().parent / "data" / "python-docs-excerpt.txt"
STAGES = {
    "reconstruction": ["reconstruction"],
    "next_sentence": ["next_sentence"],
    "both": ["reconstruction", "next_sentence"],
}
SENTENCE_MODULES = ["sentence_encoder", "sentence_decoder", "stop_head", "start_embedding"]


@dataclass
class ModelArguments:
    base_model: str = field(default="smollm2", metadata={"help": "Hub id or path of a causal LM; 'smollm2' = embedded"})
    init_from: str | None = field(default=None, metadata={"help": "start from an SLLM folder (e.g. a stage-1 output)"})
    encoder_layers: int = SLLMConfig.encoder_layers
    decoder_layers: int = SLLMConfig.decoder_layers
    sentence_init: str = field(
        default=SLLMConfig.sentence_init, metadata={"help": "'backbone' (warm start) or 'random'"}
    )
    max_sentence_len: int = SLLMConfig.max_sentence_len
    sentence_pooling: str = field(
        default=SLLMConfig.sentence_pooling,
        metadata={"help": "'rotary' (position-bound sum; learns far faster) or 'mean'"},
    )
    training_vocab: str = field(
        default="in_batch",
        metadata={
            "help": "stage-1 softmax: 'in_batch' (the batch's target tokens + sampled negatives) or 'full'; "
            "stage 2 is always full"
        },
    )
    sampled_negatives: int = field(
        default=SLLMConfig.sampled_negatives,
        metadata={"help": "with 'in_batch': random vocabulary tokens added to each step's softmax"},
    )
    backbone: str = field(default="frozen", metadata={"help": "backbone training: 'frozen', 'lora' or 'full'"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target: str = field(default=r"llm\..*\.(q_proj|k_proj|v_proj|o_proj)", metadata={"help": "regex"})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "text file(s), comma separated"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out text file(s), comma separated"})
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset id (or local dataset folder)"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "the dataset's configuration, if any"})
    text_column: str = "text"
    sample_by: str = field(default="line", metadata={"help": "'line' or 'paragraph' (blank-line separated)"})
    block_size: int = field(default=256, metadata={"help": "tokens per training row; longer documents are chunked"})
    max_train_samples: int | None = None
    max_eval_samples: int | None = 256


@dataclass
class SLLMTrainingArguments(TrainingArguments):
    stage: str = field(default="both", metadata={"help": "'reconstruction', 'next_sentence' or 'both'"})
    stage1_fraction: float = field(
        default=0.5, metadata={"help": "share of max_steps/max_minutes for stage 1 in 'both'"}
    )
    max_minutes: float | None = field(default=None, metadata={"help": "wall-clock budget for training (all stages)"})
    backbone_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of the backbone's trained weights (LoRA or full); default: --learning_rate"},
    )
    report_to: str = "none"


class TimeLimit(TrainerCallback):
    """Stops training after `minutes` of wall-clock time (then the run saves and evaluates as usual)."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + 60 * minutes

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True


class SLLMTrainer(Trainer):
    """Trainer whose evaluation reports the README's metrics, summed exactly over the eval set, and
    keeps them against training minutes (evaluation time excluded) in `eval_history`."""

    def __init__(self, *args, backbone_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_learning_rate = backbone_learning_rate
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

    def train(self, *args, **kwargs):
        self.train_started, self.eval_seconds = time.perf_counter(), 0.0
        return super().train(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        eval_started = time.perf_counter()
        model = self.model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.args.device)  # nll, tokens, correct, targets, exact
        reconstruction = self.accelerator.unwrap_model(model).config.objective == "reconstruction"
        with torch.no_grad():
            for batch in self.get_eval_dataloader(eval_dataset):
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    out = model(**batch)
                sums[0] += out.loss.double() * out.num_tokens
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


def load_texts(data_args: DataArguments) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets with a `text` column; fails early with a clear message."""
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        if "train" not in raw:
            raise ValueError(f"the dataset {data_args.dataset_name!r} has no 'train' split; splits: {list(raw)}")
        held_out_split = next((name for name in ("validation", "test") if name in raw), None)
        train, held_out = raw["train"], raw[held_out_split] if held_out_split else None
    else:
        train_file, eval_file = data_args.train_file, data_args.eval_file
        if train_file is None and SHARED.exists():  # the shared corpora: train linux-docs, held-out python-docs
            train_file, eval_file = str(SHARED / "linux-docs.txt"), eval_file or str(SHARED / "python-docs.txt")
        files = {"train": (train_file or str(EXCERPT)).split(",")} | (
            {"eval": eval_file.split(",")} if eval_file else {}
        )
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


def build_model(model_args: ModelArguments):
    """(SLLM model, tokenizer, base model name) from --init_from or by wrapping --base_model."""
    if model_args.init_from:
        model = SLLMForCausalLM.from_pretrained(model_args.init_from)
        tokenizer = AutoTokenizer.from_pretrained(model_args.init_from)
        return model, tokenizer, model.config.text_config.name_or_path or model_args.base_model
    if model_args.base_model == "smollm2":
        llm, tokenizer = load_smollm2()
        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        try:
            llm, name = AutoModelForCausalLM.from_pretrained(model_args.base_model), model_args.base_model
        except ValueError as error:  # e.g. an encoder-decoder or an encoder-only checkpoint
            reason = str(error).splitlines()[0]
            raise ValueError(f"{model_args.base_model} cannot be wrapped: it is not a causal LM ({reason})") from error
        tokenizer = AutoTokenizer.from_pretrained(model_args.base_model)
    model = SLLMForCausalLM.from_base_model(
        llm,
        tokenizer,
        encoder_layers=model_args.encoder_layers,
        decoder_layers=model_args.decoder_layers,
        sentence_init=model_args.sentence_init,
        max_sentence_len=model_args.max_sentence_len,
        sentence_pooling=model_args.sentence_pooling,
    )
    return model, tokenizer, name


def prepare_for_training(model: SLLMForCausalLM, model_args: ModelArguments, objective: str):
    """Set the objective and what trains: the sentence modules always; the backbone per --backbone."""
    from peft import LoraConfig, get_peft_model

    model.config.objective = objective
    # Stage 2 optimises the perplexity itself: an uncorrected sampled softmax would bias it.
    model.config.training_vocab = model_args.training_vocab if objective == "reconstruction" else "full"
    model.config.sampled_negatives = model_args.sampled_negatives
    model.requires_grad_(True)
    for module in (model.sentence_encoder, model.sentence_decoder):
        module.layers.get_input_embeddings().requires_grad_(False)
    if objective == "reconstruction" or model_args.backbone == "frozen":
        model.llm.requires_grad_(False)  # stage 1 never uses the backbone layers
        return model
    if model_args.backbone == "lora":
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=model_args.lora_target,
            modules_to_save=SENTENCE_MODULES,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    if model_args.backbone != "full":
        raise ValueError(f"--backbone must be 'frozen', 'lora' or 'full', got {model_args.backbone!r}")
    return model


def run_stage(objective, model, tokenizer, model_args, training_args, train_ds, eval_ds, output_dir, steps, minutes):
    """Train one stage in `output_dir` (resuming from its last checkpoint); returns (SLLM model, metrics)."""
    args = training_args.to_dict() | {"output_dir": str(output_dir)}
    args = {k: v for k, v in args.items() if k in TrainingArguments.__dataclass_fields__ and not k.startswith("_")}
    args |= {"max_steps": steps if steps else -1, "push_to_hub": False, "remove_unused_columns": False}
    args.pop("push_to_hub_token", None)
    stage_args = TrainingArguments(**args)
    trainable = prepare_for_training(model, model_args, objective)
    trainer = SLLMTrainer(
        model=trainable,
        args=stage_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[TimeLimit(minutes)] if minutes else [],
        backbone_learning_rate=training_args.backbone_learning_rate,
    )
    checkpoint = stage_args.resume_from_checkpoint or last_complete_checkpoint(output_dir)
    if checkpoint:
        print(f"resuming {objective} from {checkpoint}")
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {"train_loss": result.training_loss, "train_steps": result.global_step,
               "train_minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    if eval_ds is not None:
        metrics |= trainer.evaluate()
        metrics["eval_history"] = trainer.eval_history
    if model_args.backbone == "lora" and objective == "next_sentence":
        trainable.save_pretrained(output_dir / "adapter")
        model = trainable.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, metrics


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint whose save finished (trainer_state.json is written last), so a run
    killed while saving resumes from the one before."""
    complete = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, SLLMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.stage not in STAGES:
        raise ValueError(f"--stage must be one of {sorted(STAGES)}, got {training_args.stage!r}")
    train_texts, eval_texts = load_texts(data_args)  # data errors surface before any model is loaded
    model, tokenizer, base_name = build_model(model_args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = tokenize(train_texts, tokenizer, data_args, data_args.max_train_samples)
    eval_ds = tokenize(eval_texts, tokenizer, data_args, data_args.max_eval_samples) if eval_texts else None

    output_dir = Path(training_args.output_dir)
    stages = STAGES[training_args.stage]
    metrics = {"base_model": base_name, "stages": {}}
    for index, objective in enumerate(stages):
        share = training_args.stage1_fraction if len(stages) == 2 and index == 0 else 1 - training_args.stage1_fraction
        share = share if len(stages) == 2 else 1.0
        steps = round(training_args.max_steps * share) if training_args.max_steps > 0 else None
        minutes = training_args.max_minutes * share if training_args.max_minutes else None
        stage_dir = output_dir / f"stage{index + 1}-{objective}" if len(stages) == 2 and index == 0 else output_dir
        model, metrics["stages"][objective] = run_stage(
            objective, model, tokenizer, model_args, training_args, train_ds, eval_ds, stage_dir, steps, minutes
        )
    last = metrics["stages"][stages[-1]]
    print(
        f"[rank {training_args.process_index}/{training_args.world_size}] trained {last['train_steps']} steps",
        flush=True,
    )
    if training_args.process_index == 0:
        (output_dir / "sllm_metrics.json").write_text(json.dumps(metrics, indent=2))
        summary = ", ".join(f"{name}={value:.4g}" for name, value in flat_metrics(metrics).items())
        print(f"done -> {output_dir} | {summary}")
        if training_args.push_to_hub:
            from modeling_sllm.hub import build_model_card, push_to_hub_with_card

            repo_id = training_args.hub_model_id or output_dir.name
            training = {"stages": stages, "data": data_args.dataset_name or data_args.train_file or "default corpora",
                        "backbone": model_args.backbone, "steps": sum(m["train_steps"] for m in metrics["stages"].values())}  # fmt: skip
            card = build_model_card(model, base_name, metrics=flat_metrics(metrics), training=training, repo_id=repo_id)
            url = push_to_hub_with_card(
                model, repo_id, card, token=training_args.hub_token, private=training_args.hub_private_repo,
                tokenizer=tokenizer,
            )  # fmt: skip
            print(f"pushed to {url}")
    return metrics


def flat_metrics(metrics: dict) -> dict:
    """The final figures of every stage as {"stage/name": number} (the eval history left out)."""
    return {
        f"{stage}/{name}": value
        for stage, values in metrics["stages"].items()
        for name, value in values.items()
        if isinstance(value, (int, float))
    }


if __name__ == "__main__":
    main(sys.argv[1:] or None)
