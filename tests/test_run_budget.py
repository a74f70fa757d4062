"""A finished run stays finished and a resumed run keeps its budget (tiny from-scratch runs, in process): the same
command on a finished run touches nothing; a checkpoint at max_steps trains no step; the time budget counts the
minutes of every segment (on a clock the test drives); a larger budget extends a run; the metrics sum the
segments. For `--stage next_sentence` and `--stage both`."""

import hashlib
from pathlib import Path

import pytest
import torch

from modeling_sllm import training

EXCERPT = Path(__file__).resolve().parents[1] / "examples" / "data" / "python-docs-excerpt.txt"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("data")
    lines = EXCERPT.read_text().splitlines()
    (folder / "train.txt").write_text("\n".join(lines[:80]) + "\n")
    return ["--train_file", str(folder / "train.txt")]


def run(data: list[str], out: Path, stage: str, *extra: str) -> dict:
    """One tiny from-scratch training run (a checkpoint every 2 steps), as the training script runs it."""
    args = ["--base_config", "llama", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
            "--num_key_value_heads", "2", "--tokenizer_vocab_size", "300", "--backbone", "full", "--stage", stage,
            "--learning_rate", "1e-3", *data, "--output_dir", str(out), "--use_cpu", "--per_device_train_batch_size",
            "4", "--block_size", "48", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
            "--disable_tqdm", "true", *extra]  # fmt: skip
    torch.manual_seed(0)
    return training.main(args)


def files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def checkpoints(folder: Path) -> list[str]:
    return [p.name for p in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))]


@pytest.mark.parametrize("stage, folders", [("next_sentence", [""]), ("both", ["stage1-reconstruction", ""])])
def test_a_finished_run_rerun_touches_nothing_and_a_larger_budget_extends_it(data, tmp_path, capsys, stage, folders):
    out = tmp_path / "run"
    first = run(data, out, stage, "--max_steps", "6")
    before = files(out)
    capsys.readouterr()
    again = run(data, out, stage, "--max_steps", "6")
    printed = capsys.readouterr().out
    assert f"the run in {out} is complete" in printed and "resuming" not in printed
    assert files(out) == before and again == first  # no new checkpoint, no file rewritten
    smaller = run(data, out, stage, "--max_steps", "4")  # a budget it has already spent: done too
    assert files(out) == before and smaller == first

    extended = run(data, out, stage, "--max_steps", "10")
    printed = capsys.readouterr().out
    steps = [5, 5] if stage == "both" else [10]  # stage 1 gets half of max_steps, stage 2 the rest
    assert [extended["stages"][name]["train_steps"] for name in extended["stages"]] == steps
    for folder, was, now in zip(folders, [3, 3] if stage == "both" else [6], steps):
        assert f"--max_steps {was} -> {now}" in printed
        assert checkpoints(out / folder)[-1] == f"checkpoint-{now}"
    assert "the learning-rate schedule follows the new budget" in printed
    assert extended["train_steps"] == sum(steps) and extended["resumed"] == len(steps)


@pytest.mark.parametrize("stage", ["next_sentence", "both"])
def test_a_checkpoint_at_max_steps_trains_no_step(data, tmp_path, capsys, stage):
    """Killed after its last checkpoint and before its final save (the metrics file is missing), the run is
    finished by its checkpoints: Trainer, resumed there, would train one step past max_steps."""
    out = tmp_path / "run"
    run(data, out, stage, "--max_steps", "4")
    (out / training.METRICS_FILE).unlink()
    capsys.readouterr()
    metrics = run(data, out, stage, "--max_steps", "4")
    printed = capsys.readouterr().out
    assert "is done: " in printed and "{'loss'" not in printed  # not one training step
    assert checkpoints(out)[-1] == ("checkpoint-2" if stage == "both" else "checkpoint-4")
    assert metrics["train_steps"] == 4 and metrics["resumed"] == 0


class Interrupted(Exception):
    """Stands in for a kill: raised by the training step that the test chooses."""


def test_the_time_budget_counts_the_minutes_before_a_resume(data, tmp_path, capsys, monkeypatch):
    """Each training step takes 2.5 s of a clock the test drives; the budget is 15 s. Killed at step 5 (its last
    checkpoint: step 4, at 10 s), the resumed run trains only the 5 s left: it stops at step 7 (17.5 s > 15 s) and
    saves that step as a checkpoint, instead of training a fresh 15 s to step 11."""
    seconds, kill_at = [0.0], [5]
    training_step = training.SLLMTrainer.training_step

    def step_of_2_5_seconds(self, *args, **kwargs):
        if self.state.global_step + 1 == kill_at[0]:
            raise Interrupted
        loss = training_step(self, *args, **kwargs)
        seconds[0] += 2.5
        return loss

    monkeypatch.setattr(training, "clock", lambda: seconds[0])
    monkeypatch.setattr(training.SLLMTrainer, "training_step", step_of_2_5_seconds)
    out = tmp_path / "run"
    budget = ["--max_minutes", "0.25", "--max_steps", "1000"]
    with pytest.raises(Interrupted):
        run(data, out, "next_sentence", *budget)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    kill_at[0] = None
    metrics = run(data, out, "next_sentence", *budget)
    stage = metrics["stages"]["next_sentence"]
    assert stage["train_steps"] == 7 and stage["resumed"] == 1
    assert stage["train_minutes"] == pytest.approx(17.5 / 60)
    assert checkpoints(out)[-1] == "checkpoint-7"  # the time budget's last step, saved
    capsys.readouterr()
    assert run(data, out, "next_sentence", *budget) == metrics  # finished by its time budget
    assert "is complete" in capsys.readouterr().out
