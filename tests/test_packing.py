"""Packed passes of the sentence modules: the same function of the text as padded ones.

The padded reference runs each item as a row of its own, padding masked (the pass the sentence modules
made before packing); the packed pass must give the same loss, per-token log-probabilities and gradients.
"""

import math

import pytest
import torch
from conftest import NEWLINE, PAD, left_pad, random_text, tiny_sllm

from modeling_sllm import packing
from modeling_sllm.packing import Packing, next_fit
from modeling_sllm.sentence_vae import SentenceLayers


@pytest.fixture(autouse=True)
def always_pack(monkeypatch):
    """Packed passes wherever there is padding, also in the tiny batches here."""
    monkeypatch.setattr(packing, "MIN_SAVING", -math.inf)


def run_padded(self, inputs_embeds, used, position_ids, layers=None):
    """The padded pass: every item [N, K] a row of its own, `used` as its attention mask."""
    states = SentenceLayers.forward(self, inputs_embeds, used.long(), position_ids, layers=layers)
    return states.last_hidden_state * used[..., None]


def test_packing_runs_where_it_skips_enough_padding(monkeypatch):
    """A training-like batch (sentences of 23 tokens padded to 64) is packed; a few sentences of similar
    length (generate's encodes) run padded."""
    monkeypatch.undo()
    lengths = torch.tensor([23] * 40 + [64])
    assert Packing(torch.arange(64) < lengths[:, None]).pays
    assert not Packing(torch.arange(30) < torch.tensor([[25], [30], [28]])).pays


def test_next_fit_keeps_order_and_opens_a_row_when_an_item_does_not_fit():
    rows, starts = next_fit([3, 4, 2, 5, 1, 1], width=8)
    assert rows == [0, 0, 1, 1, 1, 2] and starts == [0, 3, 0, 2, 7, 0]


def test_pack_and_unpack_move_only_real_columns():
    """Random masks with holes (left-padded windows): every item whole in one row, in order, and back."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(9, 7, generator=generator) < 0.6
    mask[3] = False  # an item with no real column
    values = torch.randn(9, 7, 2, generator=generator)
    packed = Packing(mask, min_width=10)
    assert packed.width == 10 and packed.num_rows * packed.width >= int(mask.sum())
    out = packed.pack(values)  # [R, C, 2]
    assert torch.equal(packed.unpack(out), values * mask[..., None])
    for n in range(9):
        at = (packed.item == n).nonzero()  # [count, 2] (row, column)
        assert len(at) == int(mask[n].sum())
        if len(at):
            assert at[:, 0].unique().numel() == 1  # one row
            assert torch.equal(at[:, 1], at[0, 1] + torch.arange(len(at)))  # contiguous
            assert torch.equal(out[at[0, 0], at[:, 1]], values[n][mask[n]])  # in order
    padding = packed.item >= 9
    assert packed.item[padding].unique().numel() == int(padding.sum())  # each padding column on its own


def test_packed_attention_keeps_items_apart():
    """A module run packed gives each item the states it has alone (several items share a row)."""
    model = tiny_sllm()
    encoder = model.sentence_encoder
    generator = torch.Generator().manual_seed(1)
    inputs, lengths = torch.randn(5, 6, 32, generator=generator), torch.tensor([6, 2, 4, 1, 3])
    used = torch.arange(6) < lengths[:, None]
    positions = torch.arange(6).expand(5, 6)
    packed = encoder.run_packed(inputs, used, positions)
    assert Packing(used).num_rows == 1
    for n in range(5):
        alone = encoder.layers(inputs_embeds=inputs[n : n + 1, : lengths[n]]).last_hidden_state[0]
        assert torch.allclose(packed[n, : lengths[n]], alone, atol=1e-5)
    assert not packed[~used].any()


CONFIGS = {
    "default": {},
    "window-prefix-learned-ends": {"decoder_window": 3, "decoder_prefix_vectors": 2, "sentence_end": "learned"},
    "shared-decoder-window": {"decoder_shares_backbone": True, "decoder_window": 2},
    "mean-pooling-embedding-mean": {"sentence_pooling": "mean", "backbone_input": "embedding_mean"},
    "reconstruction": {"objective": "reconstruction"},
}


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "qwen2"])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_packed_loss_equals_padded_loss(name, variant, monkeypatch):
    """On random left-padded batches with unscored tokens: the same loss, per-token log-probabilities
    and gradients as padded passes, packed into rows of 12 columns (several rows) and of 128 (one)."""
    model = tiny_sllm(name, seed=3, **CONFIGS[variant])
    rows = [random_text(1, length, seed=length)[0] for length in (23, 9, 17)]
    rows[1][4] = NEWLINE
    ids, mask = left_pad(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt: not scored
    token_log_probs = CONFIGS[variant].get("objective") != "reconstruction"

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_token_log_probs=token_log_probs)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return out, grads

    with monkeypatch.context() as patch:
        patch.setattr(SentenceLayers, "run_packed", run_padded)
        padded, padded_grads = run()
    for width in (12, 128):
        monkeypatch.setattr(packing, "ROW_WIDTH", width)
        packed, packed_grads = run()
        assert torch.allclose(packed.loss, padded.loss, atol=1e-5), (width, packed.loss, padded.loss)
        if token_log_probs:
            assert torch.allclose(packed.token_log_probs, padded.token_log_probs, atol=1e-5)
            assert torch.allclose(packed.sentence_losses, padded.sentence_losses, atol=1e-5)
        assert packed_grads.keys() == padded_grads.keys() and padded_grads
        for key, grad in padded_grads.items():
            assert torch.allclose(packed_grads[key], grad, rtol=1e-4, atol=1e-5), key
    assert PAD not in labels[labels != -100]
