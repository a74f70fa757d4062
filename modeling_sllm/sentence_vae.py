"""Sentence Encoder and Sentence Decoder: small stacks of the backbone's own decoder layers.

Building them from the backbone's architecture (its base-model class with fewer layers)
makes every causal LM work unchanged, positions and norms included, and lets the
"backbone" initialisation copy real layers: the encoder its first k, the decoder its last k
plus the final norm. Token embeddings and the output projection are not held here: the
wrapper passes the backbone's own (shared, not copied).
"""

import copy

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

# Field names that hold the FFN width in the architectures we know (llama, gpt2, opt, ...).
INTERMEDIATE_SIZE_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


def small_backbone_config(
    text_config: PreTrainedConfig, num_layers: int, num_heads: int | None, intermediate_size: int | None
) -> PreTrainedConfig:
    """The backbone's config with `num_layers` layers and no vocabulary (inputs are embeddings)."""
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    config.vocab_size = 1
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(config, name):
            setattr(config, name, None)
    if num_heads is not None:
        config.num_attention_heads = num_heads
        if getattr(config, "num_key_value_heads", None) is not None:
            config.num_key_value_heads = num_heads
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = text_config.hidden_size // num_heads
    if intermediate_size is not None:
        for name in INTERMEDIATE_SIZE_FIELDS:
            if hasattr(config, name):
                setattr(config, name, intermediate_size)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(text_config.layer_types[:num_layers])
    return config


def layer_list(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding a base model's decoder layers (`layers`, `h`, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise ValueError(f"{type(model).__name__} has no list of {num_layers} decoder layers to copy")


@torch.no_grad()
def copy_backbone_layers(source: PreTrainedModel, target: PreTrainedModel, layer_ids: list[int]) -> None:
    """Copy `source` layers `layer_ids` into `target`'s layers, and every other same-named,
    same-shaped weight (final norm, position embeddings); the 1-token vocabulary is skipped."""
    src_name, src_layers = layer_list(source, source.config.num_hidden_layers)
    _, dst_layers = layer_list(target, len(layer_ids))
    for dst, src_id in zip(dst_layers, layer_ids):
        dst.load_state_dict(src_layers[src_id].state_dict())
    src_state = source.state_dict()
    for name, tensor in target.state_dict().items():
        if not name.startswith(src_name + ".") and name in src_state and src_state[name].shape == tensor.shape:
            tensor.copy_(src_state[name])


class SentenceTransformer(nn.Module):
    """A small causal stack of backbone layers run on embeddings: [N, L, H] -> [N, L, H]."""

    def __init__(self, config, num_layers: int, base_model_class: type[PreTrainedModel]):
        super().__init__()
        small_config = small_backbone_config(
            config.text_config, num_layers, config.sentence_num_attention_heads, config.sentence_intermediate_size
        )
        self.layers = base_model_class(small_config)
        self.layers.get_input_embeddings().requires_grad_(False)  # 1-token placeholder: inputs are embeddings
        self.dropout = nn.Dropout(config.sentence_dropout)

    def forward(self, inputs_embeds, attention_mask=None, cache=None, use_cache=False):
        return self.layers(
            inputs_embeds=self.dropout(inputs_embeds), attention_mask=attention_mask, cache=cache, use_cache=use_cache
        )


class SentenceEncoder(SentenceTransformer):
    """Folds each sentence's token embeddings into one vector (mean of the final states)."""

    def __init__(self, config, base_model_class: type[PreTrainedModel]):
        super().__init__(config, config.encoder_layers, base_model_class)
        hidden_size = config.text_config.hidden_size
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, token_embeds: torch.Tensor, lengths: torch.LongTensor) -> torch.Tensor:
        """token_embeds [N, L, H] (right padded), lengths [N] -> sentence vectors [N, H]."""
        mask = torch.arange(token_embeds.shape[1], device=lengths.device) < lengths[:, None]  # [N, L]
        states = super().forward(token_embeds, attention_mask=mask.long()).last_hidden_state  # [N, L, H]
        pooled = (states * mask[..., None]).sum(1) / lengths[:, None].to(states.dtype)  # [N, H]
        return self.dropout(self.proj(pooled))


class SentenceDecoder(SentenceTransformer):
    """Writes a sentence's tokens from a context vector.

    The context (a backbone output state, or in reconstruction the sentence's own vector) is
    projected and fed as position 0 and also added to every token embedding, so it is seen
    at every step. Position j predicts token j+1 or, past the last token, the sentence end:
    the output is a (vocab + 1)-way distribution whose last class is "end of sentence".
    """

    def __init__(self, config, base_model_class: type[PreTrainedModel]):
        super().__init__(config, config.decoder_layers, base_model_class)
        hidden_size = config.text_config.hidden_size
        self.context_proj = nn.Linear(hidden_size, hidden_size)
        self.end_head = nn.Linear(hidden_size, 1)

    def condition(self, context: torch.Tensor) -> torch.Tensor:
        """context [N, H] -> decoder conditioning [N, 1, H]."""
        return self.context_proj(context)[:, None]

    def forward(self, condition, token_embeds, attention_mask=None, cache=None, use_cache=False):
        """condition [N, 1, H], token_embeds [N, L, H] -> states [N, L(+1 without cache), H].

        Without a cache the condition is prepended as position 0; with one, it is assumed to
        be in the cache already (see `start`) and only the new tokens are run.
        """
        inputs = token_embeds + condition  # [N, L, H]
        if cache is None or cache.get_seq_length() == 0:
            inputs = torch.cat([condition, inputs], dim=1)  # [N, L+1, H]
        return super().forward(inputs, attention_mask=attention_mask, cache=cache, use_cache=use_cache)

    def logits(self, states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """states [..., H] -> [..., V+1]: the backbone's token logits, then the sentence-end logit."""
        return torch.cat([lm_head(states), self.end_head(states)], dim=-1)
