"""The Sentence Decoder's cache during generation (`DecoderSteps`): rows that start and continue sentences at
different steps, each reading only its own sentence's columns."""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache_surgery import join_caches, keep_cache_rows, pad_columns
from .sentence_vae import DecoderLayout, SentenceDecoder
from .transformers_compat import layer_entries, set_layer_entries

LAYOUT_FIELDS = tuple(field.name for field in dataclasses.fields(DecoderLayout))


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



class DecoderSteps:
    """The Sentence Decoder's cache while rows write sentences that start at different steps.

    One DynamicCache whose columns are decoder steps, all rows at once; each row attends only to the
    columns of the sentence it is writing (`mask` [B, T]) at its own positions. A row starting a sentence
    feeds its layout's columns up to the one that predicts its next token (`start`), a row continuing one
    feeds one column. The leading columns no row attends to any more are dropped before each step (a
    slice: the cache's next update copies it anyway), so a batch of one holds at most one sentence's layout.
    """

    def __init__(self, batch: int, device: torch.device, cache: Cache | None = None):
        self.cache = DynamicCache() if cache is None else cache
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

    def compilable(self, start_width: int) -> bool:
        """Whether a step can run compiled: only on the static row slots (`StaticDecoderSteps`)."""
        return False

    def count_unused(self) -> None:
        """Count the leading columns no row reads any more (`drop`)."""
        used = F.pad(self.mask.any(0), (0, 1), value=True)  # [T+1]: True past the last column
        self.drop = used.int().argmax()

    def join(self, other: "DecoderSteps") -> None:
        """Append other's rows."""
        rows = len(self.position), len(other.position)
        self.join_cache(other)
        self.position = torch.cat([self.position, other.position])
        self.start_count = torch.cat([self.start_count, other.start_count])
        self.start_layout = join_layouts(self.start_layout, rows[0], other.start_layout, rows[1])
        self.count_unused()

    def join_cache(self, other: "DecoderSteps") -> None:
        """Append other's cache rows: columns left padded to the wider cache (padding no row reads)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.cache = join_caches(self.cache, len(self.position), other.cache, len(other.position), width)
        self.mask = torch.cat([pad_columns(steps.mask, width - steps.mask.shape[1], 0, 0) for steps in (self, other)])

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
        inputs, positions, fed, count = self.columns(column, start_width)
        self.mask = torch.cat([self.mask, fed.long()], 1)  # [B, T+K]
        states = decoder.step(inputs, positions, self.mask, self.cache, layers=layers).last_hidden_state  # [B, K, H]
        return self.predicting(states, positions, count)

    def columns(self, column: torch.Tensor, start_width: int) -> tuple[torch.Tensor, ...]:
        """What each row feeds at this step, K = max(start_width, 1) columns: inputs [B, K, H], positions [B, K],
        which are real (fed) [B, K] and how many are real, count [B]; the starting rows' layouts are used up."""
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
        return inputs, positions, fed, count

    def predicting(self, states: torch.Tensor, positions: torch.LongTensor, count: torch.LongTensor) -> torch.Tensor:
        """Each row's state [B, H] of its last fed column (of states [B, K, H]), the one that predicts its next
        token; the row's next column is at the position after it."""
        last = (count - 1)[:, None]  # [B, 1]
        self.position = positions.gather(1, last)[:, 0] + 1
        return states.gather(1, last[..., None].expand(-1, -1, states.shape[-1]))[:, 0]


class RowSlotLayer(CacheLayerMixin):
    """One layer of a `RowSlotCache`: keys and values [B, heads, capacity, D], allocated at the first write."""

    is_compileable = True

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("a RowSlotLayer is written through RowSlotCache.update, at each row's slots")

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.LongTensor):
        """Write key_states and value_states [B, heads, K, D] at each row's slots [B, K]; returns all entries."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = slots[:, None, :, None]  # [B, 1, K, 1]
        self.keys.scatter_(2, index.expand_as(key_states), key_states)
        self.values.scatter_(2, index.expand_as(value_states), value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        return 0  # rows fill their slots apart: positions and masks come from the caller

    def get_max_length(self) -> int:
        return self.capacity


class RowSlotCache(Cache):
    """A static cache in which each row writes its columns at slots of its own (`slots` [B, K], set before each
    step), so rows at different points of their sentences share fixed-shape buffers: what a compiled step needs."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[RowSlotLayer(capacity) for _ in range(num_layers)])
        self.slots: torch.LongTensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].write(key_states, value_states, self.slots)


class StaticDecoderSteps(DecoderSteps):
    """`DecoderSteps` on fixed-shape buffers: each row's sentence lies in `capacity` slots of its own (a
    `RowSlotCache`), from slot 0 when it starts, so no step changes a tensor's shape and nothing is dropped.
    The attention mask is 4D, [B, 1, K, capacity]: a column reads the real slots of its row up to its own.
    The last slot takes the padding columns of rows that feed fewer than K (never read)."""

    def __init__(self, batch: int, device: torch.device, num_layers: int, capacity: int):
        super().__init__(batch, device, RowSlotCache(num_layers, capacity + 1))
        self.capacity = capacity
        self.fill = torch.zeros(batch, dtype=torch.long, device=device)  # [B] slots each row has written
        self.real = torch.zeros(batch, capacity + 1, dtype=torch.bool, device=device)  # [B, C+1] slots read

    def release(self, writing: torch.BoolTensor) -> None:
        """Rows not `writing` [B] feed their placeholder at slot 0, position 0; a row's next sentence writes its slots
        from 0 again (a column reads only slots up to its own, each written for its sentence)."""
        self.fill = self.fill * writing
        self.position = self.position * writing

    def count_unused(self) -> None:
        """Nothing is dropped: `drop` stays 0."""

    def compilable(self, start_width: int) -> bool:
        """Whether a step has the shapes the compiled step is built for: one column per row (K = 1) on written
        buffers (a row continuing a prompt's sentence feeds more at its first step, which runs eager)."""
        return start_width <= 1 and all(layer.is_initialized for layer in self.cache.layers)

    def feed(
        self, decoder: SentenceDecoder, layers: nn.Module | None, column: torch.Tensor, start_width: int, drop: int
    ) -> torch.Tensor:
        """`DecoderSteps.feed` on the row slots (`drop` is always 0 here)."""
        inputs, positions, fed, count = self.columns(column, start_width)
        offsets = torch.arange(inputs.shape[1], device=inputs.device)  # [K]
        slots = torch.where(offsets < count[:, None], self.fill[:, None] + offsets, self.capacity)  # [B, K]
        self.real = self.real.scatter(1, slots, fed)  # the last slot only ever holds padding: fed is False there
        every = torch.arange(self.capacity + 1, device=inputs.device)  # [C+1]
        reads = (self.real[:, None, :] & (every <= slots[..., None])) | (every == slots[..., None])  # [B, K, C+1]
        mask = torch.zeros(reads.shape, dtype=inputs.dtype, device=inputs.device)
        mask = mask.masked_fill(~reads, torch.finfo(inputs.dtype).min)[:, None]  # [B, 1, K, C+1] additive
        self.cache.slots, self.fill = slots, self.fill + count
        states = decoder.step(inputs, positions, mask, self.cache, layers=layers).last_hidden_state  # [B, K, H]
        return self.predicting(states, positions, count)

    def join_cache(self, other: "StaticDecoderSteps") -> None:
        """Append other's cache rows and slots (the same capacity; a cache not written yet gives zeros)."""
        rows = len(self.position), len(other.position)
        for layer, theirs in zip(self.cache.layers, other.cache.layers):
            pairs = [layer_entries(held) for held in (layer, theirs)]
            like = next((pair for pair in pairs if pair is not None), None)
            if like is not None:
                pairs = [
                    pair if pair is not None else tuple(part.new_zeros(count, *part.shape[1:]) for part in like)
                    for pair, count in zip(pairs, rows)
                ]
                set_layer_entries(layer, *(torch.cat(parts) for parts in zip(*pairs)))
                layer.is_initialized = True
        self.real, self.fill = torch.cat([self.real, other.real]), torch.cat([self.fill, other.fill])

    def keep(self, rows: torch.LongTensor) -> None:
        """Keep only rows [N]."""
        super().keep(rows)
        self.real, self.fill = self.real[rows], self.fill[rows]
