"""Sentence-by-sentence generation with a sentence-level KV cache.

Each row of a batch moves on its own: when the stop head lets it go on, the Sentence Decoder
writes its next sentence token by token; the finished sentence is encoded to one vector and
the backbone takes one cached step for it. Rows write sentences of different lengths, so a
row that finishes early waits until enough rows are waiting (or none is writing) and they take
the backbone step together, while the other rows keep writing: decoder steps are not spent on
idle rows waiting for the longest sentence. The backbone cache holds one entry per sentence,
plus one for the start-of-document state. A prompt whose last sentence is unfinished has that
sentence continued: the decoder is fed its prompt tokens and writes the rest of it.

The decoder is used in two places only: `_start_sentences` (a row starts a sentence from its
backbone state: its conditioning) and `_decoder_states` (one decoder step for every writing row). What
it reads is the decoder's own `layout`, the one the teacher-forced pass reads: a cached step feeds the
layout's columns the row has not fed yet, a recomputing step runs the whole layout.
"""

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    MaxTimeCriteria,
    StopStringCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import Cache
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .sentence_vae import DecoderLayout, token_window

# A backbone step waits until this share of the unfinished rows is waiting for it (or no row is
# writing). It costs several decoder steps and little less for fewer rows, so stepping rows one by
# one wastes it, while waiting for every row wastes decoder steps on the longest sentence. Of
# 0.35-1.0, 0.5 was fastest for 8 rows on SmolLM2 here (benchmarks/generation.py prompts).
BACKBONE_STEP_SHARE = 0.5

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
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def right_align(values: torch.Tensor, lengths: torch.LongTensor, fill) -> torch.Tensor:
    """Move each row's first `lengths[b]` entries to the end of the row, `fill` before them.

    values [B, W, ...], lengths [B] -> [B, W, ...]: turns right padding into left padding.
    """
    batch, width = values.shape[:2]
    index = torch.arange(width, device=values.device) - (width - lengths)[:, None]  # [B, W]
    trailing = [1] * (values.dim() - 2)
    gathered = values.gather(1, index.clamp(min=0).view(batch, width, *trailing).expand_as(values))
    keep = (index >= 0).view(batch, width, *trailing)
    return torch.where(keep, gathered, torch.as_tensor(fill, dtype=values.dtype, device=values.device))


def drop_padding_entries(cache: Cache, mask: torch.Tensor) -> torch.Tensor:
    """Move each row's real cache entries (mask [B, T] = 1) to the end, in order, and cut the
    columns no row needs. Returns the new mask [B, T'] (left padded)."""
    order = torch.sort(mask, dim=1, stable=True).indices  # [B, T]: padding first, then real entries
    width = int(mask.sum(1).max())
    for layer in cache.layers:
        index = order[:, None, -width:, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they have seen
            layer.cumulative_length = width
    return mask.gather(1, order)[:, -width:]


def check_generation_options(config: GenerationConfig, model_kwargs: dict) -> None:
    """Refuse, naming them, the generate options and arguments the sentence loop does not implement."""
    refused = [name for name, in_use in UNSUPPORTED_OPTIONS.items() if in_use(getattr(config, name, None))]
    refused += [name for name, value in model_kwargs.items() if value is not None and name not in UNSUPPORTED_OPTIONS]
    if refused:
        raise ValueError(
            f"SLLMForCausalLM.generate does not support {', '.join(f'`{name}`' for name in refused)}: its sentence "
            "loop does greedy decoding and sampling, with the options listed in the README's Generation section"
        )


class SentenceWriter:
    """The token buffer of a generate call: each row's unfinished last prompt sentence (if any), then
    up to `max_new_tokens` new tokens; each row is writing one sentence after its finished ones.

    Columns [0, Lp) hold the unfinished prompt sentences, right-aligned; new tokens are written from
    column Lp on, so a continued sentence lies in one piece with its prompt tokens.
    """

    def __init__(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        open_tokens: torch.LongTensor,
        open_len: torch.LongTensor,
        max_new_tokens: int,
        pad_id: int,
    ):
        batch, self.prefix_width = open_tokens.shape  # open_tokens [B, Lp], open_len [B]
        self.input_ids = input_ids  # [B, P]
        self.attention_mask = attention_mask  # [B, P]
        self.pad_id = pad_id
        self.max_new_tokens = max_new_tokens
        self.tokens = torch.cat([open_tokens, input_ids.new_full((batch, max_new_tokens), pad_id)], 1)  # [B, Lp+M]
        self.end = torch.full((batch,), self.prefix_width, dtype=torch.long, device=input_ids.device)  # [B]
        self.start = self.end - open_len  # [B] column where the sentence being written starts
        self.last_start = self.start.clone()  # [B] column where the last finished sentence starts

    @property
    def written(self) -> torch.LongTensor:
        """New tokens per row so far, the current sentence included: [B]."""
        return self.end - self.prefix_width

    @property
    def sentence_len(self) -> torch.LongTensor:
        """Tokens of the sentence each row is writing, its prompt tokens included: [B]."""
        return self.end - self.start

    def append(self, token: torch.LongTensor, rows: torch.BoolTensor) -> None:
        """Write token [B] at the end of each row in `rows`."""
        column = self.end.clamp(max=self.tokens.shape[1] - 1)[:, None]
        self.tokens.scatter_(1, column, torch.where(rows, token, self.tokens.gather(1, column)[:, 0])[:, None])
        self.end = self.end + rows.long()

    def sentences(self, start: torch.LongTensor, lengths: torch.LongTensor) -> torch.LongTensor:
        """Tokens from column start [B], lengths [B] long, as [B, max length] (pad after)."""
        offsets = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=start.device)
        columns = (start[:, None] + offsets).clamp(max=self.tokens.shape[1] - 1)  # [B, Ls]
        return self.tokens.gather(1, columns).masked_fill(offsets >= lengths[:, None], self.pad_id)

    def current(self) -> torch.LongTensor:
        """The sentence each row is writing, [B, Ls] (pad after each row's end)."""
        return self.sentences(self.start, self.sentence_len)

    def tokens_at(self, offsets: torch.LongTensor) -> torch.LongTensor:
        """Token offsets [B, K] of the sentence each row is writing -> [B, K] (clamped into the buffer)."""
        columns = (self.start[:, None] + offsets).clamp(0, self.tokens.shape[1] - 1)
        return self.tokens.gather(1, columns)

    def window(self, width: int) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """The `width` columns of prompt + new tokens before each row's current sentence: ids and
        real [B, W], left padded (fewer real ones at the start of a text), as forward reads them."""
        text = torch.cat([self.input_ids, self.new_tokens], 1)  # [B, P+M]
        real = torch.cat([self.attention_mask.bool(), torch.ones_like(self.new_tokens, dtype=torch.bool)], 1)
        start = self.input_ids.shape[1] + self.start - self.prefix_width  # [B] the sentence's first column in text
        ids, mask = token_window(text, real, start[:, None], width)  # [B, 1, W]
        return ids[:, 0], mask[:, 0]

    def close(self, rows: torch.BoolTensor) -> None:
        """The sentences that `rows` are writing are finished."""
        self.last_start = torch.where(rows, self.start, self.last_start)
        self.start = torch.where(rows, self.end, self.start)

    def last_sentences(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Each row's last finished sentence, prompt tokens included: tokens [B, Ls] and lengths [B]."""
        lengths = self.start - self.last_start
        return self.sentences(self.last_start, lengths), lengths

    @property
    def new_tokens(self) -> torch.LongTensor:
        """[B, M]: each row's new tokens, right padded."""
        return self.tokens[:, self.prefix_width :]

    def last_new_tokens(self, row: int) -> torch.LongTensor:
        """The new tokens of row `row`'s last finished sentence, [n]."""
        return self.tokens[row, max(int(self.last_start[row]), self.prefix_width) : int(self.start[row])]

    def left_padded(self) -> torch.LongTensor:
        """Prompt + new tokens as a left-padded batch [B, W]: the layout Transformers' logits
        processors and stopping criteria expect (each row's last token in the last column)."""
        full = torch.cat([self.input_ids, self.new_tokens], 1)  # [B, P+M]
        prompt_len = self.input_ids.shape[1]
        width = prompt_len + int(self.written.max())
        return right_align(full, prompt_len + self.written, self.pad_id)[:, full.shape[1] - width :]

    def sequences(self) -> torch.LongTensor:
        """[B, P + new]: prompts as given, then the new tokens, rows padded with the pad id."""
        width = int(self.written.max()) if self.end.numel() else 0
        return torch.cat([self.input_ids, self.new_tokens[:, :width]], 1)


class DecoderSteps:
    """The Sentence Decoder's cache while rows write sentences that start at different steps.

    One DynamicCache whose columns are decoder steps, all rows at once; each row attends only to
    the columns of the sentence it is writing (`mask` [B, T]) at its own positions. The leading
    columns no row attends to any more are dropped before each step (a slice: the cache's next update
    copies it anyway), so a batch of one holds at most one sentence's layout.
    """

    def __init__(self, batch: int, device: torch.device):
        self.cache = DynamicCache()
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)  # [B, T]

    def feed(
        self,
        decoder: nn.Module,
        layout: DecoderLayout,
        first: torch.LongTensor,
        last: torch.LongTensor,
        continuing: torch.BoolTensor,
        layers: nn.Module | None,
    ) -> torch.Tensor:
        """Feed row b the columns first[b]..last[b] of its layout (inputs [B, K', H]) in one cached step
        (shorter rows are padded with columns nothing attends to; the layout's own padding is masked
        too); rows not `continuing` a sentence forget the earlier columns; `layers`: the backbone's decoder
        if the Sentence Decoder shares it. Returns each row's state after column last[b], [B, H]."""
        self.mask = self.mask * continuing[:, None]
        used = self.mask.any(0)  # [T]
        first_used = int(used.int().argmax()) if bool(used.any()) else self.mask.shape[1]
        if first_used:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first_used:], layer.values[:, :, first_used:]
            self.mask = self.mask[:, first_used:]
        count = last - first + 1  # [B]
        offsets = torch.arange(int(count.max()), device=count.device)  # [K]
        columns = torch.minimum(first[:, None] + offsets, last[:, None])  # [B, K]
        inputs = layout.inputs.gather(1, columns[..., None].expand(-1, -1, layout.inputs.shape[-1]))  # [B, K, H]
        fed = (offsets < count[:, None]) & layout.mask.gather(1, columns).bool()  # [B, K]
        self.mask = torch.cat([self.mask, fed.long()], 1)  # [B, T+K]
        positions = layout.positions.gather(1, columns)  # [B, K]
        states = decoder.step(inputs, positions, self.mask, self.cache, layers=layers).last_hidden_state  # [B, K, H]
        return states[torch.arange(len(count), device=count.device), count - 1]  # [B, H]


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
    backbone_positions: int | None  # the backbone's learned absolute positions (GPT-2, OPT), else None
    output_scores: bool
    output_logits: bool


@dataclass
class SentenceLoop:
    """The state of a generate call's sentence loop, all rows at once.

    Each unfinished row is in one phase: `fresh` (a new backbone state: decide whether the text
    ends), `writing` a sentence (`starting` it in this step), or `waiting` (its sentence is written,
    not yet read by the backbone).
    """

    settings: LoopSettings
    writer: SentenceWriter
    state: torch.Tensor  # [B, H] each row's last backbone output state
    backbone_mask: torch.LongTensor  # [B, T] each row's real backbone entries
    cache: Cache | None  # the backbone's cache, or None when recomputing
    inputs: torch.Tensor | None  # [B, T, H] every backbone input, kept when recomputing
    decoder_steps: DecoderSteps | None  # the decoder's cache, or None when recomputing
    done: torch.BoolTensor  # [B]
    fresh: torch.BoolTensor  # [B]
    writing: torch.BoolTensor  # [B]
    starting: torch.BoolTensor  # [B]
    waiting: torch.BoolTensor  # [B]
    condition: torch.Tensor  # [B, 1, H] each row's decoder conditioning, set when it starts a sentence
    new_sentences: torch.LongTensor  # [B] sentences finished
    scores: list[torch.Tensor] | None  # processed [B, V+1] logits per decoder step
    raw_logits: list[torch.Tensor] | None  # raw [B, V+1] logits per decoder step
    peak_cache_bytes: int = 0  # the most bytes every cache held at once so far

    def note_cache_bytes(self) -> None:
        """Update the peak with what the backbone's and the decoder's caches hold now."""
        if self.cache is not None:
            held = cache_nbytes(self.cache) + cache_nbytes(self.decoder_steps.cache)
            self.peak_cache_bytes = max(self.peak_cache_bytes, held)


@dataclass
class SLLMGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s output with `return_dict_in_generate=True`: Transformers' fields (`cache` is the
    backbone's sentence-level cache) and `peak_cache_bytes`, the most bytes held at once by every cache
    of the call: the backbone's sentence cache and the Sentence Decoder's cache (its window and the
    sentence being written). 0 with `use_cache=False` (nothing is cached)."""

    peak_cache_bytes: int | None = None


class SLLMGenerationMixin:
    """`generate` for SLLMForCausalLM, with the interface of Transformers' `generate`."""

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
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and self.generation_config.max_length is None
        )
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
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
        max_new_tokens = new_token_budget(config, has_default_max_length, input_ids.shape[1])
        settings = self._loop_settings(
            config, input_ids, max_new_tokens, max_new_sentences, logits_processor, stopping_criteria, tokenizer,
            streamer,
        )  # fmt: skip
        if streamer is not None:
            streamer.put(input_ids.cpu())
        loop = self._prefill(input_ids, attention_mask, settings)
        while True:
            self._decide_text_ends(loop)
            if bool(loop.done.all()):
                break
            if bool(loop.writing.any()):
                self._write_step(loop)
                loop.note_cache_bytes()
            if self._backbone_step_due(loop):
                self._backbone_step(loop)
                loop.note_cache_bytes()
        if streamer is not None:
            streamer.end()
        sequences = loop.writer.sequences()
        if not config.return_dict_in_generate:
            return sequences
        return SLLMGenerateOutput(
            sequences=sequences,
            scores=None if loop.scores is None else tuple(loop.scores),
            logits=None if loop.raw_logits is None else tuple(loop.raw_logits),
            cache=loop.cache,
            peak_cache_bytes=loop.peak_cache_bytes,
        )

    def _loop_settings(
        self,
        config: GenerationConfig,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        max_new_sentences: int | None,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList | None,
        tokenizer,
        streamer: BaseStreamer | None,
    ) -> LoopSettings:
        """Special tokens, logits processors and stopping criteria of a generate call on input_ids [B, P]."""
        prompt_len, device = input_ids.shape[1], input_ids.device
        self._prepare_special_tokens(config, True, device=device)
        eos = config._eos_token_tensor
        eos = torch.empty(0, dtype=torch.long, device=device) if eos is None else eos.view(-1)
        pad = config._pad_token_tensor
        # min_new_tokens (or min_length, counted over the padded prompt) is enforced per row here,
        # since rows write at different speeds: no processor for it.
        min_new_tokens = config.min_new_tokens
        if min_new_tokens is None:
            min_new_tokens = max((config.min_length or 0) - prompt_len, 0)
        processor_config = copy.deepcopy(config)
        processor_config.min_new_tokens, processor_config.min_length = None, 0
        processor_config.max_length = prompt_len + max_new_tokens
        processors = self._get_logits_processor(
            processor_config,
            input_ids_seq_length=prompt_len,
            logits_processor=logits_processor or LogitsProcessorList(),
            device=device,
        )
        # Transformers' own criteria (max_length, eos) are handled per row; keep max_time, stop_strings.
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if config.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        return LoopSettings(
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
            backbone_positions=self.max_backbone_positions(),
            output_scores=bool(config.return_dict_in_generate and config.output_scores),
            output_logits=bool(config.return_dict_in_generate and config.output_logits),
        )

    def _prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, settings: LoopSettings
    ) -> SentenceLoop:
        """Read the prompts' finished sentences through the backbone in one pass; rows whose last
        sentence is unfinished start by continuing it, the others by asking the stop head."""
        segmentation = self.segment(input_ids, attention_mask)
        batch, num_slots = segmentation.lengths.shape  # [B, S]
        rows = torch.arange(batch, device=input_ids.device)
        open_len = self._unfinished_sentence_lengths(segmentation)  # [B]
        last = (segmentation.num_sentences - 1).clamp(min=0)  # [B]
        finished = segmentation.sentence_mask & (torch.arange(num_slots, device=rows.device) < last[:, None])
        finished |= segmentation.sentence_mask & (open_len == 0)[:, None]  # [B, S]
        state, inputs, backbone_mask, cache = self._read_prompt(segmentation, finished, settings)

        open_width = int(open_len.max()) if batch else 0
        open_tokens = segmentation.sentences[rows, last] if num_slots else input_ids.new_zeros(batch, 0)  # [B, L]
        open_tokens = right_align(open_tokens, open_len, settings.pad_id)[:, open_tokens.shape[1] - open_width :]
        writer = SentenceWriter(
            input_ids, attention_mask, open_tokens, open_len, settings.max_new_tokens, settings.pad_id
        )
        done = torch.full((batch,), settings.max_new_sentences == 0, device=rows.device)
        loop = SentenceLoop(
            settings=settings,
            writer=writer,
            state=state,
            backbone_mask=backbone_mask,
            cache=cache,
            inputs=inputs,
            decoder_steps=DecoderSteps(batch, rows.device) if cache is not None else None,
            done=done,
            fresh=~done & (open_len == 0),
            writing=torch.zeros_like(done),
            starting=torch.zeros_like(done),
            waiting=torch.zeros_like(done),
            condition=state[:, None],
            new_sentences=torch.zeros_like(rows),
            scores=[] if settings.output_scores else None,
            raw_logits=[] if settings.output_logits else None,
        )
        self._start_sentences(loop, ~done & (open_len > 0))
        loop.note_cache_bytes()
        return loop

    def _unfinished_sentence_lengths(self, segmentation) -> torch.LongTensor:
        """[B]: the length of each row's last prompt sentence if it is unfinished, else 0.

        Unfinished: its last token is neither a sentence end nor a punctuation end (. ! ? ;), and it
        is shorter than max_sentence_len (a full piece is closed, as generation closes one).
        """
        lengths = segmentation.lengths  # [B, S]
        if lengths.shape[1] == 0:
            return lengths.new_zeros(lengths.shape[0])
        rows = torch.arange(lengths.shape[0], device=lengths.device)
        last = (segmentation.num_sentences - 1).clamp(min=0)  # [B]
        length = lengths[rows, last]  # [B], 0 for empty rows
        token = segmentation.sentences[rows, last, (length - 1).clamp(min=0)]  # [B]
        return length * self.segmentation_rule.is_open(token, length)

    def _read_prompt(self, segmentation, finished: torch.BoolTensor, settings: LoopSettings):
        """Backbone over [start, finished prompt sentences] (finished [B, S]; at most S' in a row),
        right-aligned so every row appends in the same column. Returns the last states [B, H], the
        inputs [B, S'+1, H] (kept only when recomputing), the mask [B, S'+1] and the cache."""
        batch = finished.shape[0]
        num_finished = finished.sum(1)  # [B]
        if settings.backbone_positions is not None and bool((num_finished >= settings.backbone_positions).any()):
            raise ValueError(
                f"a prompt has {int(num_finished.max())} finished sentences, but the backbone has "
                f"{settings.backbone_positions} positions: the start state and at most "
                f"{settings.backbone_positions - 1} sentences"
            )
        start = self.start_states(batch, finished.device)  # [B, 1, H]
        vectors = start.new_zeros(*finished.shape, start.shape[-1])  # [B, S, H]
        if bool(finished.any()):
            vectors[finished] = self.encode_sentences(segmentation.sentences[finished], segmentation.lengths[finished])
        width = int(num_finished.max()) + 1 if batch else 1  # S' + 1: the columns some row uses
        inputs = right_align(torch.cat([start, vectors], 1), num_finished + 1, 0.0)[:, -width:]
        mask = right_align(torch.ones_like(inputs[..., 0], dtype=torch.long), num_finished + 1, 0)  # [B, S'+1]
        cache = DynamicCache(config=self.config.text_config) if settings.use_cache else None
        state = self.run_backbone(inputs, mask, cache=cache, use_cache=settings.use_cache).last_hidden_state[:, -1]
        return state, None if settings.use_cache else inputs, mask, cache

    def _start_sentences(self, loop: SentenceLoop, rows: torch.BoolTensor) -> None:
        """`rows` [B] start a sentence: the decoder is conditioned on their backbone state."""
        condition = self.sentence_decoder.condition(loop.state)  # [B, H] -> [B, 1, H]
        loop.condition = torch.where(rows[:, None, None], condition, loop.condition)
        loop.writing = loop.writing | rows
        loop.starting = loop.starting | rows

    def _decide_text_ends(self, loop: SentenceLoop) -> None:
        """Fresh rows ask the stop head whether the text ends (not before min_new_tokens); the
        others start their next sentence."""
        if not bool(loop.fresh.any()):
            return
        stop_logits = self.stop_head(loop.state).float()  # [B, 2]
        if loop.settings.do_sample:
            stop = torch.multinomial(stop_logits.softmax(-1), 1)[:, 0] == 1
        else:
            stop = stop_logits[:, 1] > stop_logits[:, 0]
        loop.done |= loop.fresh & stop & (loop.writer.written >= loop.settings.min_new_tokens)
        self._start_sentences(loop, loop.fresh & ~loop.done)
        loop.fresh = torch.zeros_like(loop.fresh)

    def _decoder_states(self, loop: SentenceLoop) -> torch.Tensor:
        """One decoder step: the decoder's output state [B, H] that predicts each writing row's next
        token (idle rows: a placeholder), from the row's condition, window and sentence so far."""
        decoder, writer, embed = self.sentence_decoder, loop.writer, self.get_input_embeddings()
        length = writer.sentence_len * loop.writing  # [B] tokens of the sentence so far
        window_ids, window_real = writer.window(self.config.decoder_window)  # [B, W]
        layout = decoder.layout(loop.condition, embed(writer.current()), embed(window_ids), window_real)
        rows = torch.arange(len(length), device=length.device)
        predictor = layout.predictors[rows, length]  # [B] the column that predicts token `length`
        if loop.decoder_steps is None:  # recompute the whole layout
            return decoder.run(layout, self.decoder_layers())[rows, predictor]
        # A row starting a sentence feeds its layout up to the predictor, a row continuing one its last token
        first = torch.where(loop.starting, 0, predictor)  # [B]
        continuing = loop.writing & ~loop.starting
        return loop.decoder_steps.feed(decoder, layout, first, predictor, continuing, self.decoder_layers())

    def _decoder_logits(self, loop: SentenceLoop) -> tuple[torch.LongTensor, torch.Tensor]:
        """The next class of every writing row, [B] (vocab_size: the sentence end; pad for idle
        rows), and the processed logits [B, V+1] it was chosen from."""
        settings, writer, writing = loop.settings, loop.writer, loop.writing
        vocab_size = self.config.text_config.vocab_size
        hidden = self._decoder_states(loop)  # [B, H]
        # Only writing rows go through the vocabulary projection (the costliest step); the
        # processors then see the whole batch, as in Transformers (idle rows hold zeros).
        rows = writing.nonzero().flatten()
        logits = hidden.new_zeros(len(writing), vocab_size + 1, dtype=torch.float32)  # [B, V+1]
        decoder = self.sentence_decoder
        token_logits = decoder.token_logits(hidden[rows], self.get_output_embeddings())  # [R, V]
        length = writer.sentence_len  # [B]
        previous = writer.tokens_at((length - 1)[:, None])[:, 0].masked_fill(length == 0, -1)  # [B]
        class_logits = decoder.class_logits(hidden[rows], token_logits, previous[rows], length[rows], self.segmentation_rule)
        logits[rows] = class_logits.float()
        if loop.raw_logits is not None:
            loop.raw_logits.append(logits.masked_fill(~writing[:, None], -float("inf")))
        logits[:, vocab_size] = logits[:, vocab_size].masked_fill(writer.sentence_len == 0, -float("inf"))  # >= 1 token
        if settings.eos.numel():
            early = (writer.written < settings.min_new_tokens)[:, None]
            logits[:, settings.eos] = logits[:, settings.eos].masked_fill(early, -float("inf"))
        if len(settings.processors):
            logits = settings.processors(writer.left_padded(), logits)
        if loop.scores is not None:
            loop.scores.append(logits.masked_fill(~writing[:, None], -float("inf")))
        if settings.do_sample:
            chosen = torch.multinomial(logits[rows].softmax(-1), 1)[:, 0]
        else:
            chosen = logits[rows].argmax(-1)
        return torch.full_like(writing, writer.pad_id, dtype=torch.long).index_copy(0, rows, chosen), logits

    def _write_step(self, loop: SentenceLoop) -> None:
        """One decoder step for the writing rows; a row whose sentence it finished waits for the
        backbone, or is done.

        A sentence ends at the decoder's sentence-end class, at max_sentence_len tokens, or (with
        `sentence_end="rule"`) right after a token that always ends one. A row is
        done at eos, at max_new_tokens, at max_new_sentences, when a stopping criterion fires (cut
        where it fires), or when the backbone has no position left to read its sentence.
        """
        settings, writer = loop.settings, loop.writer
        token, scores = self._decoder_logits(loop)  # [B], [B, V+1]
        ended = loop.writing & (token == self.config.text_config.vocab_size)
        wrote = loop.writing & ~ended
        writer.append(token, wrote)
        loop.starting = torch.zeros_like(loop.starting)
        # a certain end (max_sentence_len; with rule ends, also a hard end) takes no decoder step
        ends = self.segmentation_rule.ends(token.masked_fill(~wrote, -1), writer.sentence_len)
        full = self.sentence_decoder.end_head.must_end(ends)
        stop = torch.isin(token, settings.eos) | (writer.written >= settings.max_new_tokens)
        if len(settings.criteria):
            stop |= settings.criteria(writer.left_padded(), scores)
        stop &= wrote
        finished = ended | (wrote & full) | stop
        writer.close(finished)
        loop.new_sentences += finished.long()
        if settings.streamer is not None and bool(finished[0]) and (sentence := writer.last_new_tokens(0)).numel():
            settings.streamer.put(sentence.cpu())
        loop.done |= stop
        if settings.max_new_sentences is not None:
            loop.done |= loop.new_sentences >= settings.max_new_sentences
        if settings.backbone_positions is not None:
            loop.done |= finished & (loop.backbone_mask.sum(1) >= settings.backbone_positions)
        loop.writing &= ~finished
        loop.waiting |= finished & ~loop.done  # a text's last sentence is never encoded: nothing would read its state

    def _backbone_step_due(self, loop: SentenceLoop) -> bool:
        """Whether the waiting rows take their backbone step now: enough of them wait, or no row writes."""
        waiting = int(loop.waiting.sum())
        unfinished = int((~loop.done).sum())
        return waiting > 0 and (not bool(loop.writing.any()) or waiting >= math.ceil(BACKBONE_STEP_SHARE * unfinished))

    def _backbone_step(self, loop: SentenceLoop) -> None:
        """Encode the waiting rows' sentences and take one backbone step for them together."""
        waiting = loop.waiting
        tokens, lengths = loop.writer.last_sentences()
        vector = torch.zeros_like(loop.state)[:, None]  # [B, 1, H]
        vector[waiting] = self.encode_sentences(tokens[waiting], lengths[waiting])[:, None]
        loop.backbone_mask = torch.cat([loop.backbone_mask, waiting.long()[:, None]], 1)
        if loop.cache is not None:
            output = self.run_backbone(vector, loop.backbone_mask, cache=loop.cache, use_cache=True)
            loop.backbone_mask = drop_padding_entries(loop.cache, loop.backbone_mask)  # rows that did not step
        else:
            loop.inputs = torch.cat([loop.inputs, vector], 1)
            output = self.run_backbone(loop.inputs, loop.backbone_mask)
        loop.state = torch.where(waiting[:, None], output.last_hidden_state[:, -1], loop.state)
        loop.fresh, loop.waiting = waiting, torch.zeros_like(waiting)


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
