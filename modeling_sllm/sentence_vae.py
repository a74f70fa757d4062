"""Sentence Encoder and Sentence Decoder: small stacks of the backbone's own decoder layers.

Building them from the backbone's architecture (its base-model class with fewer layers)
makes every causal LM work unchanged, positions and norms included, and lets the
"backbone" initialisation copy real layers: the encoder its first k, the decoder its last k
plus the final norm. Token embeddings and the output projection are not held here: the
wrapper passes the backbone's own (shared, not copied).
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .packing import Packing
from .segmentation_sllm import LearnedSentenceEnd, RuleSentenceEnd, SegmentationRule

# Up to this many rows, the vocabulary projection runs as W @ states^T (see SentenceDecoder.token_logits).
FEW_ROWS = 256
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


def rotate(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate states [..., H] by positions [...] (broadcast): dimension pair (f, f + H/2) turns
    by angle positions * pi * (f + 1/2) / (H/2). The angles are spread evenly over (0, pi), so
    states rotated by different positions are close to orthogonal on average."""
    half = states.shape[-1] // 2
    freqs = torch.pi * (torch.arange(half, device=states.device, dtype=torch.float32) + 0.5) / half  # [H/2]
    angles = positions.to(torch.float32)[..., None] * freqs  # [..., H/2]
    cos, sin = angles.cos().to(states.dtype), angles.sin().to(states.dtype)
    first, second = states[..., :half], states[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class SentenceLayers(nn.Module):
    """A small causal stack of backbone layers run on embeddings: [N, L, H] -> [N, L, H].

    With `num_layers=0` it holds no layers of its own: callers pass the backbone's decoder as `layers`.
    """

    def __init__(self, config, num_layers: int, base_model_class: type[PreTrainedModel]):
        super().__init__()
        self.layers = None
        if num_layers:
            small_config = small_backbone_config(
                config.text_config, num_layers, config.sentence_num_attention_heads, config.sentence_intermediate_size
            )
            self.layers = base_model_class(small_config)
            self.layers.get_input_embeddings().requires_grad_(False)  # 1-token placeholder: inputs are embeddings
        self.dropout = nn.Dropout(config.sentence_dropout)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None, use_cache=False, layers=None):
        return (layers or self.layers)(
            inputs_embeds=self.dropout(inputs_embeds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )

    def run_packed(
        self, inputs_embeds: torch.Tensor, used: torch.Tensor, position_ids: torch.LongTensor, layers=None
    ) -> torch.Tensor:
        """Uncached pass over the `used` columns [N, K] of N padded items inputs_embeds [N, K, H] at
        position_ids [N, K], packed (see packing.py) where that skips enough padding: each item attends
        causally to its own used columns only, as in a padded pass with `used` as its mask. Returns states
        [N, K, H], zeros where not used."""
        packing = Packing(used)
        if packing.num_rows == 0:  # no item: nothing to run
            return inputs_embeds.new_zeros(inputs_embeds.shape)
        if not packing.pays:  # the padded pass, `used` as its mask
            states = SentenceLayers.forward(self, inputs_embeds, used.long(), position_ids, layers=layers)
            return states.last_hidden_state * used[..., None]
        inputs = packing.pack(inputs_embeds)  # [R, C, H]
        mask = packing.attention_mask((layers or self.layers).config, inputs)
        states = SentenceLayers.forward(self, inputs, mask, packing.pack(position_ids), layers=layers)
        return packing.unpack(states.last_hidden_state)  # [R, C, H] -> [N, K, H]


class SentenceEncoder(SentenceLayers):
    """Folds each sentence's token embeddings into one vector (pooled final states, see
    `SLLMConfig.sentence_pooling`)."""

    def __init__(self, config, base_model_class: type[PreTrainedModel]):
        super().__init__(config, config.encoder_layers, base_model_class)
        hidden_size = config.text_config.hidden_size
        self.rotary = config.sentence_pooling == "rotary"
        self.proj = nn.Linear(hidden_size, hidden_size)
        # backbone_input="embedding_mean": the backbone reads mean embedding + input_proj(vector), zero at the start
        self.input_proj = nn.Linear(hidden_size, hidden_size) if config.backbone_input == "embedding_mean" else None

    def forward(self, token_embeds: torch.Tensor, lengths: torch.LongTensor) -> torch.Tensor:
        """token_embeds [N, L, H] (right padded), lengths [N] -> sentence vectors [N, H]."""
        positions = torch.arange(token_embeds.shape[1], device=lengths.device)  # [L]
        mask = positions < lengths[:, None]  # [N, L]
        states = self.run_packed(token_embeds, mask, positions.expand_as(mask))  # [N, L, H]
        if self.rotary:  # token i's state turned by i, then summed: order is bound into the vector
            states = rotate(states, positions)
            scale = lengths.to(states.dtype).sqrt()
        else:
            scale = lengths.to(states.dtype)
        pooled = (states * mask[..., None]).sum(1) / scale[:, None]  # [N, H]
        return self.dropout(self.proj(pooled))

    def backbone_inputs(self, vectors: torch.Tensor, token_embeds: torch.Tensor, lengths: torch.LongTensor):
        """What the backbone reads for each sentence, [N, H]: the vector itself, or (embedding_mean)
        the mean of the token embeddings [N, L, H] plus a learned projection of the vector."""
        if self.input_proj is None:
            return vectors
        mask = torch.arange(token_embeds.shape[1], device=lengths.device) < lengths[:, None]  # [N, L]
        mean = (token_embeds * mask[..., None]).sum(1) / lengths[:, None].to(token_embeds.dtype)
        return mean + self.input_proj(vectors)


def token_window(
    ids: torch.LongTensor, real: torch.Tensor | None, start: torch.LongTensor, width: int
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """The `width` real-or-padding columns of a text before each sentence start: text ids [B, T] with
    real [B, T] (None: all real), start columns [B, S] -> ids and mask [B, S, W], left padded (fewer
    real ones at the start of a text). Only earlier columns, so no target leaks in."""
    columns = start[..., None] - width + torch.arange(width, device=ids.device)  # [B, S, W]
    batch = ids.shape[0]
    flat = columns.clamp(min=0).view(batch, -1)  # [B, S*W]
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    mask = (columns >= 0) & real.gather(1, flat).view_as(columns)
    return ids.gather(1, flat).view_as(columns).masked_fill(~mask, 0), mask


@dataclass
class DecoderLayout:
    """What the Sentence Decoder reads for N sentences: K columns, K = W + m + L."""

    inputs: torch.Tensor  # [N, K, H]
    mask: torch.LongTensor  # [N, K] 1 for real columns (window padding is 0)
    positions: torch.LongTensor  # [N, K] real columns counted only
    predictors: torch.LongTensor  # [N, L+1] the column whose state predicts target j (j = L: the end)


class SentenceDecoder(SentenceLayers):
    """Writes a sentence's tokens from a context vector and the W tokens before the sentence.

    `layout` is the one definition of what it reads, used by the teacher-forced pass (`forward`) and by
    generate's cached steps: [window (W tokens, left padded), prefix_1..prefix_m, token_1..token_L], in
    which the last prefix vector predicts token 1; the backbone as decoder reads [prefix, window, tokens]
    instead and continues its window (its last real token predicts token 1; the prefix when the window
    is empty). Token j predicts token j+1 or, past the last token, the sentence end: a (vocab + 1)-way
    distribution whose last class is "end of sentence", from `end_head` (a learned head or the
    segmentation rule, see segmentation_sllm). The prefix is the context (a backbone output state, or
    in reconstruction the sentence's own vector) projected and expanded to m vectors; the projected
    context is also added to every token embedding (rotated back by the index of the token to predict,
    with rotary pooling, which lines up the encoder state of that token). With `decoder_shares_backbone`
    the layers are the backbone's own, passed in as `layers`, and token embeddings are left as the
    backbone knows them.
    """

    def __init__(self, config, base_model_class: type[PreTrainedModel]):
        shared = config.decoder_shares_backbone
        super().__init__(config, 0 if shared else config.decoder_layers, base_model_class)
        hidden_size = config.text_config.hidden_size
        self.shared = shared
        self.rotary = config.sentence_pooling == "rotary" and not shared
        self.num_prefix = config.decoder_prefix_vectors
        # context [N, H] -> RMS of a token embedding (gain set from the backbone's embeddings at init)
        self.context_norm = nn.RMSNorm(hidden_size, eps=1e-6) if config.decoder_context_norm else None
        self.context_proj = nn.Linear(hidden_size, hidden_size)
        self.prefix_proj = nn.Linear(hidden_size, self.num_prefix * hidden_size) if self.num_prefix > 1 else None
        self.end_head = LearnedSentenceEnd(hidden_size) if config.sentence_end == "learned" else RuleSentenceEnd()

    def condition(self, context: torch.Tensor) -> torch.Tensor:
        """context [N, H] -> decoder conditioning [N, 1, H] (at the token embeddings' scale with `context_norm`)."""
        if self.context_norm is not None:
            context = self.context_norm(context)
        return self.context_proj(context)[:, None]

    def prefix(self, condition: torch.Tensor) -> torch.Tensor:
        """condition [N, 1, H] -> the m prefix vectors [N, m, H]."""
        if self.prefix_proj is None:
            return condition
        return self.prefix_proj(condition).view(condition.shape[0], self.num_prefix, -1)

    def with_context(self, condition: torch.Tensor, token_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """token_embeds [N, L, H] that predict the tokens at sentence indices `targets` [L] or [N, L],
        plus the context as seen there (rotated back by the target index with rotary pooling; nothing
        when the decoder is the backbone) -> decoder inputs [N, L, H]."""
        if self.shared:
            return token_embeds
        return token_embeds + (rotate(condition, -targets) if self.rotary else condition)

    def token_column(
        self, condition: torch.Tensor, token_embeds: torch.Tensor, length: torch.LongTensor
    ) -> torch.Tensor:
        """The inputs [N, 1, H] of the column of a sentence's token `length` - 1 (token_embeds [N, 1, H]), the one
        that predicts token `length` [N], as `layout` fills it (condition [N, 1, H]): what a cached step feeds
        for a row that continues its sentence. Token columns follow each other: its position is the last + 1."""
        return self.with_context(condition, token_embeds, length[:, None])

    def layout(
        self,
        condition: torch.Tensor,
        token_embeds: torch.Tensor,
        window_embeds: torch.Tensor | None = None,
        window_mask: torch.Tensor | None = None,
    ) -> DecoderLayout:
        """condition [N, 1, H], the sentence's token embeddings [N, L, H] (right padding is harmless: the
        decoder is causal) and the window's [N, W, H] with window_mask [N, W] (left padded) -> its inputs."""
        num, length, hidden = token_embeds.shape
        if window_embeds is None:
            window_embeds = token_embeds.new_zeros(num, 0, hidden)
            window_mask = torch.zeros(num, 0, dtype=torch.long, device=token_embeds.device)
        num_window, num_prefix = window_embeds.shape[1], self.num_prefix
        targets = torch.arange(1, length + 1, device=token_embeds.device)  # [L]
        prefix, tokens = self.prefix(condition), self.with_context(condition, token_embeds, targets)
        real = window_mask.new_ones(num, num_prefix + length)  # [N, m+L]
        if self.shared:
            inputs = [prefix, window_embeds, tokens]
            mask = [real[:, :num_prefix], window_mask, real[:, num_prefix:]]
            first = torch.where(window_mask.bool().any(1), num_prefix + num_window - 1, num_prefix - 1)  # [N]
        else:
            inputs, mask = [window_embeds, prefix, tokens], [window_mask, real]
            first = torch.full((num,), num_window + num_prefix - 1, device=token_embeds.device)  # [N]
        mask = torch.cat(mask, 1).long()  # [N, K]
        token_columns = num_window + num_prefix + torch.arange(length, device=token_embeds.device)  # [L]
        return DecoderLayout(
            inputs=torch.cat(inputs, 1),
            mask=mask,
            positions=(mask.cumsum(-1) - 1).clamp(min=0),
            predictors=torch.cat([first[:, None], token_columns.expand(num, length)], 1),  # [N, L+1]
        )

    def forward(self, condition, token_embeds, window_embeds=None, window_mask=None, layers=None, lengths=None):
        """Teacher-forced pass over `layout`'s inputs -> states [N, L+1, H]: state k predicts token k+1 (k = L:
        the sentence end). With `lengths` [N] of right-padded sentences, past each one's end: zeros."""
        layout = self.layout(condition, token_embeds, window_embeds, window_mask)
        states = self.run(layout, layers, lengths)  # [N, K, H]
        index = layout.predictors[..., None].expand(-1, -1, states.shape[-1])  # [N, L+1, H]
        return BaseModelOutput(last_hidden_state=states.gather(1, index))

    def run(
        self, layout: DecoderLayout, layers: nn.Module | None = None, lengths: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """The states of a layout's real columns, uncached and packed: [N, K, H]. With the sentences'
        `lengths` [N], only the columns up to the one that predicts each sentence's end are run (the
        right padding of shorter sentences is skipped); zeros where a column is not run."""
        used = layout.mask.bool()  # [N, K]
        if lengths is not None:
            last = layout.predictors.gather(1, lengths[:, None])  # [N, 1] the column that predicts the end
            used = used & (torch.arange(used.shape[1], device=used.device) <= last)
        return self.run_packed(layout.inputs, used, layout.positions, layers)

    def step(self, inputs, positions, attention_mask, cache, layers=None):
        """One cached step of K layout columns per row, each row at its own positions: inputs [N, K, H],
        positions [N, K], attention_mask [N, cached + K] -> states [N, K, H]."""
        return super().forward(
            inputs, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True, layers=layers
        )

    def token_logits(
        self, states: torch.Tensor, lm_head: nn.Module, candidates: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """states [M, H] -> the backbone's token logits [M, V], or [M, C] for the token ids `candidates` [C].

        For a few rows (generate's) a plain Linear head is applied as W @ states^T: CPU BLAS runs that layout
        much faster (SmolLM2's 49152 x 576 matrix, 8 rows: ~12 ms instead of ~22 ms). Not for many rows (a
        training batch's): the transposed result would be copied by the softmax that reads it.
        """
        if candidates is not None:
            bias = None if lm_head.bias is None else lm_head.bias[candidates]
            return F.linear(states, lm_head.weight[candidates], bias)  # [M, C]
        few_rows = states.shape[0] <= FEW_ROWS
        if few_rows and type(lm_head) is nn.Linear and not hasattr(lm_head, "_hf_hook"):
            tokens = (lm_head.weight @ states.T).T  # [M, V]
            return tokens if lm_head.bias is None else tokens + lm_head.bias
        return lm_head(states)  # a wrapped head (LoRA) or one accelerate moves between devices: call it

    def class_logits(
        self,
        states: torch.Tensor,
        token_logits: torch.Tensor,
        previous: torch.LongTensor,
        length: torch.LongTensor,
        rule: SegmentationRule,
        candidates: torch.LongTensor | None = None,
        before: torch.LongTensor | None = None,
        before_len: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Decoder states [M, H] and their token logits [M, C] -> [M, C+1], the sentence end last, given
        the sentence's token before each target [M] (-1: none yet) and its length so far [M] (and, for a
        sentence with no token yet, the last token and length [M] of the one before, see `RuleEnds`).
        `candidates` [C]: the token ids of the columns, when they are not the whole vocabulary."""
        glued = rule.is_continuation if candidates is None else rule.is_continuation[candidates]  # [C]
        ends = rule.ends(previous, length, before, before_len)
        return self.end_head.class_logits(states, token_logits, ends, glued)

    def target_log_probs(
        self, states, token_logits, previous, length, rule, classes, candidates=None, before=None, before_len=None
    ) -> torch.Tensor:
        """`class_logits`' arguments and a class per row `classes` [M] (C: the end) -> its log-probability
        [M], without the [M, C+1] distribution: what the loss reads."""
        glued = rule.is_continuation if candidates is None else rule.is_continuation[candidates]  # [C]
        ends = rule.ends(previous, length, before, before_len)
        return self.end_head.target_log_probs(states, token_logits, ends, glued, classes)
