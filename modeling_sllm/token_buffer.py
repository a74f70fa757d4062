"""The token buffer of a generate call (`SentenceWriter`): prompts and new tokens, where each row's current and
last finished sentences lie, and the views of it that the decoder, the processors and the output read."""

import torch
import torch.nn.functional as F

from .cache_surgery import pad_columns, right_align
from .sentence_vae import token_window


class SentenceWriter:
    """The token buffer of a generate call, [B, P + max_new_tokens]: the prompts (left padded), then each
    row's new tokens; each row is writing one sentence after its finished ones. A row whose last prompt
    sentence is unfinished continues it: that sentence lies in one piece just before column P."""

    def __init__(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        open_len: torch.LongTensor,
        before_len: torch.LongTensor,
        max_new_tokens: int,
        pad_id: int,
    ):
        """input_ids and attention_mask [B, P]; open_len [B]: tokens of each row's unfinished last prompt sentence
        (0: none); before_len [B]: tokens of the finished prompt sentence before the one it writes first."""
        batch, self.prompt_len = input_ids.shape
        self.pad_id = pad_id
        new = input_ids.new_full((batch, max_new_tokens), pad_id)  # [B, M]
        self.text = torch.cat([input_ids, new], 1)  # [B, P+M]
        self.real = torch.cat([attention_mask.bool(), torch.ones_like(new, dtype=torch.bool)], 1)  # [B, P+M]
        self.end = torch.full((batch,), self.prompt_len, dtype=torch.long, device=input_ids.device)  # [B]
        self.start = self.end - open_len  # [B] column where the sentence being written starts
        self.last_start = self.start - before_len  # [B] column where the last finished sentence starts

    @property
    def written(self) -> torch.LongTensor:
        """New tokens per row so far, the current sentence included: [B]."""
        return self.end - self.prompt_len

    @property
    def sentence_len(self) -> torch.LongTensor:
        """Tokens of the sentence each row is writing, its prompt tokens included: [B]."""
        return self.end - self.start

    def append(self, token: torch.LongTensor, rows: torch.BoolTensor) -> None:
        """Write token [B] at the end of each row in `rows`."""
        column = self.end.clamp(max=self.text.shape[1] - 1)[:, None]
        self.text.scatter_(1, column, torch.where(rows, token, self.text.gather(1, column)[:, 0])[:, None])
        self.end = self.end + rows.long()

    def tokens_so_far(self) -> tuple[torch.LongTensor, torch.BoolTensor, torch.BoolTensor]:
        """The buffer [B, T] and which of its columns hold each row's tokens so far: prompt and new [B, T], new [B, T]."""
        columns = torch.arange(self.text.shape[1], device=self.text.device)  # [T]
        written = columns < self.end[:, None]  # [B, T]
        return self.text, self.real & written, written & (columns >= self.prompt_len)

    def last_token(self) -> torch.LongTensor:
        """Each row's last token [B] (meaningless for a row whose sentence has none yet)."""
        return self.text.gather(1, (self.end - 1).clamp(min=0)[:, None])[:, 0]

    def token_before(self) -> torch.LongTensor:
        """The last real token before each row's current sentence [B] (-1: none)."""
        column = (self.start - 1).clamp(min=0)[:, None]
        real = self.real.gather(1, column)[:, 0] & (self.start > 0)
        return self.text.gather(1, column)[:, 0].masked_fill(~real, -1)

    def current(self, width: int) -> torch.LongTensor:
        """The sentence each row is writing, [B, width] (pad after each row's end; width >= its length)."""
        return self.sentences(self.text, self.start, self.sentence_len, width)

    def last_sentences(self, rows: torch.LongTensor, width: int) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The last finished sentence of rows [N], prompt tokens included: tokens [N, width] and lengths [N]."""
        start = self.last_start[rows]
        lengths = self.start[rows] - start
        return self.sentences(self.text[rows], start, lengths, width), lengths

    def sentences(
        self, text: torch.LongTensor, start: torch.LongTensor, lengths: torch.LongTensor, width: int
    ) -> torch.LongTensor:
        """Tokens of text [N, T] from column start [N], lengths [N] long, as [N, width] (pad after)."""
        offsets = torch.arange(width, device=start.device)
        columns = (start[:, None] + offsets).clamp(max=text.shape[1] - 1)  # [N, width]
        return text.gather(1, columns).masked_fill(offsets >= lengths[:, None], self.pad_id)

    def window(self, width: int) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """The `width` columns of prompt + new tokens before each row's current sentence: ids and
        real [B, W], left padded (fewer real ones at the start of a text), as forward reads them."""
        ids, mask = token_window(self.text, self.real, self.start[:, None], width)  # [B, 1, W]
        return ids[:, 0], mask[:, 0]

    def close(self, rows: torch.BoolTensor) -> None:
        """The sentences that `rows` are writing are finished."""
        self.last_start = torch.where(rows, self.start, self.last_start)
        self.start = torch.where(rows, self.end, self.start)

    def left_padded(self, max_written: int) -> torch.LongTensor:
        """Prompt + new tokens as a left-padded batch [B, P + max_written]: the layout Transformers' logits
        processors and stopping criteria expect (each row's last token in the last column)."""
        width = self.prompt_len + max_written
        aligned = right_align(self.text, self.prompt_len + self.written, self.pad_id)  # [B, P+M]
        return aligned[:, self.text.shape[1] - width :]

    def sequences(self, max_written: int) -> torch.LongTensor:
        """[B, P + max_written]: prompts as given, then the new tokens, rows padded with the pad id."""
        return self.text[:, : self.prompt_len + max_written].clone()  # not a view of the whole buffer

    def join(self, other: "SentenceWriter") -> None:
        """Append other's rows: both buffers left padded to the longer prompt, right padded to the wider new part."""
        prompt_len = max(self.prompt_len, other.prompt_len)
        new = max(self.text.shape[1] - self.prompt_len, other.text.shape[1] - other.prompt_len)
        parts = [self.pad_to(writer, prompt_len, new) for writer in (self, other)]
        self.text, self.real, self.end, self.start, self.last_start = (torch.cat(pair) for pair in zip(*parts))
        self.prompt_len = prompt_len

    def pad_to(self, writer: "SentenceWriter", prompt_len: int, new: int) -> tuple[torch.Tensor, ...]:
        """writer's text, real, end, start and last_start with its buffer as [B, prompt_len + new]."""
        left, right = prompt_len - writer.prompt_len, new - (writer.text.shape[1] - writer.prompt_len)
        text = pad_columns(writer.text, left, right, self.pad_id)
        real = pad_columns(writer.real, left, right, False)
        return text, real, writer.end + left, writer.start + left, writer.last_start + left

    def keep(self, rows: torch.LongTensor, new: int) -> None:
        """Keep only rows [N], without the leading prompt columns none of them uses and the columns past `new` new
        tokens (reads one value from the device)."""
        self.text, self.real = self.text[rows], self.real[rows]
        self.end, self.start, self.last_start = self.end[rows], self.start[rows], self.last_start[rows]
        used = F.pad(self.real[:, : self.prompt_len].any(0), (0, 1), value=True)  # [P+1]: True past the prompt
        lead = int(used.int().argmax())
        self.text, self.real = self.text[:, lead : self.prompt_len + new], self.real[:, lead : self.prompt_len + new]
        self.prompt_len -= lead
        self.end, self.start, self.last_start = self.end - lead, self.start - lead, self.last_start - lead
