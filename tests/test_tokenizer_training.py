"""A BPE tokenizer trained here: lossless, its sentence boundaries found, its segmentation lossless, saved, loaded."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modeling_sllm import sentence_boundary_token_ids
from modeling_sllm.from_scratch import build_scratch_sllm, scratch_boundaries
from modeling_sllm.tokenizer_training import train_bpe_tokenizer

EXCERPT = Path(__file__).resolve().parents[1] / "examples" / "data" / "python-docs-excerpt.txt"
HARD_CASES = [
    "Hello world.\n\nThe value 3.14 of os.path; is it? Yes!\n",
    "  leading spaces, trailing tab\t\nunicode: é ü 中文 😀 — «quotes»\r\nend",
    "no final punctuation",
    "",
    "\n",
    "a.b.c... (see above). Done;",
]


@pytest.fixture(scope="module")
def tokenizer():
    lines = EXCERPT.read_text().splitlines()[:300]
    return train_bpe_tokenizer(lines, vocab_size=600)


def test_special_tokens_and_vocabulary(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 600
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer("A sentence.").input_ids[0] not in tokenizer.all_special_ids  # no bos added


@pytest.mark.parametrize("text", HARD_CASES + EXCERPT.read_text().splitlines()[400:420])
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_newline_is_a_token_of_its_own(tokenizer):
    newline = tokenizer("\n").input_ids
    assert len(newline) == 1
    for text in ("a.\n\nb", "x \n y", "end.\n"):
        ids = tokenizer(text).input_ids
        assert ids.count(newline[0]) == text.count("\n")


def test_sentence_boundaries_are_found(tokenizer):
    boundaries = sentence_boundary_token_ids(tokenizer)
    ends, punctuation = set(boundaries["sentence_end_token_ids"]), set(boundaries["punctuation_end_token_ids"])
    continuations = set(boundaries["continuation_token_ids"])
    assert tokenizer("\n").input_ids[0] in ends
    assert tokenizer.eos_token_id in ends
    for mark in (".", "?", "!", ";"):
        assert tokenizer(mark).input_ids[-1] in punctuation, mark
    assert not ends & punctuation
    # "3.14" and "os.path": the pieces after the dot are glued, so the dot does not end a sentence there
    for text, piece in (("3.14", "14"), ("os.path", "path")):
        ids = tokenizer(text).input_ids
        assert ids[ids.index(tokenizer(".").input_ids[0]) + 1] in continuations, text
    assert tokenizer(" the").input_ids[0] not in continuations  # a word after a space starts a new one
    # the scratch SLLM's boundaries also glue a newline to the punctuation before it
    newline = tokenizer("\n").input_ids[0]
    assert newline not in continuations
    glued = scratch_boundaries(tokenizer)
    assert newline in glued["continuation_token_ids"] and newline in glued["sentence_end_token_ids"]
    added = set(glued["continuation_token_ids"]) - continuations  # the newline and the carriage return
    assert newline in added and {tokenizer.decode([i]) for i in added} == {"\n", "\r"}


def test_segmentation_gives_back_the_tokens(tokenizer):
    """The scratch SLLM's segmentation of a text is lossless and cuts where the rule says."""
    model = build_scratch_sllm(
        {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}, tokenizer, max_sentence_len=16
    )
    text = "First sentence here. The value 3.14 stays whole; see os.path too!\nA new line starts. And ends"
    ids = torch.tensor([tokenizer(text).input_ids + [tokenizer.eos_token_id]])
    seg = model.segment(ids)
    sentences = [s[:n].tolist() for s, n in zip(seg.sentences[0], seg.lengths[0]) if n > 0]
    assert sum(sentences, []) == ids[0].tolist()
    texts = [tokenizer.decode(s) for s in sentences]
    assert texts == [
        "First sentence here.",
        " The value 3.14 stays whole;",
        " see os.path too!\n",  # the newline glues to the punctuation before it (scratch_boundaries)
        "A new line starts.",
        " And ends<|endoftext|>",
    ], texts


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == (tokenizer.pad_token, tokenizer.bos_token,
                                                                      tokenizer.eos_token)  # fmt: skip
    for text in HARD_CASES:
        assert loaded(text).input_ids == tokenizer(text).input_ids
        assert loaded.decode(loaded(text).input_ids) == text
    assert sentence_boundary_token_ids(loaded) == sentence_boundary_token_ids(tokenizer)


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="256 bytes"):
        train_bpe_tokenizer(["some text"], vocab_size=100)
