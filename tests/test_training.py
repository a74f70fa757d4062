"""examples/train_sllm.py: both stages, LoRA, options, bad input, resume after a kill, 2-process DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_sllm  # noqa: E402

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


def test_both_stages_then_reload_as_remote_code(base_folder, data_files, tmp_path):
    out = tmp_path / "run"
    args = ["--base_model", str(base_folder), *data_files, "--output_dir", str(out), "--stage", "both",
            "--max_steps", "6", *FAST]  # fmt: skip
    metrics = train_sllm.main(args)
    stage1, stage2 = metrics["stages"]["reconstruction"], metrics["stages"]["next_sentence"]
    assert stage1["train_steps"] == 3 and stage2["train_steps"] == 3
    assert 0 <= stage1["eval_token_accuracy"] <= 1 and 0 <= stage1["eval_exact_match"] <= 1
    assert stage2["eval_perplexity"] == pytest.approx(2.718281828 ** stage2["eval_loss"], rel=1e-6)
    assert json.loads((out / "sllm_metrics.json").read_text())["stages"]["next_sentence"]["train_steps"] == 3
    assert (out / "stage1-reconstruction" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.objective == "next_sentence"
    # stage 2 alone, starting from the stage-1 output folder
    again = train_sllm.main(["--init_from", str(out / "stage1-reconstruction"), *data_files, "--output_dir",
                             str(tmp_path / "stage2"), "--stage", "next_sentence", "--max_steps", "2", *FAST])  # fmt: skip
    assert again["stages"]["next_sentence"]["train_steps"] == 2


def test_lora_full_bf16_accumulation_checkpointing_and_eval_during_training(base_folder, data_files, tmp_path, capsys):
    lora = train_sllm.main(["--base_model", str(base_folder), *data_files, "--output_dir", str(tmp_path / "lora"),
                            "--stage", "next_sentence", "--backbone", "lora", "--max_steps", "2", *FAST])  # fmt: skip
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert lora["stages"]["next_sentence"]["train_steps"] == 2
    full = train_sllm.main(["--base_model", str(base_folder), *data_files, "--output_dir", str(tmp_path / "full"),
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
    model = train_sllm.prepare_for_training(model, train_sllm.ModelArguments(backbone=backbone), "next_sentence")
    args = train_sllm.TrainingArguments(str(tmp_path), learning_rate=1e-3, use_cpu=True, report_to="none")
    trainer = train_sllm.SLLMTrainer(model=model, args=args, backbone_learning_rate=1e-5)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert by_lr[1e-3] | by_lr[1e-5] == trained and not by_lr[1e-3] & by_lr[1e-5]
    assert by_lr[1e-5] and all(".llm." in n or n.startswith("llm.") for n in by_lr[1e-5])
    assert any("sentence_decoder" in n for n in by_lr[1e-3]) and not any("sentence_" in n for n in by_lr[1e-5])


def test_bad_input_stops_before_training(base_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    common = ["--output_dir", str(tmp_path / "x"), "--max_steps", "1", *FAST]
    with pytest.raises(ValueError, match="empty"):
        train_sllm.main(
            ["--base_model", str(base_folder), "--train_file", str(empty), "--eval_file", str(empty), *common]
        )
    with pytest.raises(ValueError, match="no text column 'body'"):
        train_sllm.main(
            ["--base_model", str(base_folder), "--train_file", str(EXCERPT), "--text_column", "body", *common]
        )
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        t5
    )
    with pytest.raises(ValueError, match="cannot be wrapped: it is not a causal LM"):
        train_sllm.main(["--base_model", str(t5), "--train_file", str(EXCERPT), *common])


def script(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "train_sllm.py"), *args]


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


@pytest.mark.parametrize(
    "launcher",
    [["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
     ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29534"]],
    ids=["torchrun", "accelerate"],
)  # fmt: skip
def test_two_process_ddp_on_cpu(launcher, base_folder, data_files, tmp_path):
    """The unchanged script under torchrun and `accelerate launch` (on CPU both give 2 gloo processes)."""
    out = tmp_path / "ddp"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher, str(ROOT / "examples" / "train_sllm.py"), "--base_model", str(base_folder),
               *data_files, "--output_dir", str(out), "--stage", "next_sentence", "--max_steps", "3", *FAST]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[rank 0/2] trained 3 steps" in result.stdout and "[rank 1/2] trained 3 steps" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).config.model_type == "sllm"


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
    only_train = train_sllm.load_texts(train_sllm.DataArguments(dataset_name=str(repo), text_column="body"))
    assert (len(only_train[0]), len(only_train[1])) == (54, 6)
    (repo / "validation.jsonl").write_text("".join(json.dumps({"id": 0, "body": t}) + "\n" for t in lines[60:64]))
    metrics = train_sllm.main(
        ["--dataset_name", str(repo), "--output_dir", str(tmp_path / "run"), *common, "--sampled_negatives", "7"]
    )
    assert metrics["stages"]["reconstruction"]["train_steps"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sampled_negatives"] == 7
    assert 0 <= metrics["stages"]["reconstruction"]["eval_token_accuracy"] <= 1
    with pytest.raises(ValueError, match="no text column 'text'"):
        train_sllm.main(
            ["--dataset_name", str(repo), "--output_dir", str(tmp_path / "x"), *common, "--text_column", "text"]
        )
