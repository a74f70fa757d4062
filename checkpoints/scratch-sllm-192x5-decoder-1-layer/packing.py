"""Packing: the real columns of N padded items [N, K] laid end to end into rows of a fixed width, for
one pass of a sentence module in which each item attends only to itself.

Sentences average ~23 tokens but are padded to the batch's longest (up to `max_sentence_len`), so a
padded pass of the Sentence Encoder or Decoder spends most of its work on padding. Packed, the same
items fill rows of `width` columns (each item whole in one row, next-fit in order) and a block-diagonal
causal mask (built by Transformers' own `create_causal_mask` for the module's attention implementation)
keeps them apart: the states of the real columns are those of the padded pass, at a fraction of the
work. The padded layout stays the one definition of what a module reads; packing only moves columns.
"""

import torch
from transformers import PreTrainedConfig
from transformers.masking_utils import create_causal_mask

# Columns of a packed row, at least (a longer item gets a row of its own length). Attention then costs each
# column about as much as 2 x 128 inputs of one projection, while a row leaves on average half an item unused.
ROW_WIDTH = 128
# A packed pass costs a block-diagonal mask and two gathers more than a padded one: it runs only where it skips
# at least this share of the padded columns (a training batch skips ~60%; the few sentences generate encodes
# at once, little).
MIN_SAVING = 0.2


def next_fit(sizes: list[int], width: int) -> tuple[list[int], list[int]]:
    """Row and first column of each item of `sizes` (each <= width), placed in order: an item opens a
    new row when it does not fit in what is left of the current one."""
    rows, starts, row, used = [], [], 0, 0
    for size in sizes:
        if used + size > width:
            row, used = row + 1, 0
        rows.append(row)
        starts.append(used)
        used += size
    return rows, starts


class Packing:
    """Where the real columns (mask [N, K] True) of N items go in a packed batch [R, C].

    Built with one device-to-host copy (the items' sizes: the packed shape depends on them); `pack` and
    `unpack` are gathers and scatters on the device. Row r, column c of the packed batch holds item `item[r, c]` (N + column for padding,
    so every padding column is a sequence of its own), and `pack(layout positions)` its positions.
    """

    @torch.compiler.disable  # host-side (the sizes decide the shape): eager under torch.compile, no guard per layout
    def __init__(self, mask: torch.Tensor, min_width: int | None = None):
        num, columns = mask.shape
        device = mask.device
        mask = mask.bool()
        counts = mask.sum(1)  # [N]
        sizes = counts.tolist()  # [N] on the host
        self.width = max([ROW_WIDTH if min_width is None else min_width, *sizes])
        rows, starts = next_fit(sizes, self.width)
        self.num_rows = rows[-1] + 1 if rows else 0
        self.num_items, self.columns, self.total = num, columns, sum(sizes)
        first = torch.tensor(rows, dtype=torch.long, device=device) * self.width  # [N] flat packed index of item n
        first += torch.tensor(starts, dtype=torch.long, device=device)
        # source: flat index n*K + k of each real column, in item order; target: its flat packed index
        self.source = mask.view(-1).nonzero_static(size=self.total).flatten()  # [T]
        offsets = torch.cumsum(counts, 0) - counts  # [N] real columns before item n
        item_of = torch.repeat_interleave(torch.arange(num, device=device), counts, output_size=self.total)  # [T]
        rank = torch.arange(self.total, device=device) - offsets[item_of]  # [T] its rank inside its item
        self.target = first[item_of] + rank  # [T]
        slots = self.num_rows * self.width
        item = num + torch.arange(slots, device=device)  # padding: a sequence of its own
        self.item = item.index_put((self.target,), item_of).view(self.num_rows, self.width)  # [R, C]

    @property
    def pays(self) -> bool:
        """Whether the packed batch skips at least MIN_SAVING of the padded batch's columns."""
        return self.num_rows * self.width <= (1 - MIN_SAVING) * self.num_items * self.columns

    def pack(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """values [N, K, ...] -> [R, C, ...]: the real columns packed, `fill` in padding columns."""
        trailing = values.shape[2:]
        flat = values.reshape(self.num_items * self.columns, *trailing)[self.source]  # [T, ...]
        out = flat.new_full((self.num_rows * self.width, *trailing), fill)
        return out.index_copy(0, self.target, flat).view(self.num_rows, self.width, *trailing)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """packed [R, C, ...] -> [N, K, ...]: each real column back in place, zeros elsewhere."""
        trailing = packed.shape[2:]
        flat = packed.reshape(self.num_rows * self.width, *trailing)[self.target]  # [T, ...]
        out = flat.new_zeros(self.num_items * self.columns, *trailing)
        return out.index_copy(0, self.source, flat).view(self.num_items, self.columns, *trailing)

    def attention_mask(self, config: PreTrainedConfig, inputs_embeds: torch.Tensor):
        """The causal mask of the packed batch inputs_embeds [R, C, H] that keeps items apart, in the form
        `config`'s attention implementation reads (a 4D tensor for eager and sdpa)."""
        item = self.item

        def same_item(batch_idx, head_idx, q_idx, kv_idx):
            return item[batch_idx, q_idx] == item[batch_idx, kv_idx]

        return create_causal_mask(config, inputs_embeds, None, None, None, and_mask_function=same_item)
