"""generate in low precision: bf16 and fp16 weights, and fp32 weights under torch.autocast (CPU here; CUDA
when there is one). Low precision is compared with itself: a batch with each row alone (greedy, same
dtype), cached with recomputed steps (their scores, within the dtype's rounding), autocast with fp32."""

from contextlib import nullcontext

import pytest
import torch
from conftest import EOS, PAD, VOCAB, left_pad, tiny_sllm
from test_generation import PROMPTS, never_stop

from modeling_sllm.transformers_compat import layer_entries

# How a model runs: its weights' dtype and the autocast dtype (None: no autocast).
MODES = {
    "autocast-bf16": (torch.float32, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float16),
    "bf16-weights": (torch.bfloat16, None),
    "fp16-weights": (torch.float16, None),
}
# Largest difference of a score (a class logit of an untrained model, |logit| < 1) between two ways of
# computing it in the mode's precision; the cached and recomputed steps differ by <= 0.004 in bf16 here.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
VARIANTS = {
    "rule-llama": ("llama", {}),
    "learned-gpt2": ("gpt2", dict(sentence_end="learned")),
    "window-opt": ("opt", dict(decoder_window=3, decoder_prefix_vectors=2, sentence_pooling="mean")),
    "shared-llama": ("llama", dict(decoder_shares_backbone=True, decoder_window=3)),
}
NEW_TOKENS = 16
KWARGS = dict(max_new_tokens=NEW_TOKENS, suppress_tokens=[EOS, PAD])  # no eos, no pad: every row writes them all


def low_precision(mode: str, variant: str, device: str = "cpu"):
    """A never-stopping tiny SLLM in `mode` on `device`, and the context to generate in."""
    weights, autocast = MODES[mode]
    backbone, overrides = VARIANTS[variant]
    model = never_stop(tiny_sllm(backbone, **overrides)).to(device, weights)
    context = torch.autocast(device, dtype=autocast) if autocast is not None else nullcontext()
    return model, context, autocast or weights


def check_low_precision_generate(mode: str, variant: str, device: str = "cpu") -> None:
    """A batch in `mode`: every row writes NEW_TOKENS valid ids, scores and logits hold no NaN and some
    finite class for every writing row, the sentence cache holds low-precision weights' dtype, and each
    row written alone in the same mode writes the same tokens."""
    model, context, _ = low_precision(mode, variant, device)
    ids, mask = (tensor.to(device) for tensor in left_pad(PROMPTS))
    with context:
        out = model.generate(
            ids, attention_mask=mask, output_scores=True, output_logits=True, return_dict_in_generate=True, **KWARGS
        )
        alone = [model.generate(prompt[None].to(device), **KWARGS)[0] for prompt in PROMPTS]
    new = out.sequences[:, ids.shape[1] :]
    assert new.shape == (len(PROMPTS), NEW_TOKENS)
    assert bool(((new > PAD) & (new < VOCAB) & (new != EOS)).all())
    assert len(out.scores) == len(out.logits) >= NEW_TOKENS
    for scores, logits in zip(out.scores, out.logits):
        assert not scores.isnan().any() and not logits.isnan().any()
        writing = torch.isfinite(logits).any(-1)  # idle rows are all -inf
        assert bool(writing.any()) and bool(torch.isfinite(scores[writing]).any(-1).all())
    assert out.peak_cache_bytes > 0
    if MODES[mode][1] is None:  # low-precision weights: the sentence cache is held in their dtype
        assert layer_entries(out.cache.layers[0])[0].dtype == model.dtype
    for b, prompt in enumerate(PROMPTS):
        assert torch.equal(new[b], alone[b][len(prompt) :])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_batch_writes_valid_tokens_and_equals_each_row_alone(mode, variant):
    check_low_precision_generate(mode, variant)


@pytest.mark.parametrize("variant", ["learned-gpt2", "shared-llama"])
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_cached_steps_score_as_recomputed_ones(mode, variant):
    """Step by step, while both runs chose the same classes, the cached and the recomputed decoder score
    alike within the mode's rounding: the starting columns of the layout, then one column per token."""
    model, context, dtype = low_precision(mode, variant)
    ids, mask = left_pad(PROMPTS)
    kwargs = KWARGS | dict(attention_mask=mask, output_scores=True, return_dict_in_generate=True)
    with context:
        cached, recomputed = model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs)
    compared = 0
    for one, other in zip(cached.scores, recomputed.scores):
        finite = torch.isfinite(one)
        assert torch.equal(finite, torch.isfinite(other))
        assert torch.allclose(one[finite], other[finite], rtol=0, atol=TOLERANCE[dtype])
        if not torch.equal(one.argmax(-1), other.argmax(-1)):
            break
        compared += 1
    assert compared >= NEW_TOKENS // 2


@pytest.mark.parametrize("mode", ["autocast-bf16", "autocast-fp16"])
def test_autocast_computes_in_low_precision(mode):
    """Under autocast the scores move off the fp32 ones, by no more than the autocast dtype's rounding."""
    model, context, dtype = low_precision(mode, "rule-llama")
    ids, mask = left_pad(PROMPTS)
    kwargs = KWARGS | dict(attention_mask=mask, max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
    with context:
        low = model.generate(ids, **kwargs).scores[0]
    full = model.generate(ids, **kwargs).scores[0]
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(low))
    assert not torch.equal(low, full)
    assert torch.allclose(low[finite], full[finite], rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["rule-llama", "window-opt"])
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_on_cuda(mode, variant):
    check_low_precision_generate(mode, variant, device="cuda")
