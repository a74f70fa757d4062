"""benchmarks/from_scratch_scaling.py, run as a user runs it, on results whose power laws are known."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "from_scratch_scaling.py"
# perplexity = a * minutes^-k per model: the SLLM starts worse but falls faster, so the lines meet where
# a_s * t^-k_s = a_t * t^-k_t, i.e. t = (a_s / a_t)^(1 / (k_s - k_t)) = 2^(1 / 0.2) = 32 minutes
LAWS = {"SLLM x": (2000.0, 0.7), "token x": (1000.0, 0.5)}
BUDGETS = (6.0, 15.0, 30.0)


def write_budget(folder: Path, minutes: float, noise: float = 1.0) -> None:
    models = {}
    for name, (a, k) in LAWS.items():
        ppl = a * minutes**-k
        models[name] = {"train_minutes": minutes, "perplexity": {"in_domain": ppl * noise, "out_of_domain": 1.5 * ppl},
                        "speed": {"batch 1": {"tok_s": 100.0}}}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "scratch.json").write_text(json.dumps({"models": models}))


def run_script(tmp_path: Path, folders: list[Path]) -> dict:
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(SCRIPT), "--results", *map(str, folders), "--sllm", "SLLM x", "--token",
                    "token x", "--output-dir", str(out)], check=True, capture_output=True, text=True)  # fmt: skip
    assert (out / "scaling.png").stat().st_size > 0 and "SLLM catches up at 32 min" in (out / "scaling.md").read_text()
    return json.loads((out / "scaling.json").read_text())


def test_recovers_known_power_laws_and_where_they_cross(tmp_path):
    folders = [tmp_path / f"b{i}" for i in range(len(BUDGETS))]
    for folder, minutes in zip(folders, BUDGETS):
        write_budget(folder, minutes)
    fit = run_script(tmp_path, folders)["fits"]["in_domain"]
    assert fit["sllm"]["exponent"] == pytest.approx(0.7) and fit["token"]["exponent"] == pytest.approx(0.5)
    assert fit["sllm"]["max_residual_factor"] == pytest.approx(1.0)
    assert fit["crossover_minutes"] == pytest.approx(32.0)
    # at 10x the largest budget (300 min): 2 * 300^-0.2
    assert fit["ratio_sllm_to_token"]["10x"] == pytest.approx(2 * 300**-0.2)
    # the token LM's perplexity at 30 min, reached by the SLLM at t: 2000 t^-0.7 = 1000 * 30^-0.5
    t = (2 * 30**0.5) ** (1 / 0.7)
    assert fit["sllm_compute_multiplier"]["measured"] == pytest.approx(t / 30)
    assert fit["measured_ratios"]["b2"] == pytest.approx(2 * 30**-0.2)


def test_residual_reports_a_budget_off_the_power_law(tmp_path):
    folders = [tmp_path / f"b{i}" for i in range(len(BUDGETS))]
    for folder, minutes, noise in zip(folders, BUDGETS, (1.0, 1.2, 1.0)):
        write_budget(folder, minutes, noise)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(SCRIPT), "--results", *map(str, folders), "--sllm", "SLLM x", "--token",
                    "token x", "--output-dir", str(out)], check=True, capture_output=True)  # fmt: skip
    fit = json.loads((out / "scaling.json").read_text())["fits"]["in_domain"]
    assert 1.05 < fit["sllm"]["max_residual_factor"] < 1.2
    assert fit["token"]["max_residual_factor"] == pytest.approx(fit["sllm"]["max_residual_factor"])
    assert json.loads((out / "scaling.json").read_text())["fits"]["out_of_domain"]["sllm"]["max_residual_factor"] \
        == pytest.approx(1.0)


def test_a_model_in_one_budget_only_is_refused(tmp_path):
    write_budget(tmp_path / "only", 6.0)
    result = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path / "only"), "--sllm", "SLLM x",
                             "--token", "token x", "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "a fit needs 2 or more" in result.stderr
