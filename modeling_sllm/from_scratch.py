"""Models trained from scratch: a randomly initialised Llama as a plain token LM, and the SLLM around the
same kind of backbone, both sized from a few Llama options and a tokenizer (e.g. `train_bpe_tokenizer`).

    tokenizer = train_bpe_tokenizer(texts, vocab_size=8192)
    size = {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8}
    token_lm = build_scratch_token_lm(size, tokenizer)                    # LlamaForCausalLM
    sllm = build_scratch_sllm(size, tokenizer, decoder_layers=2)           # SLLMForCausalLM, all trainable

Also the analytic multiply-adds per generated token of both (`multiply_adds_per_token`), counted from
the configs: attention projections, attention over the context, MLP and the output projection.

Library code, not remote code: a saved SLLM carries the model code it needs, not this module.
"""

import copy
import math

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedConfig

from .configuration_sllm import SLLMConfig
from .modeling_sllm import SLLMForCausalLM
from .segmentation_sllm import sentence_boundary_token_ids
from .sentence_vae import small_backbone_config

# Llama's FFN ratio (11008 / 4096), rounded to a multiple of 8.
FFN_RATIO = 2.6875
# The defaults of a scratch Llama, for options the caller does not give.
SCRATCH_LLAMA_DEFAULTS = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
}


def scratch_llama_config(llama_kwargs: dict, tokenizer) -> LlamaConfig:
    """A LlamaConfig from `llama_kwargs` (at least hidden_size, num_hidden_layers, num_attention_heads)
    with the tokenizer's vocabulary size and special token ids; intermediate_size defaults to Llama's
    ratio (2.6875 x hidden_size), the rest to SCRATCH_LLAMA_DEFAULTS (tied embeddings)."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in llama_kwargs]
    if missing:
        raise ValueError(f"a scratch Llama needs {missing}")
    for name in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        if name in llama_kwargs:
            raise ValueError(f"{name} comes from the tokenizer, not from the Llama options")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: the segmentation rule and generation need one")
    kwargs = dict(SCRATCH_LLAMA_DEFAULTS) | dict(llama_kwargs)
    kwargs.setdefault("intermediate_size", 8 * math.ceil(FFN_RATIO * kwargs["hidden_size"] / 8))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def set_generation_tokens(model, tokenizer) -> None:
    """The tokenizer's pad, bos and eos ids on the model's generation config."""
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id


def build_scratch_token_lm(llama_kwargs: dict, tokenizer) -> LlamaForCausalLM:
    """A randomly initialised Llama (`scratch_llama_config`) as a plain token-level causal LM (train mode)."""
    model = LlamaForCausalLM(scratch_llama_config(llama_kwargs, tokenizer))
    set_generation_tokens(model, tokenizer)
    return model


def scratch_boundaries(tokenizer, unit: str = "sentence") -> dict[str, list[int]]:
    """`sentence_boundary_token_ids(tokenizer, unit)`, with the whitespace tokens that end a sentence (a newline)
    also counted as glued to a preceding . ! ? ; so "end.\n" is one sentence that ends after the newline.

    Without it the punctuation ends the sentence and the newline after it is a sentence of its own, one
    token long: with one newline per paragraph that is about one sentence in four of linux-docs (mean 17.4
    tokens per sentence instead of 23), each costing a backbone step, an encoder pass and a decoder start
    for one token. Byte-level BPE (and SmolLM2's tokenizer) always splits "." from the newline after it.
    """
    boundaries = sentence_boundary_token_ids(tokenizer, unit)
    ends = [i for i in boundaries["sentence_end_token_ids"] if i not in set(tokenizer.all_special_ids)]
    texts = tokenizer.batch_decode([[i] for i in ends], clean_up_tokenization_spaces=False)
    blank = [i for i, text in zip(ends, texts) if text and not text.strip()]
    boundaries["continuation_token_ids"] = sorted(set(boundaries["continuation_token_ids"]) | set(blank))
    return boundaries


def build_scratch_sllm(llama_kwargs: dict | PreTrainedConfig, tokenizer, **sllm_overrides) -> SLLMForCausalLM:
    """An SLLM around a randomly initialised backbone (a `scratch_llama_config`, or a given backbone config
    of any architecture SLLM accepts), with `sentence_init="random"` and every weight trainable (train mode).

    The sentence-boundary token ids come from the tokenizer (`scratch_boundaries`: a newline glues to the
    punctuation before it) unless given; other keyword arguments are SLLMConfig fields.
    """
    if isinstance(llama_kwargs, PreTrainedConfig):
        text_config = copy.deepcopy(llama_kwargs)
    else:
        text_config = scratch_llama_config(llama_kwargs, tokenizer)
    if sllm_overrides.get("sentence_init", "random") != "random":
        raise ValueError("a scratch SLLM has no trained backbone to warm-start from: sentence_init must be 'random'")
    boundaries = scratch_boundaries(tokenizer, sllm_overrides.get("sentence_unit", "sentence"))
    options = boundaries | {"sentence_init": "random"} | sllm_overrides
    model = SLLMForCausalLM(SLLMConfig(text_config=text_config, **options))
    set_generation_tokens(model, tokenizer)
    return model.train().requires_grad_(True)


def layer_multiply_adds(config: PreTrainedConfig, context: float) -> dict:
    """Multiply-adds of one Llama-style decoder layer for one new position that attends to `context`
    positions (itself included): {"projections": q, k, v, o; "attention": scores and values; "mlp": SwiGLU}."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "projections": hidden * head_dim * (2 * heads + 2 * kv_heads),
        "attention": 2 * heads * head_dim * context,
        "mlp": 3 * hidden * config.intermediate_size,
    }


def _layers(config: PreTrainedConfig, num_layers: int, context: float) -> float:
    return num_layers * sum(layer_multiply_adds(config, context).values())


def token_lm_multiply_adds(config: PreTrainedConfig, context: float) -> dict:
    """Multiply-adds per generated token of a token LM at `context` tokens: its layers and its output
    projection (hidden x vocab); norms, embeddings and the softmax are left out (O(hidden) or a lookup)."""
    layers = _layers(config, config.num_hidden_layers, context)
    projection = config.hidden_size * config.vocab_size
    total = layers + projection
    return {"layers": layers, "output_projection": projection, "total": total,
            "output_projection_share": projection / total}  # fmt: skip


def sllm_multiply_adds(config: SLLMConfig, context: float, tokens_per_sentence: float) -> dict:
    """Multiply-adds per generated token of an SLLM at `context` tokens whose sentences hold
    `tokens_per_sentence` tokens on average, the per-sentence costs amortised over them:

    - Sentence Decoder, per sentence: the window and prefix columns fed at the sentence's start, then
      L + 1 steps (L tokens, then the step whose distribution ends the sentence), each through its layers
      (attending to W + m + the tokens so far) and the output projection (hidden x vocab);
    - Sentence Encoder, per sentence: its layers over the L tokens, and its output projection;
    - backbone: one step per sentence over the context / L sentence positions;
    - the decoder conditioning (context projection, prefix vectors) and the stop head, per sentence.

    A decoder shared with the backbone runs the backbone's layers per token instead.
    """
    text = config.text_config
    hidden, vocab, length = text.hidden_size, text.vocab_size, float(tokens_per_sentence)
    window, prefix = config.decoder_window, config.decoder_prefix_vectors
    if config.decoder_shares_backbone:
        decoder_config, decoder_layers = text, text.num_hidden_layers
    else:
        decoder_config = small_backbone_config(
            text, config.decoder_layers, config.sentence_num_attention_heads, config.sentence_intermediate_size
        )
        decoder_layers = config.decoder_layers
    encoder_config = small_backbone_config(
        text, config.encoder_layers, config.sentence_num_attention_heads, config.sentence_intermediate_size
    )
    steps = length + 1  # tokens, then the step that ends the sentence
    decoder_context = window + prefix + (length + 1) / 2  # mean over the sentence's steps
    start_context = (window + prefix + 1) / 2
    decoder = steps * _layers(decoder_config, decoder_layers, decoder_context)
    decoder += (window + prefix) * _layers(decoder_config, decoder_layers, start_context)
    projection = steps * hidden * vocab
    encoder = length * _layers(encoder_config, config.encoder_layers, (length + 1) / 2) + hidden * hidden
    backbone = _layers(text, text.num_hidden_layers, context / length + 1)
    heads = hidden * hidden * (1 + (prefix if prefix > 1 else 0)) + 2 * hidden  # conditioning, stop head
    per_sentence = {"decoder": decoder, "output_projection": projection, "encoder": encoder, "backbone": backbone,
                    "conditioning_and_stop_head": heads}  # fmt: skip
    per_token = {name: value / length for name, value in per_sentence.items()}
    total = sum(per_token.values())
    return per_token | {"total": total, "output_projection_share": per_token["output_projection"] / total}


def multiply_adds_per_token(config: PreTrainedConfig, context: float, tokens_per_sentence: float | None = None) -> dict:
    """Analytic multiply-adds per generated token of a token LM (a Llama-style config) or of an SLLM
    (an SLLMConfig; `tokens_per_sentence` required) at `context` tokens of context."""
    if isinstance(config, SLLMConfig):
        if tokens_per_sentence is None:
            raise ValueError("an SLLM's per-token cost needs tokens_per_sentence (per-sentence costs are amortised)")
        return sllm_multiply_adds(config, context, tokens_per_sentence)
    return token_lm_multiply_adds(config, context)


__all__ = [
    "scratch_boundaries",
    "build_scratch_sllm",
    "build_scratch_token_lm",
    "multiply_adds_per_token",
    "scratch_llama_config",
    "layer_multiply_adds",
]
