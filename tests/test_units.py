"""Units as a choice of the config (`SLLMConfig.sentence_unit`): sentences, clauses, fixed-length units.

Each is lossless on real text, the clause unit keeps glued tokens together, and a model built with each
keeps the contracts of the sentence unit: leak-free loss, cached == recomputed and batch == alone generation.
"""

from pathlib import Path

import pytest
import torch
from conftest import left_pad, shipped_pair
from test_segmentation import rows_back
from transformers import AutoTokenizer

from modeling_sllm import SLLMConfig, build_scratch_sllm, segment_sentences, sentence_boundary_token_ids
from modeling_sllm.configuration_sllm import SENTENCE_UNITS
from modeling_sllm.segmentation_sllm import token_table

REPO = Path(__file__).resolve().parents[1]
EXCERPT = REPO / "examples" / "data" / "python-docs-excerpt.txt"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
MAX_LEN = {"sentence": 64, "clause": 64, "fixed": 8}


@pytest.fixture(scope="module")
def tokenizer():
    """The shipped from-scratch pair's byte-level BPE (8,192 tokens)."""
    return AutoTokenizer.from_pretrained(shipped_pair()[0], trust_remote_code=True)  # the folder's config is remote code


def segment(tokenizer, texts: list[str], unit: str):
    boundaries = sentence_boundary_token_ids(tokenizer, unit)
    tables = [token_table(boundaries[name], len(tokenizer)) for name in boundaries]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    seg = segment_sentences(batch.input_ids, batch.attention_mask, *tables, max_sentence_len=MAX_LEN[unit])
    return batch, seg


def test_units_are_lossless_and_of_the_length_they_promise(tokenizer):
    """On real text every unit is lossless; clauses are shorter than sentences; fixed units are exactly
    max_sentence_len tokens but each row's last."""
    texts = EXCERPT.read_text().splitlines()[:32]
    mean = {}
    for unit in SENTENCE_UNITS:
        batch, seg = segment(tokenizer, texts, unit)
        for joined, real in rows_back(batch.input_ids, batch.attention_mask, seg):
            assert torch.equal(joined, real), unit
        lengths = seg.lengths[seg.lengths > 0].float()
        mean[unit] = float(lengths.mean())
        if unit == "fixed":
            last = seg.num_sentences - 1  # [B]
            not_last = seg.sentence_mask & (torch.arange(seg.lengths.shape[1]) < last[:, None])
            assert (seg.lengths[not_last] == MAX_LEN["fixed"]).all()
    assert 12 < mean["sentence"] < 40 and mean["clause"] < 0.8 * mean["sentence"], mean


def test_clause_units_cut_after_commas_and_colons_but_not_inside_glued_tokens(tokenizer):
    _, seg = segment(tokenizer, ["It costs 3,000 dollars, then: more. Done"], "clause")
    units = [tokenizer.decode(seg.sentences[0, s, : seg.lengths[0, s]]) for s in range(int(seg.num_sentences[0]))]
    assert units == ["It costs 3,000 dollars,", " then:", " more.", " Done"]
    _, seg = segment(tokenizer, ["It costs 3,000 dollars, then: more. Done"], "sentence")
    assert int(seg.num_sentences[0]) == 2


def test_sentence_unit_is_a_config_choice_and_old_configs_read_as_sentences(tokenizer):
    with pytest.raises(ValueError, match="sentence_unit"):
        SLLMConfig(sentence_unit="word")
    assert SLLMConfig.from_dict({}).sentence_unit == "sentence"
    with pytest.raises(ValueError, match="unit must be"):
        sentence_boundary_token_ids(tokenizer, "word")


def units_model(tokenizer, unit: str):
    torch.manual_seed(0)
    model = build_scratch_sllm(TINY, tokenizer, sentence_unit=unit, max_sentence_len=MAX_LEN[unit]).eval()
    with torch.no_grad():  # never end the text: generation runs to max_new_tokens
        model.stop_head.bias.copy_(torch.tensor([50.0, -50.0]))
    return model


@pytest.mark.parametrize("unit", ["clause", "fixed"])
def test_models_with_other_units_keep_the_contracts(tokenizer, unit):
    """The boundary ids come from the unit; the loss of earlier units does not see later ones; generation
    cached equals recomputed, and a left-padded batch equals each row alone."""
    model = units_model(tokenizer, unit)
    assert model.config.sentence_unit == unit
    expected = sentence_boundary_token_ids(tokenizer, unit)["punctuation_end_token_ids"]
    assert model.config.punctuation_end_token_ids == expected and (unit == "fixed") == (not expected)
    text = "It costs 3,000 dollars, then: more. The json module, in short, reads text: and writes it."
    ids = torch.tensor([tokenizer(text).input_ids])
    base = model(input_ids=ids, labels=ids).sentence_losses[0]
    seg = model.segment(ids)
    assert int(seg.num_sentences[0]) >= 4
    third = seg.token_index[0, 2, : seg.lengths[0, 2] - 1]  # columns of the third unit but its last
    changed = ids.clone()
    changed[0, third] = tokenizer(" the").input_ids[-1]  # an ordinary word: the units stay where they were
    assert torch.equal(model.segment(changed).lengths, seg.lengths) and not torch.equal(changed, ids)
    after = model(input_ids=changed, labels=changed).sentence_losses[0]
    assert torch.allclose(base[:2], after[:2], atol=1e-6) and not torch.allclose(base[2:], after[2:])
    prompts = [ids[0, :20], ids[0, :13], ids[0, :27]]
    batch, mask = left_pad(prompts)
    cached = model.generate(batch, attention_mask=mask, max_new_tokens=24, do_sample=False)
    recomputed = model.generate(batch, attention_mask=mask, max_new_tokens=24, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=24, do_sample=False)[0, len(prompt) :]
        assert torch.equal(cached[b, batch.shape[1] : batch.shape[1] + len(alone)], alone)
