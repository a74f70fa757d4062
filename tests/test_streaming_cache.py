"""SinkWindowCache (StreamingLLM sink + window) on a tiny random Llama: equal to the full cache when the
window covers everything, equal to a cache-free recomputation under an explicit sink + window mask
otherwise, and bounded in bytes."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LogitsProcessor, LogitsProcessorList

from modeling_sllm.cache_surgery import cache_nbytes
from modeling_sllm.streaming_cache import (
    SinkWindowCache,
    generate_with_sink_window,
    sink_window_forward,
    sink_window_mask,
)

VOCAB, NEW, EOS = 96, 24, 2


def tiny_llama(attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def prompt(batch: int, length: int, seed: int = 1) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, cache=None, new=NEW, **kwargs):
    return model.generate(
        input_ids, cache=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True, **kwargs,
    )  # fmt: skip


@torch.no_grad()
def recomputed(model, input_ids, num_sink, window, new=NEW):
    """Greedy continuation without any cache: the whole sequence re-read at every step under the explicit
    sink + window mask; eos is never chosen (generate forces `new` tokens with min_new_tokens). Returns
    (tokens [B, T+new], raw per-step logits [new, B, V])."""
    ids, steps = input_ids, []
    for _ in range(new):
        positions = torch.arange(ids.shape[1])
        mask = sink_window_mask(num_sink, window, positions, positions).expand(ids.shape[0], -1, -1, -1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions[None].expand_as(ids)).logits[:, -1]
        steps.append(logits)
        chosen = logits.clone()
        chosen[:, EOS] = -float("inf")
        ids = torch.cat([ids, chosen.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(steps)


def test_mask_pattern():
    positions = torch.arange(7)
    allowed = sink_window_mask(1, 2, positions, positions)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 1, 0],
            [1, 0, 0, 0, 1, 1, 1],
        ]
    ).bool()
    assert torch.equal(allowed, expected)
    assert torch.equal(sink_window_mask(1, 2, positions, positions, dtype=torch.bool)[0, 0], expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_window_covering_everything_equals_full_cache(attn):
    model, ids = tiny_llama(attn), prompt(2, 12)
    full = greedy(model, ids, DynamicCache(config=model.config))
    sink = greedy(model, ids, SinkWindowCache(num_sink=4, window=64, config=model.config))
    assert torch.equal(sink.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(sink.logits), torch.stack(full.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("num_sink, window", [(2, 5), (0, 6), (4, 1)])
def test_short_prompt_generate_equals_recomputed(attn, num_sink, window):
    """A prompt that needs no eviction yet (<= num_sink + window + 1 tokens) goes straight into generate; the
    new tokens then evict at every step."""
    model = tiny_llama(attn)
    ids = prompt(2, num_sink + window + 1)
    out = greedy(model, ids, SinkWindowCache(num_sink=num_sink, window=window))  # layers created on first use
    reference, reference_logits = recomputed(tiny_llama("eager"), ids, num_sink, window)
    assert torch.equal(out.sequences, reference)
    torch.testing.assert_close(torch.stack(out.logits), reference_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_long_prompt_generate_equals_recomputed(attn, chunk_size):
    """A prompt far longer than sinks + window, read in chunks by sink_window_forward, then generate."""
    num_sink, window = 3, 8
    model, ids = tiny_llama(attn), prompt(2, 40)
    cache = SinkWindowCache(num_sink=num_sink, window=window, config=model.config)
    out = generate_with_sink_window(
        model, ids, cache, chunk_size=chunk_size, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
        min_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    reference, reference_logits = recomputed(tiny_llama("eager"), ids, num_sink, window)
    assert torch.equal(out.sequences, reference)
    torch.testing.assert_close(torch.stack(out.logits), reference_logits, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1  # the last new token is never fed back


def test_sink_window_forward_logits_equal_masked_forward():
    """The perplexity path: chunked logits of the last tokens equal one forward under the explicit mask."""
    num_sink, window = 4, 9
    model, ids = tiny_llama("eager"), prompt(2, 50)
    cache = SinkWindowCache(num_sink=num_sink, window=window, config=model.config)
    logits = sink_window_forward(model, ids, cache, chunk_size=16, logits_to_keep=20)  # spans two chunks
    positions = torch.arange(ids.shape[1])
    mask = sink_window_mask(num_sink, window, positions, positions).expand(2, -1, -1, -1)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, position_ids=positions[None].expand_as(ids)).logits
    torch.testing.assert_close(logits, reference[:, -20:], rtol=1e-4, atol=1e-4)


def test_long_multi_token_step_is_refused():
    """The model's own mask is causal only: a multi-token step that would need windowing is refused."""
    model, ids = tiny_llama(), prompt(1, 20)
    with pytest.raises(ValueError, match="sink_window_forward"):
        greedy(model, ids, SinkWindowCache(num_sink=2, window=5, config=model.config))
    with pytest.raises(ValueError, match="padded"):
        generate_with_sink_window(model, ids, SinkWindowCache(2, 5), attention_mask=torch.tensor([[0] + [1] * 19]))


class BytesRecorder(LogitsProcessor):
    """Records the cache's bytes at every generation step."""

    def __init__(self, cache):
        self.cache, self.seen = cache, []

    def __call__(self, input_ids, scores):
        self.seen.append(cache_nbytes(self.cache))
        return scores


def test_bytes_stay_bounded():
    num_sink, window, new = 4, 8, 40
    model, ids = tiny_llama(), prompt(1, 30)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_entry = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # keys + values, fp32
    cache = SinkWindowCache(num_sink=num_sink, window=window, config=config)
    recorder = BytesRecorder(cache)
    generate_with_sink_window(
        model, ids, cache, chunk_size=8, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
        logits_processor=LogitsProcessorList([recorder]),
    )  # fmt: skip
    assert recorder.seen == [(num_sink + window) * per_entry] * new  # full from the prompt on, never more
    assert cache.peak_nbytes() == (num_sink + window) * per_entry == cache_nbytes(cache)

    full = DynamicCache(config=config)
    grows = BytesRecorder(full)
    greedy(model, ids, full, new=new, logits_processor=LogitsProcessorList([grows]))
    assert grows.seen == [(ids.shape[1] + step) * per_entry for step in range(new)]  # the full cache grows


def test_reset_and_batch_reordering():
    model, ids = tiny_llama(), prompt(3, 10)
    cache = SinkWindowCache(num_sink=2, window=4, config=model.config)
    sink_window_forward(model, ids, cache)
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.layers[0].keys.shape[0] == 2 and cache.get_seq_length() == 10
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.peak_nbytes() == 0
