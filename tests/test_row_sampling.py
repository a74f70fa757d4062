"""Per-row sampling (`modeling_sllm.row_sampling`) against Transformers' own processors: truncation keeps what
TopK, TopP and MinP keep, the repetition penalty is Transformers', and the exponential race samples the processed
distribution; each row uses only its own settings and generator."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from modeling_sllm.row_sampling import RowSampling, SamplingParams

CPU = torch.device("cpu")
SETTINGS = [
    SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7, top_k=5, top_p=0.5),
    SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=1.0, top_k=300, top_p=0.99),
    SamplingParams(temperature=1.0, top_p=0.999), SamplingParams(),
]  # fmt: skip


def transformers_processed(params: SamplingParams, logits: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.sampled:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            processors.append(MinPLogitsWarper(params.min_p))
    return processors(ids, logits.clone())


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_each_row_is_processed_as_transformers_processes_it_alone(scale):
    """Rows of different settings in one batch, vocabulary of 8,192 and the sentence end (never penalised):
    the kept tokens and their logits equal Transformers' processors on that row alone."""
    torch.manual_seed(0)
    params = SETTINGS + [SamplingParams(repetition_penalty=1.5), SamplingParams(temperature=0.8, repetition_penalty=0.8)]
    logits = torch.randn(len(params), 8193) * scale
    text = torch.randint(0, 8192, (len(params), 12))
    real = torch.ones_like(text, dtype=torch.bool)
    ours = RowSampling(params, CPU).process(logits.clone(), lambda: (text, real, torch.zeros_like(real)))
    for row, p in enumerate(params):
        theirs = transformers_processed(p, logits[row : row + 1, :8192], text[row : row + 1])[0]
        assert torch.equal(torch.isinf(ours[row, :8192]), torch.isinf(theirs)), p
        kept = ~torch.isinf(theirs)
        assert torch.allclose(ours[row, :8192][kept], theirs[kept], atol=1e-5), p


def test_frequency_and_presence_penalties_count_only_new_tokens():
    logits = torch.zeros(1, 9)
    text = torch.tensor([[3, 3, 5, 3, 7]])  # prompt 3 3, new 5 3 7
    new = torch.tensor([[False, False, True, True, True]])
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)]
    out = RowSampling(params, CPU).process(logits, lambda: (text, torch.ones_like(new), new))
    assert out[0].tolist() == [0, 0, 0, -1.5, 0, -1.5, 0, -1.5, 0]


def test_the_exponential_race_samples_the_processed_distribution():
    """20,000 draws of one row: each class's frequency within 0.015 of its probability; a seeded row repeats its
    draws; greedy rows take the argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -10.0]])
    probs = logits.softmax(-1)[0]
    sampling = RowSampling([SamplingParams(temperature=1.0, seed=3)], CPU)
    draws = torch.stack([sampling.choose(logits, torch.tensor([0]), [0]) for _ in range(20000)])[:, 0]
    frequency = torch.bincount(draws, minlength=6).float() / len(draws)
    assert (frequency - probs).abs().max() < 0.015
    again = RowSampling([SamplingParams(temperature=1.0, seed=3)], CPU)
    assert [int(again.choose(logits, torch.tensor([0]), [0])) for _ in range(50)] == draws[:50].tolist()
    greedy = RowSampling([SamplingParams()], CPU)
    assert int(greedy.choose(logits, torch.tensor([0]), [0])) == 0
