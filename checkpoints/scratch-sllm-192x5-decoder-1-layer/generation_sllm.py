"""Sentence-by-sentence generation with a sentence-level KV cache.

Each row of a batch moves on its own: when the stop head lets it go on, the Sentence Decoder
writes its next sentence token by token; the finished sentence is encoded to one vector and
the backbone takes one cached step for it. Rows write sentences of different lengths, so a
row that finishes early waits until enough rows are waiting (or none is writing) and they take
the backbone step together, while the other rows keep writing: decoder steps are not spent on
idle rows waiting for the longest sentence. The backbone cache holds one entry per sentence,
plus one for the start-of-document state. A prompt whose last sentence is unfinished has that
sentence continued: the decoder is fed its prompt tokens and writes the rest of it.

`generate` resolves Transformers' generation settings (`LoopSettings`), builds a `SentenceLoop` and runs
it. The loop reaches the model only through `SentenceModelParts`, which the model builds in one place
(`SLLMGenerationMixin.sentence_model_parts`).

What the decoder reads is its own `layout`, the one the teacher-forced pass reads. A row starting a
sentence feeds, in one cached step, the layout's columns up to the one that predicts its next token; a
row continuing a sentence feeds one column, its last token's (`SentenceDecoder.token_column`, the layout's column
for that token); only steps at which some row starts build a layout. Recomputing (`use_cache=False`)
runs the whole layout at every step.

A decoder step reads from the device once (`LoopStatus`, one small transfer): whether every row is done,
whether the backbone steps, and the sizes of the next step's tensors; a backbone step reads once more.
States are kept in the model's dtype (the start state's), so the loop runs with low-precision weights
and under `torch.autocast`, whose modules may return another dtype.
"""

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    MaxTimeCriteria,
    PreTrainedConfig,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.cache_utils import Cache
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPast

from .row_sampling import RowSampling
from .segmentation_sllm import Segmentation, SegmentationRule
from .sentence_vae import DecoderLayout, SentenceDecoder, token_window
from .transformers_compat import (
    layer_entries,
    logits_processors,
    prepare_generation_config,
    set_layer_entries,
    set_seen_entries,
    special_token_tensors,
)

# A backbone step waits until this share of the unfinished rows is waiting for it (or no row is
# writing). It costs several decoder steps and little less for fewer rows, so stepping rows one by
# one wastes it, while waiting for every row wastes decoder steps on the longest sentence. Of
# 0.35-1.0, 0.5 was fastest for 8 rows on SmolLM2 here (benchmarks/generation.py prompts).
BACKBONE_STEP_SHARE = 0.5

LAYOUT_FIELDS = tuple(field.name for field in dataclasses.fields(DecoderLayout))

# Options of Transformers' generate that the sentence loop does not implement, and when each is in use.
UNSUPPORTED_OPTIONS: dict[str, Callable[[object], bool]] = {
    "num_beams": lambda value: value is not None and value > 1,
    "num_beam_groups": lambda value: value is not None and value > 1,
    "diversity_penalty": bool,
    "penalty_alpha": bool,  # contrastive search
    "constraints": lambda value: value is not None,
    "force_words_ids": lambda value: value is not None,
    "dola_layers": lambda value: value is not None,
    "prompt_lookup_num_tokens": lambda value: value is not None,  # assisted generation
    "assistant_early_exit": lambda value: value is not None,
    "use_mtp": bool,
    "guidance_scale": lambda value: value not in (None, 1, 1.0),  # needs an unconditional forward pass
    "token_healing": bool,
    "prefill_chunk_size": lambda value: value is not None,
    "cache_implementation": lambda value: value not in (None, "dynamic"),
    "output_attentions": bool,
    "output_hidden_states": bool,
}


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: the keys and values of every layer."""
    entries = filter(None, (layer_entries(layer) for layer in cache.layers))
    return sum(tensor.numel() * tensor.element_size() for pair in entries for tensor in pair)


def right_align(values: torch.Tensor, lengths: torch.LongTensor, fill: float) -> torch.Tensor:
    """Move each row's first `lengths[b]` entries to the end of the row, `fill` before them.

    values [B, W, ...], lengths [B] -> [B, W, ...]: turns right padding into left padding.
    """
    batch, width = values.shape[:2]
    index = torch.arange(width, device=values.device) - (width - lengths)[:, None]  # [B, W]
    trailing = [1] * (values.dim() - 2)
    gathered = values.gather(1, index.clamp(min=0).view(batch, width, *trailing).expand_as(values))
    keep = (index >= 0).view(batch, width, *trailing)
    return torch.where(keep, gathered, fill)  # a Python scalar `fill`: no copy to the device


def drop_padding_entries(cache: Cache, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Move each row's real cache entries (mask [B, T] = 1) to the end, in order, and keep the last `width`
    columns (the most real entries of a row). Returns the new mask [B, width] (left padded)."""
    order = torch.sort(mask, dim=1, stable=True).indices  # [B, T]: padding first, then real entries
    for layer in cache.layers:
        keys, values = layer_entries(layer)
        index = order[:, None, -width:, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        set_layer_entries(layer, keys.gather(2, index), values.gather(2, index))
        set_seen_entries(layer, width)  # sliding-window layers count what they have seen
    return mask.gather(1, order)[:, -width:]


def pad_columns(values: torch.Tensor, left: int, right: int, fill: float | bool, dim: int = 1) -> torch.Tensor:
    """values with `left` and `right` entries of `fill` added along `dim` (bool tensors too, unlike F.pad)."""
    def filler(count: int) -> torch.Tensor:
        shape = list(values.shape)
        shape[dim] = count
        return values.new_full(shape, fill)

    return torch.cat([filler(left), values, filler(right)], dim)


def join_caches(first: Cache, first_rows: int, second: Cache, second_rows: int, width: int) -> Cache:
    """One cache with first's rows, then second's, each left padded with zeros to `width` entries (the caller's
    mask says which are real). A cache whose layers hold nothing yet gives zeros in its rows."""
    target = first if first.layers else second
    for index, layer in enumerate(target.layers):
        entries = [layer_entries(cache.layers[index]) if index < len(cache.layers) else None for cache in (first, second)]
        template = next((pair for pair in entries if pair is not None), None)
        if template is None:
            continue
        joined = []
        for part, like in enumerate(template):  # keys, then values [B, heads, T, D]
            rows = []
            for pair, count in zip(entries, (first_rows, second_rows)):
                held = pair[part] if pair is not None else like.new_zeros(count, like.shape[1], 0, like.shape[3])
                rows.append(pad_columns(held, width - held.shape[2], 0, 0.0, dim=2))
            joined.append(torch.cat(rows))
        set_layer_entries(layer, *joined)
        set_seen_entries(layer, width)
    return target


def keep_cache_rows(cache: Cache, rows: torch.LongTensor) -> None:
    """Keep only the batch rows `rows` [N] of every layer of a cache."""
    for layer in cache.layers:
        entries = layer_entries(layer)
        if entries is not None:
            set_layer_entries(layer, entries[0][rows], entries[1][rows])


def join_layouts(
    first: DecoderLayout | None, first_rows: int, second: DecoderLayout | None, second_rows: int
) -> DecoderLayout | None:
    """Two loops' start layouts as one: first's rows, then second's, columns right padded. A loop without one
    gives zeros, which its rows never read (none of them starts)."""
    if first is None and second is None:
        return None
    template = first if first is not None else second
    joined = {}
    for name in LAYOUT_FIELDS:  # [N, K, ...] each
        like = getattr(template, name)
        values = [
            getattr(layout, name) if layout is not None else like.new_zeros(count, 0, *like.shape[2:])
            for layout, count in ((first, first_rows), (second, second_rows))
        ]
        width = max(value.shape[1] for value in values)
        joined[name] = torch.cat([pad_columns(value, 0, width - value.shape[1], 0) for value in values])
    return DecoderLayout(**joined)


def first_rows(rows: torch.BoolTensor, count: int) -> torch.LongTensor:
    """The indices of the True entries of rows [B], in order, given their `count`: [count]. Unlike
    `rows.nonzero()`, it does not read the count from the device."""
    return torch.argsort(rows.logical_not().to(torch.uint8), stable=True)[:count]


def check_generation_options(config: GenerationConfig, model_kwargs: dict) -> None:
    """Refuse, naming them, the generate options and arguments the sentence loop does not implement."""
    refused = [name for name, in_use in UNSUPPORTED_OPTIONS.items() if in_use(getattr(config, name, None))]
    refused += [name for name, value in model_kwargs.items() if value is not None and name not in UNSUPPORTED_OPTIONS]
    if refused:
        raise ValueError(
            f"SLLMForCausalLM.generate does not support {', '.join(f'`{name}`' for name in refused)}: its sentence "
            "loop does greedy decoding and sampling, with the options listed in the README's Generation section"
        )


def new_token_budget(config: GenerationConfig, has_default_max_length: bool, prompt_len: int) -> int:
    """New tokens per row, as Transformers counts them: `max_new_tokens`; else `max_length` minus the
    (padded) prompt; else the default `max_length` (20) of new tokens, with Transformers' warning."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if has_default_max_length:
        warnings.warn(
            f"Using the model-agnostic default `max_length` (={config.max_length}) to control the generation "
            "length. We recommend setting `max_new_tokens` to control the maximum length of the generation.",
            UserWarning,
        )
        return config.max_length
    if prompt_len >= config.max_length:
        raise ValueError(
            f"Input length of input_ids is {prompt_len}, but `max_length` is set to {config.max_length}. This can "
            "lead to unexpected behavior. You should consider increasing `max_length` or, better yet, setting "
            "`max_new_tokens`."
        )
    return config.max_length - prompt_len


def unfinished_sentence_lengths(segmentation: Segmentation, rule: SegmentationRule) -> torch.LongTensor:
    """[B]: the length of each row's last prompt sentence if it may go on, else 0.

    It may go on unless its last token is a hard sentence end or it has max_sentence_len tokens (a full
    piece is closed, as generation closes one): after . ! ? ; the decoder decides between the end and a
    glued token, as when it wrote the punctuation itself.
    """
    lengths = segmentation.lengths  # [B, S]
    if lengths.shape[1] == 0:
        return lengths.new_zeros(lengths.shape[0])
    rows = torch.arange(lengths.shape[0], device=lengths.device)
    last = (segmentation.num_sentences - 1).clamp(min=0)  # [B]
    length = lengths[rows, last]  # [B], 0 for empty rows
    token = segmentation.sentences[rows, last, (length - 1).clamp(min=0)]  # [B]
    return length * rule.is_open(token, length)


@dataclass(frozen=True)
class SentenceModelParts:
    """What the sentence loop uses of an SLLM: its whole interface to the model, built by the model in one
    place (`SLLMGenerationMixin.sentence_model_parts`)."""

    text_config: PreTrainedConfig  # the backbone's config (its vocabulary; its cache layers)
    decoder_window: int  # tokens before a sentence that the Sentence Decoder reads
    segmentation_rule: SegmentationRule  # splits prompts; where sentences end
    sentence_decoder: SentenceDecoder
    decoder_layers: nn.Module | None  # the backbone's decoder when the Sentence Decoder shares it, else None
    embed_tokens: nn.Module  # token ids [...] -> embeddings [..., H]
    lm_head: nn.Module  # decoder states [N, H] -> token logits [N, V]
    stop_head: nn.Module  # backbone states [N, H] -> [N, 2]: another sentence follows, or the text ends
    encode_sentences: Callable[[torch.LongTensor, torch.LongTensor], torch.Tensor]  # [N, L], [N] -> [N, H]
    run_backbone: Callable[..., BaseModelOutputWithPast]  # (vectors [B, S, H], mask [B, past + S], cache, use_cache)
    start_states: Callable[[int, torch.device], torch.Tensor]  # (batch, device) -> start-of-document [B, 1, H]
    backbone_positions: int | None  # the backbone's learned absolute positions (GPT-2, OPT), else None


@dataclass
class LoopSettings:
    """What a generate call asked for, resolved once."""

    max_new_tokens: int
    min_new_tokens: int
    max_new_sentences: int | None
    do_sample: bool
    use_cache: bool
    eos: torch.LongTensor  # [E] token ids that end the text
    pad_id: int
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    streamer: BaseStreamer | None
    output_scores: bool
    output_logits: bool
    return_dict: bool


class LoopStatus(NamedTuple):
    """What the host needs to drive the loop's next steps, read from the device in one transfer."""

    done: bool  # every row is done
    backbone_due: bool  # the waiting rows take their backbone step now
    writing: int  # rows writing a sentence
    start_width: int  # the most columns a row starting a sentence feeds at the next decoder step (0: none starts)
    drop: int  # leading decoder-cache columns no row reads any more
    max_written: int  # new tokens of the row with the most
    sentence_width: int  # tokens of the longest sentence being written
    waiting: int  # rows waiting for the backbone
    waiting_width: int  # tokens of the longest sentence waiting for the backbone
    backbone_width: int  # entries of the backbone's fullest row after the next backbone step
    stream_start: int  # row 0's sentence finished at the last step: its new tokens' columns [start, end)
    stream_end: int  # (end <= start: none)


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


class DecoderSteps:
    """The Sentence Decoder's cache while rows write sentences that start at different steps.

    One DynamicCache whose columns are decoder steps, all rows at once; each row attends only to the
    columns of the sentence it is writing (`mask` [B, T]) at its own positions. A row starting a sentence
    feeds its layout's columns up to the one that predicts its next token (`start`), a row continuing one
    feeds one column. The leading columns no row attends to any more are dropped before each step (a
    slice: the cache's next update copies it anyway), so a batch of one holds at most one sentence's layout.
    """

    def __init__(self, batch: int, device: torch.device):
        self.cache = DynamicCache()
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)  # [B, T]
        self.position = torch.zeros(batch, dtype=torch.long, device=device)  # [B] each row's next column's
        self.start_layout: DecoderLayout | None = None  # [B, K, ...] the starting rows' layouts
        self.start_count = torch.zeros(batch, dtype=torch.long, device=device)  # [B] columns each feeds, 0: none
        self.drop = torch.zeros((), dtype=torch.long, device=device)  # leading columns no row reads any more

    def start(self, layout: DecoderLayout, rows: torch.BoolTensor, length: torch.LongTensor) -> None:
        """`rows` [B] start a sentence of `length` [B] tokens so far (those of an unfinished prompt
        sentence): at the next step they feed `layout`'s columns up to the one that predicts the next."""
        predictor = layout.predictors.gather(1, length[:, None])[:, 0]  # [B]
        self.start_layout, self.start_count = layout, (predictor + 1) * rows

    def release(self, writing: torch.BoolTensor) -> None:
        """Rows not `writing` [B] forget their columns and feed their placeholder at position 0 (a row that
        is done would otherwise walk past the decoder's positions); count the leading columns no row reads."""
        self.mask = self.mask * writing[:, None]
        self.position = self.position * writing
        self.count_unused()

    def count_unused(self) -> None:
        """Count the leading columns no row reads any more (`drop`)."""
        used = F.pad(self.mask.any(0), (0, 1), value=True)  # [T+1]: True past the last column
        self.drop = used.int().argmax()

    def join(self, other: "DecoderSteps") -> None:
        """Append other's rows: columns left padded to the wider cache (padding no row reads)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        rows = len(self.position), len(other.position)
        self.cache = join_caches(self.cache, rows[0], other.cache, rows[1], width)
        self.mask = torch.cat([pad_columns(steps.mask, width - steps.mask.shape[1], 0, 0) for steps in (self, other)])
        self.position = torch.cat([self.position, other.position])
        self.start_count = torch.cat([self.start_count, other.start_count])
        self.start_layout = join_layouts(self.start_layout, rows[0], other.start_layout, rows[1])
        self.count_unused()

    def keep(self, rows: torch.LongTensor) -> None:
        """Keep only rows [N]."""
        keep_cache_rows(self.cache, rows)
        self.mask, self.position, self.start_count = self.mask[rows], self.position[rows], self.start_count[rows]
        if self.start_layout is not None:
            layout = self.start_layout
            self.start_layout = DecoderLayout(**{name: getattr(layout, name)[rows] for name in LAYOUT_FIELDS})
        self.count_unused()

    def feed(
        self,
        decoder: SentenceDecoder,
        layers: nn.Module | None,
        column: torch.Tensor,
        start_width: int,
        drop: int,
    ) -> torch.Tensor:
        """One cached step after dropping `drop` leading columns: starting rows feed their start columns
        (`start_width` at most, 0: no row starts), the others `column` [B, 1, H], their last token's (idle
        rows: a placeholder that only they attend to, forgotten after the step); `layers`: the backbone's
        decoder if the Sentence Decoder shares it. Returns each row's state that predicts its next token, [B, H]."""
        if drop:
            for layer in self.cache.layers:
                keys, values = layer_entries(layer)
                set_layer_entries(layer, keys[:, :, drop:], values[:, :, drop:])
            self.mask = self.mask[:, drop:]
        width = max(start_width, 1)  # K
        offsets = torch.arange(width, device=column.device)  # [K]
        inputs = F.pad(column, (0, 0, 0, width - 1))  # [B, K, H]: padding after a continuing row's column
        positions = self.position[:, None] + offsets  # [B, K]
        fed = (offsets == 0).expand(len(column), -1)  # [B, K]
        count = torch.ones_like(self.start_count)  # [B] columns fed
        if start_width:
            starting, layout = self.start_count > 0, self.start_layout
            inputs = torch.where(starting[:, None, None], layout.inputs[:, :width], inputs)
            positions = torch.where(starting[:, None], layout.positions[:, :width], positions)
            starts = (offsets < self.start_count[:, None]) & layout.mask[:, :width].bool()
            fed = torch.where(starting[:, None], starts, fed)
            count = torch.where(starting, self.start_count, count)
        self.start_layout, self.start_count = None, torch.zeros_like(self.start_count)
        self.mask = torch.cat([self.mask, fed.long()], 1)  # [B, T+K]
        states = decoder.step(inputs, positions, self.mask, self.cache, layers=layers).last_hidden_state  # [B, K, H]
        last = (count - 1)[:, None]  # [B, 1]
        self.position = positions.gather(1, last)[:, 0] + 1
        return states.gather(1, last[..., None].expand(-1, -1, states.shape[-1]))[:, 0]


@dataclass
class SLLMGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s output with `return_dict_in_generate=True`: Transformers' fields (`cache` is the
    backbone's sentence-level cache) and `peak_cache_bytes`, the most bytes held at once by every cache
    of the call: the backbone's sentence cache and the Sentence Decoder's cache (its window and the
    sentence being written). 0 with `use_cache=False` (nothing is cached)."""

    peak_cache_bytes: int | None = None


# The loop's per-row tensors [B, ...] beyond its writer, caches and eos ids (continuous batching joins and keeps them).
ROW_FIELDS = (
    "budget", "min_new", "done", "fresh", "writing", "starting", "waiting", "finished", "new_sentences", "state",
    "condition",
)  # fmt: skip


class SentenceLoop:
    """A generate call's sentence loop, all rows at once: built on the prompts (it reads them), then `run`.

    Each unfinished row is in one phase: `fresh` (a new backbone state: decide whether the text
    ends), `writing` a sentence (`starting` it at the next step), or `waiting` (its sentence is written,
    not yet read by the backbone).
    """

    def __init__(
        self,
        model: SentenceModelParts,
        settings: LoopSettings,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        budget: torch.LongTensor | None = None,
        eos: torch.LongTensor | None = None,
        min_new: torch.LongTensor | None = None,
        sampling: RowSampling | None = None,
    ):
        """Read the prompts [B, P]: their finished sentences through the backbone in one pass; rows whose
        last sentence is unfinished start by continuing it, the others by asking the stop head. Each row's
        new-token budget [B] (at most `settings.max_new_tokens`), eos ids [B, E] (-1: none) and least new tokens
        [B] default to the settings'; `sampling` gives each row its own sampling settings (continuous batching),
        else the settings' processors and `do_sample` apply to all."""
        self.model, self.settings = model, settings
        if settings.streamer is not None:
            settings.streamer.put(input_ids.cpu())
        segmentation = model.segmentation_rule.segment(input_ids, attention_mask)
        batch, device = input_ids.shape[0], input_ids.device
        open_len = unfinished_sentence_lengths(segmentation, model.segmentation_rule)  # [B]
        last = (segmentation.num_sentences - 1).clamp(min=0)  # [B]
        slots = torch.arange(segmentation.lengths.shape[1], device=device)  # [S]
        finished = segmentation.sentence_mask & ((slots < last[:, None]) | (open_len == 0)[:, None])  # [B, S]
        self.read_prompt(segmentation, finished)
        rows = torch.arange(batch, device=device)
        before = (last - (open_len > 0).long()).clamp(min=0)  # [B] the last finished prompt sentence
        before_len = segmentation.lengths[rows, before] * finished[rows, before] if finished.shape[1] else open_len * 0
        self.writer = SentenceWriter(
            input_ids, attention_mask, open_len, before_len, settings.max_new_tokens, settings.pad_id
        )
        self.decoder_steps = DecoderSteps(batch, device) if self.cache is not None else None
        self.budget = torch.full((batch,), settings.max_new_tokens, device=device) if budget is None else budget
        self.eos = settings.eos.expand(batch, -1) if eos is None else eos  # [B, E]
        self.min_new = torch.full_like(self.budget, settings.min_new_tokens) if min_new is None else min_new  # [B]
        self.sampling = sampling
        self.done = torch.full((batch,), settings.max_new_sentences == 0, device=device)  # [B]
        self.fresh = ~self.done & (open_len == 0)  # [B]
        self.writing = self.starting = self.waiting = self.finished = torch.zeros_like(self.done)  # [B] each
        self.condition = self.state[:, None]  # [B, 1, H] each row's decoder conditioning, set when it starts
        self.new_sentences = torch.zeros(batch, dtype=torch.long, device=device)  # [B] sentences finished
        self.scores = [] if settings.output_scores else None  # processed [B, V+1] logits per decoder step
        self.raw_logits = [] if settings.output_logits else None  # raw [B, V+1] logits per decoder step
        self.peak_cache_bytes = 0  # the most bytes every cache held at once so far
        self.start_sentences(~self.done & (open_len > 0))
        if bool(self.fresh.any()):
            self.decide_text_ends()
        self.lay_out_starts(int(open_len.max()))
        self.note_cache_bytes()

    def read_prompt(self, segmentation: Segmentation, finished: torch.BoolTensor) -> None:
        """Backbone over [start, finished prompt sentences] (finished [B, S]; at most S' in a row),
        right-aligned so every row appends in the same column: sets each row's last state [B, H], the
        backbone mask [B, S'+1], the cache and (only when recomputing) the inputs [B, S'+1, H]."""
        model, use_cache = self.model, self.settings.use_cache
        batch, positions = finished.shape[0], model.backbone_positions
        num_finished = finished.sum(1)  # [B]
        most = int(num_finished.max())
        if positions is not None and most >= positions:
            raise ValueError(
                f"a prompt has {most} finished sentences, but the backbone has {positions} positions: the start "
                f"state and at most {positions - 1} sentences"
            )
        start = model.start_states(batch, finished.device)  # [B, 1, H]
        self.dtype = start.dtype  # the loop's states stay in it, whatever autocast's modules return
        vectors = start.new_zeros(*finished.shape, start.shape[-1])  # [B, S, H]
        if most:
            sentences, lengths = segmentation.sentences[finished], segmentation.lengths[finished]  # [N, L], [N]
            vectors[finished] = model.encode_sentences(sentences, lengths).to(self.dtype)
        inputs = right_align(torch.cat([start, vectors], 1), num_finished + 1, 0.0)[:, -(most + 1) :]  # [B, S'+1, H]
        self.backbone_mask = right_align(torch.ones_like(inputs[..., 0], dtype=torch.long), num_finished + 1, 0)
        self.cache = DynamicCache(config=model.text_config) if use_cache else None
        output = model.run_backbone(inputs, self.backbone_mask, cache=self.cache, use_cache=use_cache)
        self.state = output.last_hidden_state[:, -1].to(self.dtype)  # [B, H]
        self.inputs = None if use_cache else inputs

    def run(self) -> torch.LongTensor | SLLMGenerateOutput:
        """Write until every row is done. Returns the sequences [B, P + new] (rows padded with the pad id)
        or, with `return_dict_in_generate`, the output with scores, logits, cache and peak cache bytes."""
        status = self.read_status()
        while not status.done:
            status = self.step(status)
        if self.settings.streamer is not None:
            self.settings.streamer.end()
        sequences = self.writer.sequences(status.max_written)
        if not self.settings.return_dict:
            return sequences
        return SLLMGenerateOutput(
            sequences=sequences,
            scores=None if self.scores is None else tuple(self.scores),
            logits=None if self.raw_logits is None else tuple(self.raw_logits),
            cache=self.cache,
            peak_cache_bytes=self.peak_cache_bytes,
        )

    def step(self, status: LoopStatus) -> LoopStatus:
        """One decoder step, and the backbone step if it is due. Returns the status after them."""
        self.write_step(status)
        self.note_cache_bytes()
        status = self.read_status()
        self.stream(status)
        if status.backbone_due:
            self.backbone_step(status)
            self.note_cache_bytes()
            self.decide_text_ends()
            self.lay_out_starts(0)  # a new sentence has no tokens yet
            status = self.read_status()
        return status

    def join(self, other: "SentenceLoop") -> None:
        """Take other's rows in after this loop's (continuous batching): both built with the same settings but
        their `max_new_tokens`, both caching. Caches, masks and buffers are padded to the wider of the two."""
        if self.cache is None or other.cache is None:
            raise ValueError("joining sentence loops needs the sentence cache (use_cache=True)")
        rows = len(self.done), len(other.done)
        self.writer.join(other.writer)
        width = max(self.backbone_mask.shape[1], other.backbone_mask.shape[1])
        self.cache = join_caches(self.cache, rows[0], other.cache, rows[1], width)
        self.backbone_mask = torch.cat(
            [pad_columns(loop.backbone_mask, width - loop.backbone_mask.shape[1], 0, 0) for loop in (self, other)]
        )
        self.decoder_steps.join(other.decoder_steps)
        eos_width = max(self.eos.shape[1], other.eos.shape[1])
        self.eos = torch.cat([pad_columns(loop.eos, 0, eos_width - loop.eos.shape[1], -1) for loop in (self, other)])
        for name in ROW_FIELDS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        if (self.sampling is None) != (other.sampling is None):
            raise ValueError("joining sentence loops needs both with per-row sampling settings, or neither")
        if self.sampling is not None:
            self.sampling.join(other.sampling)
        self.settings = dataclasses.replace(
            self.settings, max_new_tokens=max(self.settings.max_new_tokens, other.settings.max_new_tokens)
        )
        self.peak_cache_bytes = max(self.peak_cache_bytes, other.peak_cache_bytes)

    def keep(self, rows: torch.LongTensor) -> None:
        """Keep only rows [N] (continuous batching: the others left), dropping the cache entries and buffer
        columns none of them reads."""
        self.writer.keep(rows, int(self.budget[rows].max()))
        keep_cache_rows(self.cache, rows)
        mask = self.backbone_mask[rows]
        self.backbone_mask = drop_padding_entries(self.cache, mask, int(mask.sum(1).max()))
        self.decoder_steps.keep(rows)
        self.eos = self.eos[rows]
        for name in ROW_FIELDS:
            setattr(self, name, getattr(self, name)[rows])
        if self.sampling is not None:
            self.sampling.keep(rows.tolist())

    def read_status(self) -> LoopStatus:
        """What the next steps need to know, computed on the device and read in one transfer."""
        writer, waiting = self.writer, self.waiting
        num_waiting, unfinished = waiting.sum(), (~self.done).sum()
        due = (num_waiting > 0) & (~self.writing.any() | (num_waiting >= torch.ceil(BACKBONE_STEP_SHARE * unfinished)))
        if self.decoder_steps is None:
            start_width = drop = num_waiting.new_zeros(())
        else:
            start_width, drop = self.decoder_steps.start_count.max(), self.decoder_steps.drop
        finished_len = writer.start - writer.last_start  # [B] each row's last finished sentence
        values = [
            self.done.all(), due, self.writing.sum(), start_width, drop, writer.written.max(),
            writer.sentence_len.max(), num_waiting, (finished_len * waiting).max(),
            (self.backbone_mask.sum(1) + waiting).max(),
            writer.last_start[0].clamp(min=writer.prompt_len), writer.start[0] * self.finished[0],
        ]  # fmt: skip
        done, due, *sizes = torch.stack([value.long() for value in values]).tolist()
        return LoopStatus(bool(done), bool(due), *sizes)

    def note_cache_bytes(self) -> None:
        """Update the peak with what the backbone's and the decoder's caches hold now."""
        if self.cache is not None:
            held = cache_nbytes(self.cache) + cache_nbytes(self.decoder_steps.cache)
            self.peak_cache_bytes = max(self.peak_cache_bytes, held)

    def start_sentences(self, rows: torch.BoolTensor) -> None:
        """`rows` [B] start a sentence: the decoder is conditioned on their backbone state."""
        condition = self.model.sentence_decoder.condition(self.state).to(self.dtype)  # [B, H] -> [B, 1, H]
        self.condition = torch.where(rows[:, None, None], condition, self.condition)
        self.writing = self.writing | rows
        self.starting = self.starting | rows

    def lay_out_starts(self, width: int) -> None:
        """With the decoder cache: the starting rows' layouts, their sentences so far at most `width` tokens."""
        if self.decoder_steps is not None:
            length = self.writer.sentence_len * self.starting  # [B]
            self.decoder_steps.start(self.layout(width), self.starting, length)

    def layout(self, width: int) -> DecoderLayout:
        """What the decoder reads for the sentence each row is writing ([B, width] tokens so far at most):
        its condition, window and tokens."""
        model, writer = self.model, self.writer
        window_ids, window_real = writer.window(model.decoder_window)  # [B, W]
        embed = model.embed_tokens
        return model.sentence_decoder.layout(
            self.condition, embed(writer.current(width)), embed(window_ids), window_real
        )

    def decide_text_ends(self) -> None:
        """Fresh rows ask the stop head whether the text ends (not before min_new_tokens); the
        others start their next sentence."""
        stop_logits = self.model.stop_head(self.state).float()  # [B, 2]
        if self.sampling is not None:
            fresh = self.fresh.nonzero()[:, 0].tolist() if self.sampling.any_sampled else []
            stop = self.sampling.stop_draws(stop_logits, fresh)
        elif self.settings.do_sample:
            stop = torch.multinomial(stop_logits.softmax(-1), 1)[:, 0] == 1
        else:
            stop = stop_logits[:, 1] > stop_logits[:, 0]
        self.done |= self.fresh & stop & (self.writer.written >= self.min_new)
        self.start_sentences(self.fresh & ~self.done)
        self.fresh = torch.zeros_like(self.fresh)

    def decoder_states(self, status: LoopStatus) -> torch.Tensor:
        """One decoder step: the decoder's output state [B, H] that predicts each writing row's next
        token (idle rows: a placeholder), from the row's condition, window and sentence so far."""
        model, writer = self.model, self.writer
        decoder, layers = model.sentence_decoder, model.decoder_layers
        length = writer.sentence_len * self.writing  # [B] tokens of the sentence so far
        if self.decoder_steps is None:  # recompute the whole layout
            layout = self.layout(status.sentence_width)
            predictor = layout.predictors.gather(1, length[:, None])  # [B, 1] the column that predicts token `length`
            states = decoder.run(layout, layers)  # [B, K, H]
            return states.gather(1, predictor[..., None].expand(-1, -1, states.shape[-1]))[:, 0]
        column = decoder.token_column(self.condition, model.embed_tokens(writer.last_token()[:, None]), length)
        return self.decoder_steps.feed(decoder, layers, column, status.start_width, status.drop)  # [B, H]

    def next_classes(self, status: LoopStatus) -> tuple[torch.LongTensor, torch.Tensor]:
        """The next class of every writing row, [B] (vocab_size: the sentence end; pad for idle
        rows), and the processed logits [B, V+1] it was chosen from."""
        settings, writer, writing, model = self.settings, self.writer, self.writing, self.model
        vocab_size = model.text_config.vocab_size
        hidden = self.decoder_states(status)  # [B, H]
        # Only writing rows go through the vocabulary projection (the costliest step); the
        # processors then see the whole batch, as in Transformers (idle rows hold zeros).
        rows = first_rows(writing, status.writing)  # [R]
        decoder, states = model.sentence_decoder, hidden[rows]  # [R, H]
        length = writer.sentence_len  # [B]
        previous = writer.last_token().masked_fill(length == 0, -1)  # [B]
        before, before_len = writer.token_before()[rows], (writer.start - writer.last_start)[rows]  # [R] each
        token_logits = decoder.token_logits(states, model.lm_head)  # [R, V]
        class_logits = decoder.class_logits(
            states, token_logits, previous[rows], length[rows], model.segmentation_rule, None, before, before_len
        )
        logits = torch.zeros(len(writing), vocab_size + 1, dtype=torch.float32, device=hidden.device)  # [B, V+1]
        logits = logits.index_copy(0, rows, class_logits.float())
        if self.raw_logits is not None:
            self.raw_logits.append(logits.masked_fill(~writing[:, None], -float("inf")))
        logits[:, vocab_size] = logits[:, vocab_size].masked_fill(length == 0, -float("inf"))  # >= 1 token
        early = writer.written < self.min_new  # [B]
        for eos in self.eos.T:  # [B] each: one eos id per row (-1: none)
            column = eos.clamp(min=0)[:, None]
            blocked = (early & (eos >= 0))[:, None]
            logits.scatter_(1, column, logits.gather(1, column).masked_fill(blocked, -float("inf")))
        if len(settings.processors):
            logits = settings.processors(writer.left_padded(status.max_written), logits)
        if self.sampling is not None:
            logits = self.sampling.process(logits, writer.tokens_so_far)  # read only for penalties
        if self.scores is not None:
            self.scores.append(logits.masked_fill(~writing[:, None], -float("inf")))
        if self.sampling is not None:
            chosen = self.sampling.choose(logits[rows], rows, rows.tolist() if self.sampling.any_sampled else [])
        elif settings.do_sample:
            chosen = torch.multinomial(logits[rows].softmax(-1), 1)[:, 0]
        else:
            chosen = logits[rows].argmax(-1)
        return torch.full_like(writing, writer.pad_id, dtype=torch.long).index_copy(0, rows, chosen), logits

    def write_step(self, status: LoopStatus) -> None:
        """One decoder step for the writing rows; a row whose sentence it finished waits for the
        backbone, or is done.

        A sentence ends at the decoder's sentence-end class, at max_sentence_len tokens, or (with
        `sentence_end="rule"`) right after a token that always ends one. A row is
        done at eos, at max_new_tokens, at max_new_sentences, when a stopping criterion fires (cut
        where it fires), or when the backbone has no position left to read its sentence.
        """
        settings, writer, model = self.settings, self.writer, self.model
        token, scores = self.next_classes(status)  # [B], [B, V+1]
        ended = self.writing & (token == model.text_config.vocab_size)
        wrote = self.writing & ~ended
        writer.append(token, wrote)
        self.starting = torch.zeros_like(self.starting)
        # a certain end (max_sentence_len; with rule ends, also a hard end) takes no decoder step
        ends = model.segmentation_rule.ends(token.masked_fill(~wrote, -1), writer.sentence_len)
        full = model.sentence_decoder.end_head.must_end(ends)
        stop = (token[:, None] == self.eos).any(1) | (writer.written >= self.budget)
        if len(settings.criteria):  # they read the tokens as a matrix as wide as the longest row: one more read
            stop |= settings.criteria(writer.left_padded(int(writer.written.max())), scores)
        stop &= wrote
        self.finished = ended | (wrote & full) | stop
        writer.close(self.finished)
        self.new_sentences += (self.finished & (writer.written > 0)).long()  # a prompt's "." closed: none new
        self.done |= stop
        if settings.max_new_sentences is not None:
            self.done |= self.new_sentences >= settings.max_new_sentences
        if model.backbone_positions is not None:
            self.done |= self.finished & (self.backbone_mask.sum(1) >= model.backbone_positions)
        self.writing &= ~self.finished
        # a text's last sentence is never encoded: nothing would read its state
        self.waiting |= self.finished & ~self.done
        if self.decoder_steps is not None:
            self.decoder_steps.release(self.writing)

    def stream(self, status: LoopStatus) -> None:
        """Hand the streamer row 0's sentence if the last step finished one (its new tokens)."""
        if self.settings.streamer is not None and status.stream_end > status.stream_start:
            self.settings.streamer.put(self.writer.text[0, status.stream_start : status.stream_end].cpu())

    def backbone_step(self, status: LoopStatus) -> None:
        """Encode the waiting rows' sentences and take one backbone step for them together."""
        model, waiting = self.model, self.waiting
        rows = first_rows(waiting, status.waiting)  # [N]
        tokens, lengths = self.writer.last_sentences(rows, status.waiting_width)  # [N, L], [N]
        vectors = model.encode_sentences(tokens, lengths).to(self.dtype)[:, None]  # [N, 1, H]
        vector = self.state.new_zeros(len(waiting), 1, self.state.shape[-1]).index_copy(0, rows, vectors)  # [B, 1, H]
        self.backbone_mask = torch.cat([self.backbone_mask, waiting.long()[:, None]], 1)  # [B, T+1]
        if self.cache is not None:
            output = model.run_backbone(vector, self.backbone_mask, cache=self.cache, use_cache=True)
            # rows that did not step leave padding: drop the columns no row needs
            self.backbone_mask = drop_padding_entries(self.cache, self.backbone_mask, status.backbone_width)
        else:
            self.inputs = torch.cat([self.inputs, vector], 1)
            output = model.run_backbone(self.inputs, self.backbone_mask)
        self.state = torch.where(waiting[:, None], output.last_hidden_state[:, -1].to(self.dtype), self.state)
        self.fresh, self.waiting = waiting, torch.zeros_like(waiting)


class SLLMGenerationMixin:
    """`generate` for SLLMForCausalLM, with the interface of Transformers' `generate`."""

    def sentence_model_parts(self) -> SentenceModelParts:
        """The parts of this model the sentence loop uses."""
        config = self.config
        return SentenceModelParts(
            text_config=config.text_config,
            decoder_window=config.decoder_window,
            segmentation_rule=self.segmentation_rule,
            sentence_decoder=self.sentence_decoder,
            decoder_layers=self.decoder_layers(),
            embed_tokens=self.get_input_embeddings(),
            lm_head=self.get_output_embeddings(),
            stop_head=self.stop_head,
            encode_sentences=self.encode_sentences,
            run_backbone=self.run_backbone,
            start_states=self.start_states,
            backbone_positions=self.max_backbone_positions(),
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """Token prompts [B, T] (left padded) -> [B * num_return_sequences, T + new] token ids, rows
        padded with the pad id. What it honours and refuses: the README's Generation section."""
        settings, input_ids, attention_mask = self._loop_settings(
            input_ids, attention_mask, generation_config, logits_processor, stopping_criteria, streamer, **kwargs
        )
        return SentenceLoop(self.sentence_model_parts(), settings, input_ids, attention_mask).run()

    def _loop_settings(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList | None,
        streamer: BaseStreamer | None,
        **kwargs,
    ) -> tuple[LoopSettings, torch.LongTensor, torch.Tensor]:
        """Resolve a generate call as Transformers does (its generation config, special tokens, logits
        processors, stopping criteria): the loop's settings and the prompts [B * copies, P] with their mask."""
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and self.generation_config.max_length is None
        )
        config, model_kwargs = prepare_generation_config(self, generation_config, **kwargs)
        max_new_sentences = model_kwargs.pop("max_new_sentences", getattr(config, "max_new_sentences", None))
        tokenizer = model_kwargs.pop("tokenizer", None)  # for stop_strings, as in Transformers
        check_generation_options(config, model_kwargs)
        if input_ids is None:
            input_ids = torch.empty(1, 0, dtype=torch.long, device=self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.check_token_ids(input_ids)
        # Several (sampled) sequences per prompt: each row repeated, as Transformers does.
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        prompt_len, device = input_ids.shape[1], input_ids.device
        max_new_tokens = new_token_budget(config, has_default_max_length, prompt_len)
        eos, pad = special_token_tensors(self, config, device)
        eos = torch.empty(0, dtype=torch.long, device=device) if eos is None else eos.view(-1)
        # min_new_tokens (or min_length, counted over the padded prompt) is enforced per row here,
        # since rows write at different speeds: no processor for it.
        min_new_tokens = config.min_new_tokens
        if min_new_tokens is None:
            min_new_tokens = max((config.min_length or 0) - prompt_len, 0)
        processor_config = copy.deepcopy(config)
        processor_config.min_new_tokens, processor_config.min_length = None, 0
        processor_config.max_length = prompt_len + max_new_tokens
        processors = logits_processors(
            self, processor_config, prompt_len, logits_processor or LogitsProcessorList(), device
        )
        # Transformers' own criteria (max_length, eos) are handled per row; keep max_time, stop_strings.
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if config.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        settings = LoopSettings(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            max_new_sentences=max_new_sentences,
            do_sample=bool(config.do_sample),
            use_cache=config.use_cache is not False,
            eos=eos,
            pad_id=int(pad) if pad is not None else int(eos[0]) if eos.numel() else 0,
            processors=processors,
            criteria=criteria,
            streamer=streamer,
            output_scores=bool(config.return_dict_in_generate and config.output_scores),
            output_logits=bool(config.return_dict_in_generate and config.output_logits),
            return_dict=bool(config.return_dict_in_generate),
        )
        return settings, input_ids, attention_mask
