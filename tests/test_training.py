"""modeling_sllm.training (the code of examples/train_sllm.py): both stages, LoRA, options, bad input,
resume after a kill, another run's output_dir, 2-process DDP (FSDP: see the README)."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from modeling_sllm import training
from modeling_sllm.training import EXCERPT

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.smollm2
def test_both_stages_then_reload_as_remote_code(base_folder, data_files, tmp_path):
    out = tmp_path / "run"
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "both",
            "--max_steps", "6", *FAST]  # fmt: skip
    metrics = training.main(args)
    stage1, stage2 = metrics["stages"]["reconstruction"], metrics["stages"]["next_sentence"]
    assert stage1["train_steps"] == 3 and stage2["train_steps"] == 3
    assert 0 <= stage1["eval_token_accuracy"] <= 1 and 0 <= stage1["eval_exact_match"] <= 1
    assert json.loads((out / "sllm_metrics.json").read_text())["stages"]["next_sentence"]["train_steps"] == 3
    assert (out / "stage1-reconstruction" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.objective == "next_sentence"
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


@pytest.mark.smollm2
def test_killed_run_resumes_from_its_last_checkpoint(base_folder, data_files, tmp_path):
    out = tmp_path / "run"
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "next_sentence",
            "--max_steps", "200", *FAST[:-4], "--save_strategy", "steps", "--save_steps", "5", "--save_total_limit", "2",
            "--disable_tqdm", "true"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(script(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-5" / "trainer_state.json").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let it go on past the checkpoint, possibly into the middle of the next save
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert finished and finished[-1] < 200, "the run must be killed mid-way"
    complete = [n for n in finished if (out / f"checkpoint-{n}" / "trainer_state.json").exists()]
    resumed = subprocess.run(script(*args), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming next_sentence from {out / f'checkpoint-{complete[-1]}'}" in resumed.stdout
    assert json.loads((out / "sllm_metrics.json").read_text())["stages"]["next_sentence"]["train_steps"] == 200


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
    assert 0 <= metrics["stages"]["reconstruction"]["eval_token_accuracy"] <= 1
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
    training.main(args)  # the same options: the run goes on from its checkpoint
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
def test_time_limited_run_shows_its_budget_not_its_step_ceiling(base_folder, data_files, tmp_path, capsys):
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(tmp_path / "run"), "--stage",
            "next_sentence", "--max_minutes", "0.05", "--max_steps", "100000", *FAST[:-2]]  # fmt: skip
    metrics = training.main(args)
    bar = capsys.readouterr().err
    assert "next_sentence: 100%" in bar and "3/3 s of the time budget" in bar and "100000" not in bar
    assert 0 < metrics["stages"]["next_sentence"]["train_steps"] < 100000
