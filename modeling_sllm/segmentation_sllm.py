"""Lossless, vectorised sentence segmentation of token batches.

A sentence ends after a token whose text ends with a newline, a CJK 。！？；, or after the eos
token; and after a token whose text ends with . ! ? ; unless the next token is glued to it
(starts with a letter or digit and no space, as in "3.14" or "os.path"). The colon and the comma end
a unit only with `SLLMConfig.sentence_unit="clause"` (glued tokens kept together: "3,000"); with "fixed",
units are `max_sentence_len` tokens and only eos ends one early. The rule reads only the config's three
lists of token ids, which `sentence_boundary_token_ids(tokenizer, unit)` derives. Text after the last sentence end
is kept as a final sentence, and a sentence longer than `max_sentence_len` is cut into
pieces of that length. Padding (attention_mask == 0) belongs to no sentence; bos and eos
are ordinary tokens of the sentence they stand in. Every other token lands in exactly one
sentence, in order: concatenating the sentences gives back the input.

The rule is stated once, in `SegmentationRule`: `segment` applies it to a text, `ends` to a
sentence being written (what may follow its last token), and the two sentence-end strategies of
the Sentence Decoder (`LearnedSentenceEnd`, `RuleSentenceEnd`) read it from there.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

HARD_TERMINATORS = ("\n", "\r", "。", "！", "？", "；")  # end a sentence whatever follows
PUNCTUATION_TERMINATORS = (".", "!", "?", ";")  # end it unless a glued token follows
CLAUSE_TERMINATORS = PUNCTUATION_TERMINATORS + (",", ":")  # sentence_unit="clause"


def sentence_boundary_token_ids(tokenizer, unit: str = "sentence") -> dict[str, list[int]]:
    """Derive the SLLMConfig boundary fields from any tokenizer's vocabulary for `unit` (see
    `SLLMConfig.sentence_unit`): `sentence_end_token_ids`, `punctuation_end_token_ids` and
    `continuation_token_ids`.

    Each token is decoded after a fixed anchor token, so tokenizers that mark a leading space
    inside the token (byte-level BPE "Ġ", SentencePiece "▁") are read the same way.
    """
    if unit == "fixed":  # only the text's end ends a unit early
        ends = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return {"sentence_end_token_ids": ends, "punctuation_end_token_ids": [], "continuation_token_ids": []}
    if unit not in ("sentence", "clause"):
        raise ValueError(f"unit must be 'sentence', 'clause' or 'fixed', got {unit!r}")
    terminators = CLAUSE_TERMINATORS if unit == "clause" else PUNCTUATION_TERMINATORS
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    anchor_text = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode(
        [anchor + [i] for i in range(vocab_size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    special = set(tokenizer.all_special_ids)
    ends, punctuation_ends, continuations = [], [], []
    for token_id, text in enumerate(texts):
        text = text[len(anchor_text) :]
        if token_id in special or not text:
            continue
        if text.rstrip(" \t").endswith(HARD_TERMINATORS):
            ends.append(token_id)
        elif text.endswith(terminators):
            punctuation_ends.append(token_id)
        elif text[0].isalnum():
            continuations.append(token_id)
    if tokenizer.eos_token_id is not None:
        ends.append(tokenizer.eos_token_id)
    return {
        "sentence_end_token_ids": sorted(set(ends)),
        "punctuation_end_token_ids": punctuation_ends,
        "continuation_token_ids": continuations,
    }


@dataclass
class Segmentation:
    """Sentences of a token batch. S = most sentences in a row, L = longest sentence."""

    sentences: torch.LongTensor  # [B, S, L] token ids, `pad_token_id` after each sentence's end
    lengths: torch.LongTensor  # [B, S] tokens per sentence, 0 for padding sentences
    token_index: torch.LongTensor  # [B, S, L] column of each token in the input, -1 for padding

    @property
    def num_sentences(self) -> torch.LongTensor:  # [B]
        return (self.lengths > 0).sum(-1)

    @property
    def sentence_mask(self) -> torch.BoolTensor:  # [B, S]
        return self.lengths > 0

    @property
    def last_tokens(self) -> torch.LongTensor:  # [B, S] each sentence's last token (padding sentences: their pad)
        return self.sentences.gather(-1, (self.lengths - 1).clamp(min=0)[..., None])[..., 0]

    def gather(self, values: torch.Tensor, fill_value: int) -> torch.Tensor:
        """Segment another [B, T] tensor (e.g. labels) like the input: [B, T] -> [B, S, L]."""
        batch, num_sentences, max_len = self.token_index.shape
        flat_index = self.token_index.clamp(min=0).view(batch, -1)  # [B, S*L]
        out = values.gather(1, flat_index).view(batch, num_sentences, max_len)
        return out.masked_fill(self.token_index < 0, fill_value)


def token_table(token_ids: list[int], vocab_size: int) -> torch.BoolTensor:
    """[vocab] boolean lookup table of `token_ids`."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[list(token_ids)] = True
    return table


def ends_after(
    tokens: torch.LongTensor, is_sentence_end: torch.BoolTensor, is_punctuation_end: torch.BoolTensor
) -> tuple[torch.BoolTensor, torch.BoolTensor]:
    """The rule at one token [...]: (a sentence ends after it whatever follows, it ends after it unless
    the next token is glued). The two are exclusive."""
    hard = is_sentence_end[tokens]
    return hard, is_punctuation_end[tokens] & ~hard


def segment_sentences(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    is_sentence_end: torch.BoolTensor,
    is_punctuation_end: torch.BoolTensor,
    is_continuation: torch.BoolTensor,
    max_sentence_len: int,
    pad_token_id: int = 0,
) -> Segmentation:
    """Split a token batch [B, T] (left or right padded) into sentences [B, S, L].

    `is_sentence_end`, `is_punctuation_end` and `is_continuation` are [vocab] lookup tables. No Python loop over
    the batch: boundaries, sentence indices and token offsets come from cumulative sums.
    """
    batch, seq_len = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    # Move each row's real tokens to the front, keeping their order (handles left padding).
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # [B, T]
    ids = input_ids.gather(1, order)  # [B, T]
    row_len = real.sum(1, keepdim=True)  # [B, 1]
    pos = torch.arange(seq_len, device=device).expand(batch, seq_len)  # [B, T]
    valid = pos < row_len

    next_ids = torch.roll(ids, shifts=-1, dims=1)  # [B, T], last column is wrapped and ignored
    is_last = pos == row_len - 1
    hard, punctuation = ends_after(ids, is_sentence_end, is_punctuation_end)  # [B, T] each
    boundary = valid & (is_last | hard | (punctuation & ~is_continuation[next_ids]))
    starts = valid & torch.cat([torch.ones_like(boundary[:, :1]), boundary[:, :-1]], dim=1)

    # Offset of each token inside its punctuation-delimited sentence, then cut long ones.
    sentence_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    offset = pos - sentence_start
    piece_start = valid & (offset % max_sentence_len == 0)
    sentence_idx = piece_start.cumsum(1) - 1  # [B, T]
    token_idx = offset % max_sentence_len  # [B, T]

    # the shape [S, L] in one device-to-host copy; then every real token is scattered to its slot, the
    # padding ones to one slot past the end (no boolean indexing: no more syncs)
    num_sentences, max_len = (
        torch.stack([piece_start.sum(1).max(), (token_idx + 1).masked_fill(~valid, 0).max()]).tolist()
        if batch * seq_len
        else (0, 0)
    )
    slots = batch * num_sentences * max_len
    rows = torch.arange(batch, device=device)[:, None]  # [B, 1]
    slot = torch.where(valid, (rows * num_sentences + sentence_idx) * max_len + token_idx, slots)  # [B, T]
    token_index = torch.full((slots + 1,), -1, dtype=torch.long, device=device)
    token_index = token_index.scatter(0, slot.view(-1), order.view(-1))[:slots].view(batch, num_sentences, max_len)

    segmentation = Segmentation(sentences=torch.empty(0), lengths=(token_index >= 0).sum(-1), token_index=token_index)
    segmentation.sentences = segmentation.gather(input_ids, pad_token_id)
    return segmentation


class RuleEnds(NamedTuple):
    """Where the rule ends a sentence being written, per position [M]."""

    hard: torch.BoolTensor  # it ends here whatever comes next (a hard end, or max_sentence_len tokens)
    punctuation: torch.BoolTensor  # it ends here unless the next token is glued to the last one
    full: torch.BoolTensor  # it has max_sentence_len tokens (part of `hard`)
    # no token yet, and the sentence before ended by punctuation: a glued token cannot open it (it would
    # have continued that sentence), so each text has one segmentation and one probability
    unglued_start: torch.BoolTensor


class SegmentationRule(nn.Module):
    """The segmentation rule of a model: its boundary lookup tables ([V] non-persistent buffers filled
    from the config's `*_token_ids` fields) and `max_sentence_len`, read from the config when used."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        vocab_size = config.text_config.vocab_size
        for name in ("is_sentence_end", "is_punctuation_end", "is_continuation"):
            self.register_buffer(name, torch.zeros(vocab_size, dtype=torch.bool), persistent=False)

    def tables_from_config(self) -> dict[str, torch.BoolTensor]:
        """The lookup tables the config's token-id lists define, by buffer name."""
        vocab_size, config = self.config.text_config.vocab_size, self.config
        return {
            "is_sentence_end": token_table(config.sentence_end_token_ids, vocab_size),
            "is_punctuation_end": token_table(config.punctuation_end_token_ids, vocab_size),
            "is_continuation": token_table(config.continuation_token_ids, vocab_size),
        }

    def segment(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> Segmentation:
        """Split a token batch [B, T] into sentences [B, S, L] (lossless)."""
        return segment_sentences(
            input_ids, attention_mask, self.is_sentence_end, self.is_punctuation_end, self.is_continuation,
            self.config.max_sentence_len,
        )  # fmt: skip

    def ends(
        self,
        previous: torch.LongTensor,
        length: torch.LongTensor,
        before: torch.LongTensor | None = None,
        before_len: torch.LongTensor | None = None,
    ) -> RuleEnds:
        """The rule for a sentence being written, from its last token [M] (-1: none yet) and its length [M];
        for one with no token yet, the last token [M] (-1: none) and length [M] of the sentence before it."""
        known = previous >= 0
        hard, punctuation = ends_after(previous.clamp(min=0), self.is_sentence_end, self.is_punctuation_end)
        full = length >= self.config.max_sentence_len
        unglued_start = torch.zeros_like(full)
        if before is not None:  # the sentence before ended by punctuation: it was not cut at the length limit
            unglued_start = self.ends(before, before_len).punctuation & (length == 0)
        return RuleEnds(
            hard=(hard & known) | full, punctuation=punctuation & known & ~full, full=full, unglued_start=unglued_start
        )

    def is_open(self, last: torch.LongTensor, length: torch.LongTensor) -> torch.BoolTensor:
        """Whether a text's last sentence [M] (its last token, its length; 0: no sentence) may go on: the
        rule has not surely ended it (after . ! ? ; a glued token would continue it), so what follows is
        decided by writing it on."""
        ends = self.ends(last.masked_fill(length == 0, -1), length)
        return (length > 0) & ~ends.hard


def unglued_start_log_probs(log_probs: torch.Tensor, starts: torch.BoolTensor, glued: torch.BoolTensor) -> torch.Tensor:
    """Token log-probs [M, C] with the rows that open a sentence after a punctuation end (`starts` [M])
    restricted to the tokens that do not glue (`glued` [C]) and renormalised."""
    unglued = log_probs.masked_fill(glued, -math.inf)
    unglued = unglued - torch.logsumexp(unglued, dim=-1, keepdim=True)
    return torch.where(starts[:, None], unglued, log_probs)


class LearnedSentenceEnd(nn.Linear):
    """Sentence end learned by the decoder: a head (H -> 1) that scores "end of sentence" as one more
    class at every position. The rule only closes a sentence at max_sentence_len tokens."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)

    def class_logits(self, states, token_logits, ends: RuleEnds, glued: torch.BoolTensor) -> torch.Tensor:
        """states [M, H], token_logits [M, C] -> [M, C+1], the end last."""
        return torch.cat([token_logits, super().forward(states)], dim=-1)

    def target_log_probs(self, states, token_logits, ends: RuleEnds, glued, classes) -> torch.Tensor:
        """The log-probability [M] of class `classes` [M] (C: the end) under `class_logits`."""
        logits = self.class_logits(states, token_logits, ends, glued).float()  # [M, C+1]
        return F.log_softmax(logits, dim=-1).gather(1, classes[:, None])[:, 0]

    def may_end(self, ends: RuleEnds) -> torch.BoolTensor:
        """Whether the sentence end is a decision to pay where a text is cut [M]: always."""
        return torch.ones_like(ends.hard)

    def must_end(self, ends: RuleEnds) -> torch.BoolTensor:
        """Where generation closes a sentence without asking the decoder [M]: at max_sentence_len."""
        return ends.full


class RuleSentenceEnd(nn.Module):
    """Sentence end decided by the segmentation rule, as a distribution (vocab + 1 classes, log-probs):
    certain after a hard end or at max_sentence_len (every token -inf), impossible after an ordinary
    token, and after . ! ? ; it takes the mass of the tokens that would not glue (those are then -inf;
    glued ones continue the sentence). The first token after such an end is one that does not glue (the
    others renormalised). Exact: the decoder never learns or mis-predicts an end, and a text has one
    segmentation, so its token-level distribution exists (see token_logits.py)."""

    def class_logits(self, states, token_logits, ends: RuleEnds, glued: torch.BoolTensor) -> torch.Tensor:
        """states [M, H], token_logits [M, C], glued [C] (which columns glue to punctuation) -> [M, C+1]."""
        log_probs = unglued_start_log_probs(F.log_softmax(token_logits.float(), dim=-1), ends.unglued_start, glued)
        forbidden = ends.hard[:, None] | (ends.punctuation[:, None] & ~glued)  # [M, C]
        end = self.end_log_probs(log_probs, ends, glued)  # [M]
        return torch.cat([log_probs.masked_fill(forbidden, -math.inf), end[:, None]], dim=-1)

    def target_log_probs(self, states, token_logits, ends: RuleEnds, glued, classes) -> torch.Tensor:
        """The log-probability [M] of class `classes` [M] (C: the end) under `class_logits`, without building
        its [M, C+1] distribution (the loss reads one class per row)."""
        log_probs = F.log_softmax(token_logits.float(), dim=-1)  # [M, C]
        is_end, token = classes == log_probs.shape[-1], classes.clamp(max=log_probs.shape[-1] - 1)
        allowed = ~ends.hard & (~ends.punctuation | glued[token]) & ~(ends.unglued_start & glued[token])  # [M]
        token_log_probs = log_probs.gather(1, token[:, None])[:, 0].masked_fill(~allowed, -math.inf)
        # The mass of the tokens that do not glue: an end after punctuation is it, a sentence opening after one is
        # renormalised by it. Only those few rows of a training batch's thousands, picked in one gather (one
        # device read; on CPU the 192x5 pair's training step was ~25% faster than with it for every row).
        reads = (is_end & ends.punctuation) | ends.unglued_start  # [M]
        unglued = torch.full_like(token_log_probs, -math.inf).masked_scatter(
            reads, torch.logsumexp(log_probs[reads][:, ~glued], dim=-1)
        )  # [M]
        end = torch.where(ends.hard, 0.0, torch.where(ends.punctuation, unglued, -math.inf))
        token_log_probs = torch.where(ends.unglued_start, token_log_probs - unglued, token_log_probs)
        return torch.where(is_end, end, token_log_probs)

    @staticmethod
    def end_log_probs(log_probs: torch.Tensor, ends: RuleEnds, glued: torch.BoolTensor) -> torch.Tensor:
        """log_probs [M, C] of the tokens -> the sentence end's [M]: 0 after a hard end, -inf after an ordinary
        token, after . ! ? ; the mass of the tokens that would start a new sentence (the ones not glued)."""
        end = torch.where(ends.hard, 0.0, -math.inf)  # [M]
        return torch.where(ends.punctuation, torch.logsumexp(log_probs.masked_fill(glued, -math.inf), -1), end)

    def may_end(self, ends: RuleEnds) -> torch.BoolTensor:
        """Where a text is cut, the end is paid only if the rule could end the sentence there [M]."""
        return ends.hard | ends.punctuation

    def must_end(self, ends: RuleEnds) -> torch.BoolTensor:
        """Where generation closes a sentence without a decoder step [M]: wherever the rule must end it."""
        return ends.hard
