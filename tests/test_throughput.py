"""benchmarks/throughput.py's cells on a tiny pair: what a cell holds, and how its ratio is defined."""

import argparse
import json
import statistics

import pytest
import torch
from conftest import EOS, NEWLINE, random_text, tiny_backbone, tiny_sllm

import throughput  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
from measure import SentenceEndsAt, reference_sentence_ends

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return throughput.Pair("tiny", tiny_sllm(max_sentence_len=8), tiny_backbone(), "a tiny llama pair")


def check_speed(cell: dict, repeats: int, tokens: int) -> None:
    """Every repeat's seconds kept; tokens/s positive; the ratio is per repeat (token LM seconds / SLLM seconds
    of the same round), summarised by its median and min-max."""
    for family in throughput.FAMILIES:
        assert len(cell["seconds"][family]) == repeats and min(cell["seconds"][family]) > 0
        rates = [tokens / s for s in cell["seconds"][family]]
        assert cell["tokens_per_s"][family]["median"] == pytest.approx(statistics.median(rates))
    expected = [t / s for s, t in zip(cell["seconds"]["sllm"], cell["seconds"]["token_lm"])]
    assert cell["ratio_per_repeat"] == pytest.approx(expected)
    assert cell["ratio"] == pytest.approx({"median": statistics.median(expected), "min": min(expected),
                                           "max": max(expected)})  # fmt: skip
    macs = cell["multiply_adds"]
    assert macs["sllm"] > 0 and macs["token_lm"] > 0 and macs["limit"] == pytest.approx(macs["token_lm"] / macs["sllm"])


def test_training_cell(pair):
    rows = random_text(2, 24)
    cell = throughput.train_cell(pair, throughput.TrainingSteps(pair, CPU), rows, torch.float32, repeats=3)
    check_speed(cell, 3, rows.numel())
    assert cell["multiply_adds"]["context"] == pytest.approx(12.5)
    assert not pair.sllm.training  # the steps ran on copies


def test_training_cell_with_both_compiled(pair):
    """--peer-compiled --sllm-compiled: both training copies run compiled, the SLLM's after steps on two other
    layouts (first_steps_s), and an eager copy of the SLLM steps in the same rounds."""
    trainer = throughput.TrainingSteps(pair, CPU, peer_compiled=True, sllm_compiled=True)
    for family in throughput.FAMILIES:
        assert isinstance(trainer.calls[family], torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.calls[throughput.EAGER_SLLM] is trainer.models[throughput.EAGER_SLLM]
    rows = random_text(2, 24)
    cell = throughput.train_cell(pair, trainer, rows, torch.float32, repeats=1)
    check_speed(cell, 1, rows.numel())
    assert cell["first_steps_s"] > 0
    eager = cell[throughput.EAGER_SLLM]
    assert eager["ratio"]["median"] > 0 and eager["compiled_over_eager"]["median"] > 0


def test_generation_cell(pair):
    args = argparse.Namespace(new_tokens=6, repeats=2, device=CPU, peer_compiled=False, sllm_compiled=False)
    prompt_len = 16
    rows = random_text(3, prompt_len + throughput.reference_tail(args, pair), seed=1)
    cell = throughput.generate_cell(pair, pair.models(), rows, prompt_len, args)
    check_speed(cell, 2, 3 * 6)
    assert cell["multiply_adds"]["context"] == prompt_len + 3
    for family in throughput.FAMILIES:
        assert cell["peak_cache_bytes"][family] > 0 and cell["peak_memory"][family]["max_rss_bytes"] > 0
    assert cell["sllm_decoder_steps_per_new_token"] >= 1


def test_generation_cell_with_both_compiled(pair):
    """--peer-compiled --sllm-compiled: the token LM's calls run its compiled forward with a static cache, the
    SLLM's its compiled static decoder steps (graphs compiled, the first calls the slow ones); each writes the
    tokens its eager calls write."""
    torch._dynamo.reset()
    args = argparse.Namespace(new_tokens=6, repeats=1, device=CPU, peer_compiled=True, sllm_compiled=True)
    rows = random_text(2, 16 + throughput.reference_tail(args, pair), seed=3)
    models = throughput.with_compiled_peer(pair.models())
    cell = throughput.generate_cell(pair, models, rows, 16, args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert cell["token_lm_mode"] == "compiled, static cache"
    assert cell["sllm_mode"] == "decoder steps compiled, static cache"
    for family in throughput.FAMILIES:
        assert cell["first_call_s"][family] > max(cell["seconds"][family])
    prompts = rows[:, :16]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    for compiled, eager in ((models["token_lm"], pair.token_lm), (pair.sllm, pair.sllm)):
        assert torch.equal(compiled.generate(prompts, cache_implementation="static", **kwargs), eager.generate(prompts, **kwargs))


def test_sentence_ends_are_forced_where_the_reference_ends_them(pair):
    prompt_len, new = 10, 12
    rows = random_text(1, prompt_len + 40, seed=2)
    ends = reference_sentence_ends(pair.sllm, rows, prompt_len)
    forcing = SentenceEndsAt(ends, prompt_len, pair.sllm.config.text_config.vocab_size, [EOS, NEWLINE], 0)
    out = pair.sllm.generate(rows[:, :prompt_len], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, logits_processor=[forcing])  # fmt: skip
    assert out.shape[1] == prompt_len + new and not (out[:, prompt_len:] == 0).any()
    forced = int(((ends > 0) & (ends < new)).sum())
    assert forced > 0 and forcing.calls == new + forced  # one decoder step per token and per forced end


def test_a_failing_cell_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("a crash | in generate")

    monkeypatch.setattr(throughput, "generate_cell", crash)
    throughput.main(["--models", "shipped", "--train-rows", "16", "--batch", "2", "--batches", "1", "2", "--prompts",
                     "16", "--new-tokens", "4", "--dtypes", "fp32", "--repeats", "1", "--skip",
                     "shipped/generate/*/2x*", "--output-dir", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "throughput.json").read_text())
    statuses = {c["id"]: c["status"] for c in results["cells"]}
    assert statuses == {"shipped/train/fp32/2x16": "ok", "shipped/generate/fp32/1x16": "failed",
                        "shipped/generate/fp32/2x16": "skipped"}  # fmt: skip
    check_speed(results["cells"][0], 1, 2 * 16)
    assert {"git_commit", "command", "machine", "versions"} <= set(results)
    table = (tmp_path / "throughput.md").read_text()
    assert "failed: RuntimeError: a crash / in generate" in table and "skipped: --skip shipped/generate/*/2x*" in table
    assert all(line.count("|") == 11 for line in table.splitlines() if line.startswith("| shipped"))
    assert (tmp_path / "throughput.png").stat().st_size > 0
