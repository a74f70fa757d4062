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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import DynamicCache, LogitsProcessorList, PreTrainedConfig, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPast

from .cache_surgery import cache_nbytes, drop_padding_entries, join_caches, keep_cache_rows, pad_columns, right_align
from .decoder_steps import DecoderSteps, StaticDecoderSteps
from .row_sampling import RowSampling
from .segmentation_sllm import Segmentation, SegmentationRule
from .sentence_vae import DecoderLayout, SentenceDecoder
from .token_buffer import SentenceWriter
# A backbone step waits until this share of the unfinished rows is waiting for it (or no row is
# writing). It costs several decoder steps and little less for fewer rows, so stepping rows one by
# one wastes it, while waiting for every row wastes decoder steps on the longest sentence. Of
# 0.35-1.0, 0.5 was fastest for 8 rows on SmolLM2 here (benchmarks/generation.py prompts).
BACKBONE_STEP_SHARE = 0.5


def first_rows(rows: torch.BoolTensor, count: int) -> torch.LongTensor:
    """The indices of the True entries of rows [B], in order, given their `count`: [count]. Unlike
    `rows.nonzero()`, it does not read the count from the device."""
    return torch.argsort(rows.logical_not().to(torch.uint8), stable=True)[:count]



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
    decoder_columns: int  # the most columns of a sentence's decoder layout: window, prefix, max_sentence_len tokens
    decoder_num_layers: int  # layers of the Sentence Decoder (the backbone's when it shares them)


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
    static_cache: bool = False  # the decoder's cache on fixed-shape row slots (`cache_implementation="static"`)
    compile_options: dict | None = None  # torch.compile's arguments for the decoder step (static cache only)


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

def rows_class_logits(
    model: SentenceModelParts,
    hidden: torch.Tensor,
    last_token: torch.LongTensor,
    length: torch.LongTensor,
    rows: torch.LongTensor,
    before: torch.LongTensor,
    before_len: torch.LongTensor,
) -> torch.Tensor:
    """The (vocab + 1)-way class logits [B, V+1] (float) of the rows `rows` [R] from the decoder's states
    hidden [B, H], their sentences' last tokens and lengths [B] and the sentence before (`before`, `before_len`
    [R]); zeros in the other rows."""
    decoder, states = model.sentence_decoder, hidden[rows]  # [R, H]
    previous = last_token.masked_fill(length == 0, -1)[rows]  # [R]
    token_logits = decoder.token_logits(states, model.lm_head)  # [R, V]
    class_logits = decoder.class_logits(
        states, token_logits, previous, length[rows], model.segmentation_rule, None, before, before_len
    )
    logits = torch.zeros(len(hidden), class_logits.shape[1], dtype=torch.float32, device=hidden.device)
    return logits.index_copy(0, rows, class_logits.float())  # [B, V+1]


def allowed_classes(logits: torch.Tensor, length: torch.LongTensor, early: torch.BoolTensor, eos: torch.LongTensor):
    """Class logits [B, V+1] with what may not come next at -inf (a new tensor): the sentence end before a
    sentence's first token (length [B] == 0), and the eos ids [B, E] (-1: none) of rows short of min_new_tokens
    (`early` [B])."""
    blocked = (early[:, None] & (eos >= 0)).to(logits.dtype)  # [B, E]
    banned = logits.new_zeros(logits.shape).scatter_add_(1, eos.clamp(min=0), blocked) > 0  # [B, V+1]
    banned[:, -1] |= length == 0  # the sentence end is the last class
    return logits.masked_fill(banned, -float("inf"))


def cached_class_logits(
    model: SentenceModelParts,
    steps: DecoderSteps,
    condition: torch.Tensor,
    last_token: torch.LongTensor,
    length: torch.LongTensor,
    writing: torch.BoolTensor,
    rows: torch.LongTensor,
    before: torch.LongTensor,
    before_len: torch.LongTensor,
    early: torch.BoolTensor,
    eos: torch.LongTensor,
    start_width: int,
    drop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached decoder step and the class logits [B, V+1] of the writing rows `rows` [R], raw and with what may
    not come next masked (`allowed_classes`): a row continuing its sentence feeds its last token's column
    (condition [B, 1, H], last_token and length [B]); see `rows_class_logits`. What `cache_implementation="static"`
    compiles (`SentenceLoop.compiled_step`)."""
    embeds = model.embed_tokens(last_token[:, None])  # [B, 1, H]
    column = model.sentence_decoder.token_column(condition, embeds, length * writing)  # [B, 1, H]
    hidden = steps.feed(model.sentence_decoder, model.decoder_layers, column, start_width, drop)  # [B, H]
    logits = rows_class_logits(model, hidden, last_token, length, rows, before, before_len)
    return logits, allowed_classes(logits, length, early, eos)


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
        self.decoder_steps = self.new_decoder_steps(batch, device) if self.cache is not None else None
        self.compiled_step = cached_class_logits
        if settings.compile_options is not None:
            self.compiled_step = torch.compile(cached_class_logits, **settings.compile_options)
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

    def new_decoder_steps(self, batch: int, device: torch.device) -> DecoderSteps:
        """The decoder's cache: growing and compacted, or (`static_cache`) on fixed-shape row slots."""
        if not self.settings.static_cache:
            return DecoderSteps(batch, device)
        return StaticDecoderSteps(batch, device, self.model.decoder_num_layers, self.model.decoder_columns)

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

    def next_classes(self, status: LoopStatus) -> tuple[torch.LongTensor, torch.Tensor]:
        """The next class of every writing row, [B] (vocab_size: the sentence end; pad for idle
        rows), and the processed logits [B, V+1] it was chosen from."""
        settings, writer, writing, model = self.settings, self.writer, self.writing, self.model
        # Only writing rows go through the vocabulary projection (the costliest step); the
        # processors then see the whole batch, as in Transformers (idle rows hold zeros).
        rows = first_rows(writing, status.writing)  # [R]
        length, last_token = writer.sentence_len, writer.last_token()  # [B] each
        before, before_len = writer.token_before()[rows], (writer.start - writer.last_start)[rows]  # [R] each
        early = writer.written < self.min_new  # [B] rows whose eos ids are blocked
        if self.decoder_steps is None:  # recompute the whole layout
            layout = self.layout(status.sentence_width)
            predictor = layout.predictors.gather(1, (length * writing)[:, None])  # [B, 1] predicts token `length`
            states = model.sentence_decoder.run(layout, model.decoder_layers)  # [B, K, H]
            hidden = states.gather(1, predictor[..., None].expand(-1, -1, states.shape[-1]))[:, 0]  # [B, H]
            raw = rows_class_logits(model, hidden, last_token, length, rows, before, before_len)
            logits = allowed_classes(raw, length, early, self.eos)
        else:
            step = self.compiled_step if self.decoder_steps.compilable(status.start_width) else cached_class_logits
            raw, logits = step(
                model, self.decoder_steps, self.condition, last_token, length, writing, rows, before, before_len,
                early, self.eos, status.start_width, status.drop,
            )  # fmt: skip
        if self.raw_logits is not None:
            self.raw_logits.append(raw.masked_fill(~writing[:, None], -float("inf")))
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
