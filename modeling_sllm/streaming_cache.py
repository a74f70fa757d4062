"""A sink + window KV cache for a plain token-level backbone (StreamingLLM, arXiv 2309.17453).

Per layer it keeps the first `num_sink` tokens ("attention sinks") and the last `window` tokens, evicting
from the middle, so its size stops growing at `num_sink + window` entries. A token at position p attends to
positions j <= p with j < num_sink or j >= p - window: the sinks, the `window` tokens before it, and itself.

Which StreamingLLM variant: the simple one. StreamingLLM assigns positions *within the cache* (keys are
stored unrotated and re-rotated at their cache slot at every step, so positions never exceed the cache
size). Here keys stay as computed, rotated at their original absolute positions, and the model keeps being
fed increasing position_ids: nothing is re-rotated, the relative distances a query sees are the true ones
(with a gap between the sinks and the window), and the text is still bounded by the backbone's
`max_position_embeddings`. It is what `DynamicSlidingWindowLayer` does for sliding-window models, plus sinks.

Built from Transformers' pieces: `SinkWindowLayer` is a `DynamicLayer` (concatenate, then evict) that, like
`DynamicSlidingWindowLayer`, reports `get_seq_length()` as the number of tokens *seen* (generate slices the
prompt and builds position ids from it) and `get_mask_sizes()` as the entries attention will read; the
kept entries are reported as the contiguous run just before the new tokens (`kv_offset = seen - stored`),
so every one of them lies in the past of every new query under the model's causal mask.

The model's own mask is causal only: the cache cannot window a multi-token step. A one-token step (each
step of `generate` after the prompt) is exact, and so is any step while nothing needs evicting
(`seen + new <= num_sink + window + 1`). A longer prompt must be read by `sink_window_forward`, which feeds
it in chunks with an explicit 4D sink + window mask; `generate_with_sink_window` does that and then calls
`generate`. A layer refuses (ValueError) a multi-token step it cannot make exact. Padded batches are not
supported (the padding would become the sinks): rows must have equal lengths.

    cache = SinkWindowCache(num_sink=4, window=256, config=model.config)
    out = generate_with_sink_window(model, input_ids, cache, max_new_tokens=32, do_sample=False)
    cache.peak_nbytes()  # the most bytes its keys and values held
"""

import functools
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .transformers_compat import attn_implementation, layer_entries, set_layer_entries


class SinkWindowLayer(DynamicLayer):
    """One layer's keys and values [B, heads, <= num_sink + window, head_dim]: the sinks, then the window."""

    is_sliding = False  # not Transformers' sliding-window pattern; the mask is built from get_mask_sizes
    is_croppable = False

    def __init__(self, num_sink: int, window: int, **kwargs):
        super().__init__()
        if num_sink < 0 or window < 0:
            raise ValueError(f"num_sink and window must be >= 0, got num_sink={num_sink}, window={window}")
        self.num_sink, self.window = num_sink, window
        self.cumulative_length = 0  # tokens seen (reset by DynamicLayer.reset)
        self.peak_bytes = 0  # the most bytes the stored keys and values held after an update
        self.windowed_step = False  # set while sink_window_forward's own mask windows a multi-token step

    def capacity(self) -> int:
        return self.num_sink + self.window

    def stored_length(self) -> int:
        entries = layer_entries(self)
        return 0 if entries is None else entries[0].shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new keys/values, return everything attention reads this step (kept + new, in
        position order), then keep only the sinks and the last `window` entries."""
        new = key_states.shape[-2]
        if new > 1 and not self.windowed_step and self.cumulative_length + new > self.capacity() + 1:
            raise ValueError(
                f"SinkWindowCache: a step of {new} tokens after {self.cumulative_length} would let its later tokens "
                f"see more than the sinks ({self.num_sink}) and the window ({self.window}) under the model's causal "
                "mask; read long inputs with modeling_sllm.streaming_cache.sink_window_forward (or "
                "generate_with_sink_window), which masks each chunk"
            )
        self.cumulative_length += new
        keys, values = super().update(key_states, value_states)  # DynamicLayer: the stored entries, then the new
        if keys.shape[-2] > self.capacity():
            recent = slice(keys.shape[-2] - self.window, None)  # also right for window == 0
            set_layer_entries(
                self,
                torch.cat([keys[..., : self.num_sink, :], keys[..., recent, :]], dim=-2),
                torch.cat([values[..., : self.num_sink, :], values[..., recent, :]], dim=-2),
            )
        stored = sum(tensor.numel() * tensor.element_size() for tensor in layer_entries(self))
        self.peak_bytes = max(self.peak_bytes, stored)
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen (as DynamicSlidingWindowLayer): generate slices inputs and numbers positions by it."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for the model's mask: the stored entries and the new ones, the stored ones
        placed just before the new (all in every new query's past)."""
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return self.capacity()

    def kv_positions(self, query_length: int, device=None) -> torch.LongTensor:
        """Original positions of the keys the next update of `query_length` tokens returns, [stored + new]."""
        seen, stored = self.cumulative_length, self.stored_length()
        sinks = min(stored, self.num_sink)
        return torch.cat(
            [
                torch.arange(sinks, device=device),
                torch.arange(seen - (stored - sinks), seen, device=device),
                torch.arange(seen, seen + query_length, device=device),
            ]
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowLayer has evicted what cropping would need: it cannot be cropped")

    def reset(self) -> None:
        super().reset()
        self.peak_bytes = 0


class SinkWindowCache(Cache):
    """StreamingLLM-style cache: per layer, the first `num_sink` tokens and the last `window` tokens.

    With `config` (or `num_layers`) its layers are created up front, else one per layer on first use. The
    backbone must have full-attention layers only (Llama, Qwen2 without sliding window, GPT-2, OPT...).
    """

    def __init__(self, num_sink: int = 4, window: int = 256, config=None, num_layers: int | None = None):
        if config is not None:
            text_config = config.get_text_config(decoder=True)
            layer_types = getattr(text_config, "layer_types", None) or []
            if any(kind != "full_attention" for kind in layer_types):
                raise ValueError(f"SinkWindowCache needs full-attention layers only, the config has {set(layer_types)}")
            num_layers = text_config.num_hidden_layers
        self.num_sink, self.window = num_sink, window
        if num_layers is not None:
            super().__init__(layers=[SinkWindowLayer(num_sink, window) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(SinkWindowLayer, num_sink, window))

    def peak_nbytes(self) -> int:
        """The most bytes each layer's keys and values held after any update, summed over layers."""
        return sum(layer.peak_bytes for layer in self.layers)

    def kv_positions(self, query_length: int, device=None) -> torch.LongTensor:
        """Original positions of the keys a step of `query_length` new tokens attends over (layer 0's; all
        layers hold the same positions)."""
        if not self.layers:
            return torch.arange(query_length, device=device)
        return self.layers[0].kv_positions(query_length, device)

    @contextmanager
    def windowed_step(self):
        """Within it, the layers accept multi-token steps: the caller's 4D mask does the windowing."""
        for layer in self.layers:
            layer.windowed_step = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.windowed_step = False


def sink_window_mask(
    num_sink: int, window: int, query_positions: torch.LongTensor, key_positions: torch.LongTensor, dtype=torch.float32
) -> torch.Tensor:
    """Attention mask [1, 1, Q, K] in which query position p sees key position j iff j <= p and (j < num_sink or
    j >= p - window): additive (0 where it may attend, the dtype's minimum elsewhere), or with dtype=torch.bool
    True where it may attend (what SDPA reads fastest)."""
    q, k = query_positions[:, None], key_positions[None, :]
    allowed = (k <= q) & ((k < num_sink) | (k >= q - window))
    if dtype == torch.bool:
        return allowed[None, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=query_positions.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def check_unpadded(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("SinkWindowCache does not support padded batches (the padding would become the sinks)")


@torch.no_grad()
def sink_window_forward(
    model, input_ids: torch.LongTensor, cache: SinkWindowCache, chunk_size: int = 512, logits_to_keep: int = 1
) -> torch.Tensor:
    """Feed input_ids [B, T] (unpadded) through `model` (a causal LM taking `cache`, `position_ids`,
    `logits_to_keep` and a 4D additive mask) into `cache`, `chunk_size` tokens at a time, each chunk
    attending over the cache's entries and itself with the exact sink + window mask. Costs
    O(T * (num_sink + window + chunk_size)) attention, not O(T^2). Positions continue from what the cache has
    seen. Returns the float logits of the last `logits_to_keep` input positions, [B, logits_to_keep, V]."""
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("sink_window_forward needs at least one token")
    logits_to_keep = min(logits_to_keep, length)
    kept = []
    for start in range(0, length, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        seen = cache.get_seq_length()
        query_positions = torch.arange(seen, seen + chunk.shape[1], device=input_ids.device)
        mask = sink_window_mask(
            cache.num_sink, cache.window, query_positions, cache.kv_positions(chunk.shape[1], input_ids.device),
            dtype=torch.bool if attn_implementation(model.config) == "sdpa" else model.dtype,  # eager adds it
        )  # fmt: skip
        wanted = max(0, start + chunk.shape[1] - (length - logits_to_keep))  # this chunk's positions in the tail
        with cache.windowed_step():
            out = model(
                input_ids=chunk,
                attention_mask=mask.expand(batch, -1, -1, -1),
                position_ids=query_positions[None].expand(batch, -1),
                cache=cache,
                use_cache=True,
                logits_to_keep=max(wanted, 1),
            )
        if wanted:
            kept.append(out.logits[:, -wanted:].float())
    return torch.cat(kept, dim=1)


@torch.no_grad()
def generate_with_sink_window(
    model, input_ids: torch.LongTensor, cache: SinkWindowCache, chunk_size: int = 512, **generate_kwargs
):
    """`model.generate(input_ids, cache=cache, ...)` for prompts of any length: the prompt but its last token
    is first read by `sink_window_forward` (exactly windowed, in chunks), then generate takes one-token steps,
    which the cache makes exact by itself. input_ids [B, T] must be unpadded."""
    check_unpadded(generate_kwargs.get("attention_mask"))
    uncached = input_ids[:, cache.get_seq_length() :]
    if uncached.shape[1] > 1:
        sink_window_forward(model, uncached[:, :-1], cache, chunk_size=chunk_size)
    return model.generate(input_ids, cache=cache, **generate_kwargs)
