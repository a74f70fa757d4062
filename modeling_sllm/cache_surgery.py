"""Cache and padding surgery for rows that step apart, join and leave: pad, right-align, join, keep and compact
the rows of Transformers caches and padded tensors."""

import torch
from transformers.cache_utils import Cache

from .transformers_compat import layer_entries, set_layer_entries, set_seen_entries


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
