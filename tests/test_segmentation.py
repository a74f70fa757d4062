"""Sentence segmentation is lossless, ordered, bounded and vectorised."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import BOUNDARIES, CONTINUATIONS, DOT, EOS, NEWLINE, PAD, VOCAB, left_pad, random_text
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_sllm import segment_sentences
from modeling_sllm.segmentation_sllm import token_table

TABLES = [token_table(BOUNDARIES[name], VOCAB) for name in BOUNDARIES]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXCERPT = Path(__file__).resolve().parents[1] / "examples" / "data" / "python-docs-excerpt.txt"
# The shared corpora when this checkout sits beside them, and always the excerpt shipped in the repo.
REAL_TEXT = [p for p in (SHARED / "python-docs.txt", SHARED / "linux-docs.txt") if p.exists()] + [EXCERPT]


def segment(ids, mask=None, max_len=8):
    return segment_sentences(ids, mask, *TABLES, max_sentence_len=max_len)


def rows_back(ids, mask, seg):
    """Concatenate each row's sentences and the input's real tokens, to compare."""
    out = []
    for b in range(ids.shape[0]):
        joined = [seg.sentences[b, s, : seg.lengths[b, s]] for s in range(seg.sentences.shape[1])]
        real = ids[b][mask[b].bool()] if mask is not None else ids[b]
        out.append((torch.cat(joined) if joined else ids.new_zeros(0), real))
    return out


def test_boundaries_follow_the_rules():
    #        w   .   w  w  .  5(glued) w   \n  w  eos w
    row = [10, DOT, 11, 12, DOT, 5, 13, NEWLINE, 14, EOS, 15]
    seg = segment(torch.tensor([row]), max_len=16)
    sentences = [seg.sentences[0, s, : seg.lengths[0, s]].tolist() for s in range(seg.sentences.shape[1])]
    assert sentences == [[10, DOT], [11, 12, DOT, 5, 13, NEWLINE], [14, EOS], [15]]


def test_long_sentences_are_split_not_truncated():
    row = torch.arange(10, 30)[None]  # 20 words, no punctuation
    seg = segment(row, max_len=8)
    assert seg.lengths.tolist() == [[8, 8, 4]]
    assert torch.equal(seg.sentences[0][seg.token_index[0] >= 0], row[0])


def test_text_after_the_last_mark_is_kept():
    seg = segment(torch.tensor([[10, 11, DOT, 12, 13]]))
    assert seg.lengths.tolist() == [[3, 2]]


def test_padding_belongs_to_no_sentence_and_empty_rows_have_none():
    ids, mask = left_pad([torch.tensor([10, DOT, 11]), torch.tensor([], dtype=torch.long)])
    seg = segment(ids, mask)
    assert seg.num_sentences.tolist() == [2, 0]
    assert PAD not in seg.sentences[seg.token_index >= 0].tolist()


token_streams = st.lists(
    st.lists(st.sampled_from([DOT, NEWLINE, EOS, *CONTINUATIONS, 10, 11, 12, 40]), min_size=0, max_size=40),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(rows=token_streams, max_len=st.integers(1, 12), left=st.booleans())
def test_lossless_on_random_streams(rows, max_len, left):
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids, mask = left_pad(tensors)
    if not left:  # right padding: flip each row's real tokens to the front
        ids, mask = torch.stack([torch.roll(i, -int((m == 0).sum())) for i, m in zip(ids, mask)]), mask.flip(1)
    seg = segment(ids, mask, max_len)
    for joined, real in rows_back(ids, mask, seg):
        assert torch.equal(joined, real)
    assert seg.lengths.numel() == 0 or int(seg.lengths.max()) <= max_len
    # token_index points back at the very input positions, in order
    for b in range(ids.shape[0]):
        index = seg.token_index[b][seg.token_index[b] >= 0]
        assert torch.equal(index, mask[b].nonzero().flatten())


@pytest.mark.smollm2
def test_lossless_on_real_text(smollm2):
    llm, tokenizer = smollm2
    from modeling_sllm import sentence_boundary_token_ids

    boundary = sentence_boundary_token_ids(tokenizer)
    tables = [token_table(boundary[name], len(tokenizer)) for name in BOUNDARIES]
    for path in REAL_TEXT:
        lines = path.read_text().splitlines()[:64]
        batch = tokenizer(lines, return_tensors="pt", padding=True, padding_side="left")
        seg = segment_sentences(batch.input_ids, batch.attention_mask, *tables, max_sentence_len=64)
        for joined, real in rows_back(batch.input_ids, batch.attention_mask, seg):
            assert torch.equal(joined, real)
        assert tokenizer.decode(seg.sentences[0, 0, : seg.lengths[0, 0]]).rstrip().endswith((".", "!", "?", ";", ":"))
        assert 8 < seg.lengths[seg.lengths > 0].float().mean() < 40  # sentence-sized, not clause-sized


class CountOps(TorchDispatchMode):
    """Counts the torch operations run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_vectorised_no_python_loop_over_batch():
    """The same torch operations, as many of each, for 2 short rows and for 16 long ones with many
    sentences: a loop over rows or sentences would run its body's operations once per item. And the
    batch gives each row's sentences as it alone would."""
    counts = []
    for batch, length in ((2, 6), (16, 40)):
        ids, mask = left_pad([random_text(1, length - i % 5, seed=i)[0] for i in range(batch)])
        with CountOps() as counter:
            seg = segment(ids, mask)
        assert batch == 2 or int(seg.num_sentences.min()) > 3  # many sentences per row
        counts.append(counter.ops)
    assert counts[0] == counts[1]
    ids, mask = left_pad([torch.tensor([10, DOT, 11, 12, DOT, 13]), torch.tensor([14, 15, DOT])])
    batched = segment(ids, mask)
    for b in range(2):
        single = segment(ids[b : b + 1, mask[b].bool()])
        n = single.sentences.shape[1]
        assert torch.equal(batched.sentences[b, :n, : single.sentences.shape[2]], single.sentences[0])
        assert torch.equal(batched.lengths[b, :n], single.lengths[0]) and not batched.lengths[b, n:].any()
