"""Lossless, vectorised sentence segmentation of token batches.

A sentence ends after a token whose text ends with a newline, a CJK 。！？；, or after the eos
token; and after a token whose text ends with . ! ? ; unless the next token is glued to it
(starts with a letter or digit and no space, as in "3.14" or "os.path"). The colon and the comma do not end sentences:
in technical prose they introduce lists, code and clauses, and splitting there would make
"sentences" too short to be worth one LLM position each. Text after the last sentence end
is kept as a final sentence, and a sentence longer than `max_sentence_len` is cut into
pieces of that length. Padding (attention_mask == 0) belongs to no sentence; bos and eos
are ordinary tokens of the sentence they stand in. Every other token lands in exactly one
sentence, in order: concatenating the sentences gives back the input.
"""

from dataclasses import dataclass

import torch

HARD_TERMINATORS = ("\n", "\r", "。", "！", "？", "；")  # end a sentence whatever follows
PUNCTUATION_TERMINATORS = (".", "!", "?", ";")  # end it unless a glued token follows


def sentence_boundary_token_ids(tokenizer) -> dict[str, list[int]]:
    """Derive the SLLMConfig boundary fields from any tokenizer's vocabulary:
    `sentence_end_token_ids`, `punctuation_end_token_ids` and `continuation_token_ids`.

    Each token is decoded after a fixed anchor token, so tokenizers that mark a leading space
    inside the token (byte-level BPE "Ġ", SentencePiece "▁") are read the same way.
    """
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
        elif text.endswith(PUNCTUATION_TERMINATORS):
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

    def gather(self, values: torch.Tensor, fill_value: int) -> torch.Tensor:
        """Segment another [B, T] tensor (e.g. labels) like the input: [B, T] -> [B, S, L]."""
        batch, num_sentences, max_len = self.token_index.shape
        flat_index = self.token_index.clamp(min=0).view(batch, -1)  # [B, S*L]
        out = values.gather(1, flat_index).view(batch, num_sentences, max_len)
        return out.masked_fill(self.token_index < 0, fill_value)


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
    punctuation_boundary = is_punctuation_end[ids] & ~is_continuation[next_ids]
    boundary = valid & (is_last | is_sentence_end[ids] | punctuation_boundary)
    starts = valid & torch.cat([torch.ones_like(boundary[:, :1]), boundary[:, :-1]], dim=1)

    # Offset of each token inside its punctuation-delimited sentence, then cut long ones.
    sentence_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    offset = pos - sentence_start
    piece_start = valid & (offset % max_sentence_len == 0)
    sentence_idx = piece_start.cumsum(1) - 1  # [B, T]
    token_idx = offset % max_sentence_len  # [B, T]

    num_sentences = int(piece_start.sum(1).max()) if batch else 0
    max_len = int(token_idx[valid].max()) + 1 if bool(valid.any()) else 0
    token_index = torch.full((batch, num_sentences, max_len), -1, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None].expand(batch, seq_len)
    token_index[rows[valid], sentence_idx[valid], token_idx[valid]] = order[valid]

    segmentation = Segmentation(sentences=torch.empty(0), lengths=(token_index >= 0).sum(-1), token_index=token_index)
    segmentation.sentences = segmentation.gather(input_ids, pad_token_id)
    return segmentation
