"""SLLMForCausalLM: a Sentence-level LLM around any Hugging Face causal LM.

Outside, a token-level causal LM (token batches in, `loss` out, `generate` returns tokens).
Inside, each sentence is one position: the Sentence Encoder folds its tokens into a vector,
the backbone runs causally over [start-of-document, sentence_0, ..., sentence_{S-1}], and
the Sentence Decoder writes sentence i from the backbone state at position i, which has
seen only sentences < i.
"""

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_sllm import BOUNDARY_FIELDS, SLLMConfig
from .generation_sllm import SLLMGenerationMixin
from .segmentation_sllm import Segmentation, segment_sentences, sentence_boundary_token_ids
from .sentence_vae import SentenceDecoder, SentenceEncoder, copy_backbone_layers

SENTENCE_MODULES_FILE = "sentence_modules.safetensors"
BACKBONE_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


@dataclass
class SLLMOutput(ModelOutput):
    """Output of `SLLMForCausalLM.forward`.

    loss: total NLL of the scored tokens (sentence-end and end-of-text decisions included)
        divided by the number of scored tokens (labels != -100), or by `num_items_in_batch`.
    sentence_losses: [B, S] NLL of each sentence: its tokens, its end, and the decision that
        it follows at all (next_sentence) — 0 for padding sentences.
    end_of_text_losses: [B] NLL of the final "the text ends here" decision (next_sentence).
    num_tokens: number of scored tokens in the batch.
    sentence_states: [B, S+1, H] backbone output per sentence position (next_sentence).
    token_accuracy / exact_match: reconstruction metrics (objective="reconstruction") over the
        scored targets (tokens and sentence ends) and the `num_sentences` sentences judged.
    """

    loss: torch.FloatTensor | None = None
    sentence_losses: torch.FloatTensor | None = None
    end_of_text_losses: torch.FloatTensor | None = None
    num_tokens: torch.LongTensor | None = None
    sentence_states: torch.FloatTensor | None = None
    token_accuracy: torch.FloatTensor | None = None
    exact_match: torch.FloatTensor | None = None
    num_sentences: torch.LongTensor | None = None


class SLLMPreTrainedModel(PreTrainedModel):
    config_class = SLLMConfig
    base_model_prefix = "sllm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SLLMForCausalLM):
            # Non-persistent lookup tables are derived from the config; fill them here so that
            # from_pretrained (which builds the model on the meta device) gets them too.
            for name in BOUNDARY_FIELDS:
                table = token_table(getattr(self.config, name), self.config.text_config.vocab_size)
                init.copy_(module.boundary_table(name), table)
            if self.config.sentence_pooling == "rotary":  # keep the rotary binding intact at the start
                for projection in (module.sentence_encoder.proj, module.sentence_decoder.context_proj):
                    init.eye_(projection.weight)
                    init.zeros_(projection.bias)


class SLLMForCausalLM(SLLMGenerationMixin, SLLMPreTrainedModel, GenerationMixin):
    """Sentence-level LLM: backbone (`llm`), `sentence_encoder`, `sentence_decoder`, `stop_head`."""

    accepts_loss_kwargs = True

    def __init__(self, config: SLLMConfig, llm: PreTrainedModel | None = None):
        super().__init__(config)
        if llm is None:
            llm = AutoModelForCausalLM.from_config(config.text_config)
        check_backbone(llm)
        hidden_size = config.text_config.hidden_size
        base_model_class = type(llm.get_decoder())
        self.llm = llm
        self.sentence_encoder = SentenceEncoder(config, base_model_class)
        self.sentence_decoder = SentenceDecoder(config, base_model_class)
        self.start_embedding = nn.Embedding(
            1, hidden_size
        )  # learned start-of-document input (a module: PEFT can train it)
        self.stop_head = nn.Linear(hidden_size, 2)  # class 0: another sentence follows, 1: end of text
        vocab_size = config.text_config.vocab_size
        for name in BOUNDARY_FIELDS:  # [V] lookup tables, e.g. `is_sentence_end`
            self.register_buffer(table_name(name), torch.zeros(vocab_size, dtype=torch.bool), persistent=False)
        if self._auto_class is not None:  # register_for_auto_class records one class; AutoModel resolves it too
            config.auto_map = (getattr(config, "auto_map", None) or {}) | {
                "AutoModel": f"{self.__module__.split('.')[-1]}.{type(self).__name__}"
            }
        self.post_init()
        # Transformers drops custom fields (max_new_sentences) when loading a generation config
        # marked as derived from the model config; this one is SLLM's own.
        self.generation_config._from_model_config = False

    @classmethod
    def from_base_model(
        cls,
        model_or_name_or_path: PreTrainedModel | str | os.PathLike,
        tokenizer=None,
        model_kwargs: dict | None = None,
        **config_overrides,
    ) -> "SLLMForCausalLM":
        """Wrap a causal LM (an instance, a Hub id or a local path) without touching its weights;
        the result is in eval mode, like `from_pretrained`.

        Sentence-boundary token ids come from `tokenizer` (loaded from the same path if omitted)
        unless given in `config_overrides`. `model_kwargs` go to `from_pretrained` (e.g.
        `{"gguf_file": ..., "dtype": ...}`); other keyword arguments override `SLLMConfig` fields.
        """
        model_kwargs = dict(model_kwargs or {})
        if isinstance(model_or_name_or_path, (str, os.PathLike)):
            if tokenizer is None:
                tokenizer_kwargs = {k: v for k, v in model_kwargs.items() if k in ("gguf_file", "revision", "token")}
                tokenizer = AutoTokenizer.from_pretrained(model_or_name_or_path, **tokenizer_kwargs)
            llm = AutoModelForCausalLM.from_pretrained(model_or_name_or_path, **model_kwargs)
        else:
            llm = model_or_name_or_path
        check_backbone(llm)
        if "sentence_end_token_ids" not in config_overrides:
            if tokenizer is None:
                raise ValueError("from_base_model needs a tokenizer (or sentence_end_token_ids) to find sentence ends")
            config_overrides = sentence_boundary_token_ids(tokenizer) | config_overrides
        attn_implementation = llm.config._attn_implementation
        drop_gguf_quantization_marker(llm.config)
        config = SLLMConfig(text_config=llm.config, **config_overrides)
        config.text_config._attn_implementation = attn_implementation  # building the config resets it
        model = cls(config, llm=llm).to(device=llm.device, dtype=llm.dtype)
        if config.sentence_init == "backbone":
            backbone = llm.get_decoder()
            num_layers = llm.config.get_text_config().num_hidden_layers
            copy_backbone_layers(backbone, model.sentence_encoder.layers, list(range(config.encoder_layers)))
            last = list(range(num_layers - config.decoder_layers, num_layers))
            copy_backbone_layers(backbone, model.sentence_decoder.layers, last)
        if tokenizer is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            if tokenizer.eos_token_id is not None:
                model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.eval()

    def save_sentence_modules(self, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> None:
        """Save only what SLLM adds to its backbone (sentence modules, start state, stop head) and the
        config: a small file to ship beside a backbone users already have (see `from_sentence_modules`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.to(dtype).contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        save_file(state, folder / SENTENCE_MODULES_FILE, metadata={"format": "pt"})
        self.config.save_pretrained(folder)
        self.generation_config.save_pretrained(folder)

    @classmethod
    def from_sentence_modules(cls, folder: str | os.PathLike, backbone: PreTrainedModel) -> "SLLMForCausalLM":
        """Wrap `backbone` with sentence modules saved by `save_sentence_modules`; refuses a backbone
        whose shape differs from the one they were trained on."""
        folder = Path(folder)
        config = SLLMConfig.from_pretrained(folder)
        trained_on, given = config.text_config, backbone.config.get_text_config()
        for name in BACKBONE_SHAPE_FIELDS:
            if getattr(trained_on, name) != getattr(given, name):
                raise ValueError(
                    f"the sentence modules in {folder} were trained on a backbone with {name}="
                    f"{getattr(trained_on, name)!r}, this backbone has {name}={getattr(given, name)!r}"
                )
        own_fields = {f.name for f in dataclasses.fields(SLLMConfig)} - {
            f.name for f in dataclasses.fields(PreTrainedConfig)
        }
        overrides = {name: getattr(config, name) for name in own_fields - {"text_config"}}
        model = cls.from_base_model(backbone, **overrides)
        state = load_file(folder / SENTENCE_MODULES_FILE)
        missing, unexpected = model.load_state_dict({k: v.to(model.dtype) for k, v in state.items()}, strict=False)
        not_loaded = [k for k in missing if not k.startswith("llm.")]
        if unexpected or not_loaded:
            raise ValueError(
                f"{folder} does not match this SLLM: unexpected {unexpected[:5]}, missing {not_loaded[:5]}"
            )
        if (folder / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

    def boundary_table(self, field_name: str) -> torch.BoolTensor:
        """[V] lookup table of the token ids in config field `field_name`."""
        return getattr(self, table_name(field_name))

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    def segment(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> Segmentation:
        """Split a token batch [B, T] into sentences [B, S, L] (lossless, see segmentation_sllm)."""
        return segment_sentences(
            input_ids,
            attention_mask,
            *(self.boundary_table(name) for name in BOUNDARY_FIELDS),
            self.config.max_sentence_len,
        )

    def encode_sentences(self, sentences: torch.LongTensor, lengths: torch.LongTensor) -> torch.Tensor:
        """Sentences [N, L] with lengths [N] (all > 0) -> sentence vectors [N, H]."""
        return self.sentence_encoder(self.get_input_embeddings()(sentences), lengths)

    def run_backbone(self, sentence_vectors, sentence_mask, cache=None, use_cache=False):
        """Backbone over sentence vectors [B, S, H] -> output states [B, S, H] (and its cache).

        `sentence_mask` [B, past + S] covers cached and new positions; positions count real
        sentences only, so left padding is handled.
        """
        position_ids = (sentence_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -sentence_vectors.shape[1] :]
        return self.llm.get_decoder()(
            inputs_embeds=sentence_vectors,
            attention_mask=sentence_mask.long(),
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )

    def start_states(self, batch_size: int) -> torch.Tensor:
        """The learned start-of-document input, [B, 1, H]."""
        return self.start_embedding.weight.expand(batch_size, 1, -1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> SLLMOutput:
        """Token batch [B, T] -> SLLMOutput. Labels must equal input_ids, or -100 where a token
        is not to be scored (padding, a prompt); every other token is scored, the first included."""
        if inputs_embeds is not None:
            raise ValueError("SLLMForCausalLM reads token ids: pass input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("SLLMForCausalLM.forward needs input_ids")
        segmentation = self.segment(input_ids, attention_mask)
        empty = (segmentation.num_sentences == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} of input_ids are empty or all padding: nothing to encode")
        scored = self.scored_tokens(input_ids, attention_mask, labels, segmentation)  # [B, S, L]

        sentence_mask = segmentation.sentence_mask  # [B, S]
        sentences = segmentation.sentences[sentence_mask]  # [N, L]
        lengths = segmentation.lengths[sentence_mask]  # [N]
        vectors = self.encode_sentences(sentences, lengths)  # [N, H]
        if self.config.objective == "reconstruction":
            return self.reconstruction_loss(vectors, sentences, lengths, scored[sentence_mask], num_items_in_batch)

        batch, num_sentences = sentence_mask.shape
        sentence_vectors = vectors.new_zeros(batch, num_sentences, vectors.shape[-1])
        sentence_vectors[sentence_mask] = vectors  # [B, S, H]
        inputs = torch.cat([self.start_states(batch), sentence_vectors], dim=1)  # [B, S+1, H]
        mask = torch.cat([sentence_mask.new_ones(batch, 1), sentence_mask], dim=1)  # [B, S+1]
        states = self.run_backbone(inputs, mask).last_hidden_state  # [B, S+1, H]

        # Sentence i is decoded from state i (which has seen sentences < i only).
        token_nll, _, _ = self.decode_nll(
            states[:, :-1][sentence_mask], sentences, lengths, scored[sentence_mask]
        )  # [N]
        # Stop decisions: "continue" before each sentence, "end of text" after the last one.
        stop_log_probs = F.log_softmax(self.stop_head(states).float(), dim=-1)  # [B, S+1, 2]
        first_scored = scored[..., 0]  # [B, S]
        continue_nll = -stop_log_probs[:, :-1, 0] * first_scored  # [B, S]
        sentence_losses = continue_nll.masked_scatter(sentence_mask, token_nll + continue_nll[sentence_mask])
        last = segmentation.num_sentences  # [B], state index after the last sentence
        rows = torch.arange(batch, device=input_ids.device)
        last_scored = scored[rows, last - 1, segmentation.lengths[rows, last - 1] - 1]  # [B]
        end_of_text_losses = -stop_log_probs[rows, last, 1] * last_scored  # [B]

        num_tokens = scored.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
        loss = (sentence_losses.sum() + end_of_text_losses.sum()) / denominator
        return SLLMOutput(
            loss=loss,
            sentence_losses=sentence_losses,
            end_of_text_losses=end_of_text_losses,
            num_tokens=num_tokens,
            sentence_states=states,
        )

    def scored_tokens(self, input_ids, attention_mask, labels, segmentation: Segmentation) -> torch.BoolTensor:
        """[B, S, L] True where a token is scored: real tokens whose label is not -100."""
        real = segmentation.token_index >= 0
        if labels is None:
            return real
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        used = labels != -100
        if attention_mask is not None:
            used = used & attention_mask.bool()
        if bool((labels[used] != input_ids[used]).any()):
            raise ValueError("labels must equal input_ids where they are not -100: SLLM scores the input text itself")
        return real & segmentation.gather(used, 0).bool()

    def decode_nll(self, context, sentences, lengths, scored):
        """Teacher-forced NLL of sentences [N, L] decoded from context [N, H].

        Targets: tokens t1..tn then the sentence end; scored like the token they follow.
        Returns per sentence [N]: the NLL, the argmax-correct targets and the scored targets.
        """
        num = sentences.shape[0]
        vocab_size = self.config.text_config.vocab_size
        condition = self.sentence_decoder.condition(context)  # [N, 1, H]
        embeds = self.get_input_embeddings()(sentences)  # [N, L, H]
        if self.training and self.config.decoder_word_dropout > 0:
            kept = torch.rand(sentences.shape, device=embeds.device) >= self.config.decoder_word_dropout  # [N, L]
            embeds = embeds * kept[..., None].to(embeds.dtype)
        states = self.sentence_decoder(condition, embeds).last_hidden_state  # [N, L+1, H]

        targets = torch.cat([sentences, sentences.new_zeros(num, 1)], dim=1)  # [N, L+1]
        rows = torch.arange(num, device=sentences.device)
        targets[rows, lengths] = vocab_size  # end-of-sentence class after the last token
        target_scored = torch.cat([scored, scored.new_zeros(num, 1)], dim=1)  # [N, L+1]
        target_scored[rows, lengths] = scored[rows, lengths - 1]

        picked = target_scored.nonzero(as_tuple=True)  # only scored positions reach the vocab projection
        logits, classes = self.output_logits(states[picked], targets[picked])  # [M, C+1], [M]
        nll = F.cross_entropy(logits.float(), classes, reduction="none")  # [M]
        sentence_nll = nll.new_zeros(num).index_add(0, picked[0], nll)  # [N]
        correct = (logits.argmax(-1) == classes).float()
        sentence_correct = nll.new_zeros(num).index_add(0, picked[0], correct)  # [N]
        return sentence_nll, sentence_correct, target_scored.sum(-1)

    def output_logits(self, states: torch.Tensor, targets: torch.LongTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """Decoder states [M, H] -> logits [M, C+1] and target classes [M] (the sentence end is class C).

        C is the whole vocabulary, except in training with `training_vocab="in_batch"`: then only
        the tokens that occur as targets in the batch, plus `sampled_negatives` tokens drawn
        uniformly from the vocabulary, compete (a sampled softmax), which skips most of the
        vocabulary projection. Evaluation and generation always use all of it.
        """
        lm_head, vocab_size = self.get_output_embeddings(), self.config.text_config.vocab_size
        if not (self.training and self.config.training_vocab == "in_batch"):
            return self.sentence_decoder.logits(states, lm_head), targets
        # The random negatives push down tokens the data never shows; without them such tokens
        # keep whatever logit they drift to and win the full-vocabulary argmax at evaluation.
        negatives = torch.randint(vocab_size, (self.config.sampled_negatives,), device=targets.device)
        candidates = torch.unique(torch.cat([targets[targets < vocab_size], negatives]))  # [C] sorted token ids
        token_logits = F.linear(
            states, lm_head.weight[candidates], None if lm_head.bias is None else lm_head.bias[candidates]
        )
        logits = torch.cat([token_logits, self.sentence_decoder.end_head(states)], dim=-1)  # [M, C+1]
        classes = torch.where(targets < vocab_size, torch.searchsorted(candidates, targets), len(candidates))
        return logits, classes

    def reconstruction_loss(self, vectors, sentences, lengths, scored, num_items_in_batch) -> SLLMOutput:
        """Sentence-VAE stage 1: decode each sentence from its own vector."""
        sentence_nll, correct, total = self.decode_nll(vectors, sentences, lengths, scored)
        judged = total > 0
        num_tokens = scored.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
        return SLLMOutput(
            loss=sentence_nll.sum() / denominator,
            num_tokens=num_tokens,
            token_accuracy=correct.sum() / total.sum().clamp(min=1),
            exact_match=(correct[judged] == total[judged]).float().mean(),
            num_sentences=judged.sum(),
        )


def token_table(token_ids: list[int], vocab_size: int) -> torch.BoolTensor:
    """[vocab] boolean lookup table of `token_ids`."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[list(token_ids)] = True
    return table


def drop_gguf_quantization_marker(config) -> None:
    """GGUF weights are dequantized to floats on load, but the config keeps a `quantization_config`
    that would make the saved SLLM look quantized (Trainer then refuses to train it): drop it."""
    quantization = getattr(config, "quantization_config", None)
    quant_method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    quant_method = quant_method or getattr(quantization, "quant_method", None)
    if quant_method == "gguf":
        del config.quantization_config


def table_name(field_name: str) -> str:
    """Buffer name of a boundary lookup table: "sentence_end_token_ids" -> "is_sentence_end"."""
    return "is_" + field_name.removesuffix("_token_ids")


def check_backbone(llm: nn.Module) -> None:
    """Refuse, with a clear error, a model SLLM cannot drive with sentence vectors."""
    if not isinstance(llm, PreTrainedModel):
        raise TypeError(f"the backbone must be a transformers PreTrainedModel, got {type(llm).__name__}")
    if llm.config.is_encoder_decoder:
        raise ValueError(f"{type(llm).__name__} is an encoder-decoder model; SLLM wraps decoder-only causal LMs")
    decoder = llm.get_decoder()
    if decoder is llm or "inputs_embeds" not in inspect.signature(decoder.forward).parameters:
        raise ValueError(
            f"{type(llm).__name__} cannot take inputs_embeds through get_decoder(); SLLM feeds sentence vectors "
            "to the backbone and needs a causal LM whose decoder accepts inputs_embeds"
        )


__all__ = ["SLLMForCausalLM", "SLLMPreTrainedModel", "SLLMOutput"]
