"""SLLMForCausalLM: a Sentence-level LLM around any Hugging Face causal LM.

Outside, a token-level causal LM (token batches in, `loss` out, `generate` returns tokens).
Inside, each sentence is one position: the Sentence Encoder folds its tokens into a vector,
the backbone runs causally over [start-of-document, sentence_0, ..., sentence_{S-1}], and
the Sentence Decoder writes sentence i from the backbone state at position i, which has
seen only sentences < i.
"""

import copy
import dataclasses
import hashlib
import inspect
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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

from .configuration_sllm import SLLMConfig
from .continuous_batching import SLLMContinuousBatchingMixin
from .generation_sllm import SLLMGenerationMixin
from .loss_sllm import SLLMOutput, next_sentence_loss, reconstruction_loss, scored_tokens
from .segmentation_sllm import Segmentation, SegmentationRule, sentence_boundary_token_ids
from .transformers_compat import attn_implementation, keep_custom_generation_fields, set_attn_implementation
from .sentence_vae import SentenceDecoder, SentenceEncoder, copy_backbone_layers

SENTENCE_MODULES_FILE = "sentence_modules.safetensors"
BACKBONE_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
FINGERPRINT_KEY = "backbone_fingerprint"  # safetensors metadata of SENTENCE_MODULES_FILE


class SLLMPreTrainedModel(PreTrainedModel):
    config_class = SLLMConfig
    base_model_prefix = "sllm"
    # Kept whole by device_map="auto"; post_init adds the backbone's own (its decoder-layer classes).
    _no_split_modules = ["SentenceEncoder", "SentenceDecoder"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # Transformers skips a remote-code module whose own parameters and buffers are all loaded, for code
        # that writes weights in place; that test passes for a module with none (the model itself), whose
        # `_init_weights` sets up its children. Ours uses `transformers.initialization`, which leaves loaded
        # tensors alone, so the shortcut is not needed.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SLLMForCausalLM):
            # Non-persistent lookup tables are derived from the config; fill them here so that
            # from_pretrained (which builds the model on the meta device) gets them too.
            rule = module.segmentation_rule
            for name, table in rule.tables_from_config().items():
                init.copy_(getattr(rule, name), table)
            encoder, decoder = module.sentence_encoder, module.sentence_decoder
            if self.config.sentence_pooling == "rotary":  # keep the rotary binding intact at the start
                for projection in (encoder.proj, decoder.context_proj):
                    init.eye_(projection.weight)
                    init.zeros_(projection.bias)
            embeddings = module.llm.get_input_embeddings().weight
            if decoder.context_norm is not None and not embeddings.is_meta:  # loaded when built on meta
                init.constant_(decoder.context_norm.weight, float(embeddings.detach().float().pow(2).mean().sqrt()))
            if decoder.prefix_proj is not None:  # m copies of the context at the start
                hidden_size = self.config.text_config.hidden_size
                init.copy_(decoder.prefix_proj.weight, torch.eye(hidden_size).repeat(decoder.num_prefix, 1))
                init.zeros_(decoder.prefix_proj.bias)
            # Start from what the backbone knows: no context in a shared decoder, no residual on its inputs.
            zero_at_start = [encoder.input_proj] + ([decoder.context_proj] if decoder.shared else [])
            for projection in filter(None, zero_at_start):
                init.zeros_(projection.weight)
                init.zeros_(projection.bias)


class SLLMForCausalLM(SLLMGenerationMixin, SLLMContinuousBatchingMixin, SLLMPreTrainedModel, GenerationMixin):
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
        positions, decoder_positions = self.max_backbone_positions(), self.decoder_positions()
        if positions is not None and decoder_positions > positions:
            raise ValueError(
                f"max_sentence_len={config.max_sentence_len} needs {decoder_positions} positions in the Sentence "
                f"Decoder (decoder_window + decoder_prefix_vectors + max_sentence_len), but {type(llm).__name__} "
                f"has {positions} (max_position_embeddings)"
            )
        self.sentence_encoder = SentenceEncoder(config, base_model_class)
        self.sentence_decoder = SentenceDecoder(config, base_model_class)
        self.start_embedding = nn.Embedding(
            1, hidden_size
        )  # learned start-of-document input (a module: PEFT can train it)
        self.stop_head = nn.Linear(hidden_size, 2)  # class 0: another sentence follows, 1: end of text
        self.segmentation_rule = SegmentationRule(config)  # [V] lookup tables, e.g. `is_sentence_end`
        if self._auto_class is not None:  # register_for_auto_class records one class; AutoModel resolves it too
            config.auto_map = (getattr(config, "auto_map", None) or {}) | {
                "AutoModel": f"{self.__module__.split('.')[-1]}.{type(self).__name__}"
            }
        self.post_init()
        # Transformers drops custom fields (max_new_sentences) when loading a generation config
        # marked as derived from the model config; this one is SLLM's own.
        keep_custom_generation_fields(self.generation_config)

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
            unit = config_overrides.get("sentence_unit", "sentence")
            config_overrides = sentence_boundary_token_ids(tokenizer, unit) | config_overrides
        attention = attn_implementation(llm.config)
        drop_gguf_quantization_marker(llm.config)
        config = SLLMConfig(text_config=llm.config, **config_overrides)
        set_attn_implementation(config.text_config, attention)  # building the config resets it
        if config.sentence_init == "backbone" and any(p.is_meta for p in llm.parameters()):
            raise ValueError(
                "sentence_init='backbone' copies backbone layers, but this backbone has offloaded weights (on "
                "the meta device): use sentence_init='random', or load the backbone without offloading"
            )
        model = cls(config, llm=llm)
        # Only the new modules move: a backbone spread over devices (device_map) stays where it is.
        device = execution_device(llm.get_input_embeddings())
        for child in model.children():
            if child is not llm:
                child.to(device=device, dtype=llm.dtype)  # floating-point weights only: the rule's tables stay bool
        if config.sentence_init == "backbone":
            backbone = llm.get_decoder()
            num_layers = llm.config.get_text_config().num_hidden_layers
            copy_backbone_layers(backbone, model.sentence_encoder.layers, list(range(config.encoder_layers)))
            if not config.decoder_shares_backbone:
                copy_backbone_layers(backbone, model.sentence_decoder.layers, decoder_start_layers(config, num_layers))
        if tokenizer is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            if tokenizer.eos_token_id is not None:
                model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.eval()

    def save_sentence_modules(self, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> None:
        """Save only what SLLM adds to its backbone (sentence modules, start state, stop head) and the
        config: a small file to ship beside a backbone users already have (see `from_sentence_modules`).
        The file's metadata records the backbone's `backbone_fingerprint`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.to(dtype).contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        metadata = {"format": "pt", FINGERPRINT_KEY: backbone_fingerprint(self.llm)}
        save_file(state, folder / SENTENCE_MODULES_FILE, metadata=metadata)
        config = copy.deepcopy(self.config)
        vars(config).pop("auto_map", None)  # modules alone are no remote-code checkpoint: no auto_map, no code copied
        config.to_json_file(folder / "config.json")
        self.generation_config.save_pretrained(folder)

    @classmethod
    def from_sentence_modules(
        cls, folder: str | os.PathLike, backbone: PreTrainedModel, allow_other_backbone: bool = False
    ) -> "SLLMForCausalLM":
        """Wrap `backbone` with sentence modules saved by `save_sentence_modules`. Refuses a backbone whose
        shape differs from the one they were trained on, and one with other weights (its
        `backbone_fingerprint` differs) unless `allow_other_backbone=True` (e.g. a fine-tuned copy)."""
        folder = Path(folder)
        if not (folder / SENTENCE_MODULES_FILE).is_file() or not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} holds no sentence modules: from_sentence_modules needs a folder written by "
                f"save_sentence_modules, with config.json and {SENTENCE_MODULES_FILE}"
                + ("" if folder.is_dir() else " (the folder does not exist)")
            )
        config = SLLMConfig.from_pretrained(folder)
        trained_on, given = config.text_config, backbone.config.get_text_config()
        for name in BACKBONE_SHAPE_FIELDS:
            if getattr(trained_on, name) != getattr(given, name):
                raise ValueError(
                    f"the sentence modules in {folder} were trained on a backbone with {name}="
                    f"{getattr(trained_on, name)!r}, this backbone has {name}={getattr(given, name)!r}"
                )
        with safe_open(str(folder / SENTENCE_MODULES_FILE), "pt") as file:
            trained_fingerprint = (file.metadata() or {}).get(FINGERPRINT_KEY)
            state = {key: file.get_tensor(key) for key in file.keys()}
        if trained_fingerprint is None:
            warnings.warn(
                f"{folder / SENTENCE_MODULES_FILE} records no backbone fingerprint (saved by an older version): "
                "cannot check that these sentence modules were trained on this backbone"
            )
        elif not allow_other_backbone and trained_fingerprint != (fingerprint := backbone_fingerprint(backbone)):
            raise ValueError(
                f"the sentence modules in {folder} were trained on another backbone: backbone fingerprint "
                f"{trained_fingerprint} when saved, {fingerprint} for this one (same shape, other weights). "
                "Pass allow_other_backbone=True to load them anyway (e.g. onto a fine-tuned copy of that backbone)"
            )
        own_fields = {f.name for f in dataclasses.fields(SLLMConfig)} - {
            f.name for f in dataclasses.fields(PreTrainedConfig)
        }
        overrides = {name: getattr(config, name) for name in own_fields - {"text_config"}}
        # The saved weights replace the initial ones: no backbone layers to copy (offloaded ones cannot be).
        model = cls.from_base_model(backbone, **overrides | {"sentence_init": "random"})
        model.config.sentence_init = config.sentence_init
        missing, unexpected = model.load_state_dict({k: v.to(model.dtype) for k, v in state.items()}, strict=False)
        not_loaded = [k for k in missing if not k.startswith("llm.")]
        if unexpected or not_loaded:
            raise ValueError(
                f"{folder} does not match this SLLM: unexpected {unexpected[:5]}, missing {not_loaded[:5]}"
            )
        if (folder / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

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
        return self.segmentation_rule.segment(input_ids, attention_mask)

    def encode(self, sentences: torch.LongTensor, lengths: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentences [N, L] with lengths [N] (all > 0) -> (sentence vectors [N, H], backbone inputs [N, H])."""
        embeds = self.get_input_embeddings()(sentences)  # [N, L, H]
        vectors = self.sentence_encoder(embeds, lengths)
        return vectors, self.sentence_encoder.backbone_inputs(vectors, embeds, lengths)

    def encode_sentences(self, sentences: torch.LongTensor, lengths: torch.LongTensor) -> torch.Tensor:
        """Sentences [N, L] with lengths [N] (all > 0) -> what the backbone reads for them, [N, H]."""
        return self.encode(sentences, lengths)[1]

    def decoder_layers(self) -> nn.Module | None:
        """The backbone's decoder when the Sentence Decoder shares it, else None (its own layers)."""
        return self.llm.get_decoder() if self.config.decoder_shares_backbone else None

    def run_backbone(
        self, sentence_vectors, sentence_mask, cache=None, use_cache=False, output_hidden_states=False,
        output_attentions=False,
    ):  # fmt: skip
        """Backbone over sentence vectors [B, S, H] -> output states [B, S, H] (and its cache, and
        per layer its hidden states and attentions if asked).

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
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    def start_states(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """The learned start-of-document input, [B, 1, H], on `device` (default: where it is stored).
        Looked up through the module, so accelerate loads it when it is offloaded."""
        device = device or self.start_embedding.weight.device
        return self.start_embedding(torch.zeros(batch_size, 1, dtype=torch.long, device=device)).to(device)

    def check_token_ids(self, input_ids: torch.LongTensor) -> None:
        """Raise a ValueError if `input_ids` hold ids outside the vocabulary [0, vocab_size)."""
        vocab_size = self.config.text_config.vocab_size
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(outside.any()):
            found = input_ids[outside].unique()[:5].tolist()
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab_size}): {found}")

    def max_backbone_positions(self) -> int | None:
        """How many positions the backbone (and the sentence modules, its architecture) can take when
        it has learned absolute position embeddings (GPT-2, OPT); None for rotary positions (no limit)."""
        decoder = self.llm.get_decoder()
        token_embeddings = set(decoder.get_input_embeddings().modules())
        learned = any(isinstance(m, nn.Embedding) and m not in token_embeddings for m in decoder.modules())
        return self.config.text_config.max_position_embeddings if learned else None

    def decoder_positions(self) -> int:
        """Positions the Sentence Decoder uses at most: window, prefix vectors, then the sentence's tokens."""
        config = self.config
        return config.decoder_window + config.decoder_prefix_vectors + config.max_sentence_len

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_token_log_probs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> SLLMOutput | tuple:
        """Token batch [B, T] -> SLLMOutput (a tuple with `return_dict=False`). Labels must equal input_ids,
        or -100 where a token is not to be scored (padding, a prompt); every other token is scored, the
        first included. `return_token_log_probs=True` adds `token_log_probs` [B, T] (next_sentence)."""
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        self.check_forward_inputs(
            input_ids, inputs_embeds, output_hidden_states or output_attentions or return_token_log_probs
        )
        if output_attentions and (attention := attn_implementation(self.llm.config)) != "eager":
            raise ValueError(
                f"output_attentions needs the backbone's eager attention, it runs "
                f"{attention!r}: load the model with attn_implementation='eager'"
            )
        segmentation = self.segment(input_ids, attention_mask)
        self.check_sentences(segmentation)
        scored = scored_tokens(input_ids, attention_mask, labels, segmentation)  # [B, S, L]
        sentence_mask = segmentation.sentence_mask  # [B, S]
        sentences = segmentation.sentences[sentence_mask]  # [N, L]
        lengths = segmentation.lengths[sentence_mask]  # [N]
        codes, vectors = self.encode(sentences, lengths)  # [N, H] each: sentence vectors, backbone inputs
        if config.objective == "reconstruction":
            output = reconstruction_loss(self, codes, sentences, lengths, scored[sentence_mask], num_items_in_batch)
        else:
            backbone = self.sentence_states(vectors, sentence_mask, output_hidden_states, output_attentions)
            output = next_sentence_loss(
                self, input_ids, attention_mask, segmentation, scored, codes, backbone, num_items_in_batch,
                return_token_log_probs,
            )  # fmt: skip
        return output if return_dict else output.to_tuple()

    def check_forward_inputs(self, input_ids, inputs_embeds, backbone_outputs_asked: bool) -> None:
        """Refuse, before any lookup, what forward cannot read or answer."""
        if inputs_embeds is not None:
            raise ValueError("SLLMForCausalLM reads token ids: pass input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("SLLMForCausalLM.forward needs input_ids")
        self.check_token_ids(input_ids)
        if self.config.objective != "next_sentence" and backbone_outputs_asked:
            raise ValueError(
                f"objective={self.config.objective!r} does not run the backbone: output_hidden_states, "
                "output_attentions and return_token_log_probs are next_sentence outputs"
            )

    def check_sentences(self, segmentation: Segmentation) -> None:
        """Every row has a sentence, and (next_sentence) the backbone has a position for each."""
        empty = (segmentation.num_sentences == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} of input_ids are empty or all padding: nothing to encode")
        positions = self.max_backbone_positions() if self.config.objective == "next_sentence" else None
        if positions is not None and (most := int(segmentation.num_sentences.max())) + 1 > positions:
            raise ValueError(
                f"a row of input_ids has {most} sentences: with the start state the backbone needs {most + 1} "
                f"positions, but {type(self.llm).__name__} has {positions} (max_position_embeddings)"
            )

    def sentence_states(self, vectors, sentence_mask, output_hidden_states=False, output_attentions=False):
        """Backbone inputs of the N sentences [N, H] placed by sentence_mask [B, S] -> the backbone's
        output over [start, sentence_0, ..., sentence_{S-1}]: last_hidden_state [B, S+1, H]."""
        batch, num_sentences = sentence_mask.shape
        sentence_vectors = vectors.new_zeros(batch, num_sentences, vectors.shape[-1])
        sentence_vectors[sentence_mask] = vectors  # [B, S, H]
        inputs = torch.cat([self.start_states(batch, vectors.device), sentence_vectors], dim=1)  # [B, S+1, H]
        mask = torch.cat([sentence_mask.new_ones(batch, 1), sentence_mask], dim=1)  # [B, S+1]
        return self.run_backbone(
            inputs, mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )

def decoder_start_layers(config: SLLMConfig, num_layers: int) -> list[int]:
    """Backbone layers that warm-start the Sentence Decoder (`decoder_warm_start`)."""
    count = config.decoder_layers
    if config.decoder_warm_start == "first":
        return list(range(count))
    if config.decoder_warm_start == "first_last":
        return list(range(count - count // 2)) + list(range(num_layers - count // 2, num_layers))
    return list(range(num_layers - count, num_layers))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device if it dispatched the module (its weights
    may be offloaded), else its weights' device."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


@torch.no_grad()
def backbone_fingerprint(llm: PreTrainedModel) -> str:
    """sha256 of the backbone's input-embedding matrix rounded to bfloat16 (and of its shape): the same
    for float32 and bfloat16 copies of one backbone, different for other weights or vocabularies."""
    embeddings = llm.get_input_embeddings()
    ids = torch.arange(embeddings.weight.shape[0], device=execution_device(embeddings))
    weight = embeddings(ids).to("cpu", torch.bfloat16).contiguous()  # [V, H], looked up: offloaded ones load
    digest = hashlib.sha256(str(tuple(weight.shape)).encode())
    digest.update(weight.view(torch.int16).numpy())
    return digest.hexdigest()


def drop_gguf_quantization_marker(config) -> None:
    """GGUF weights are dequantized to floats on load, but the config keeps a `quantization_config`
    that would make the saved SLLM look quantized (Trainer then refuses to train it): drop it."""
    quantization = getattr(config, "quantization_config", None)
    quant_method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    quant_method = quant_method or getattr(quantization, "quant_method", None)
    if quant_method == "gguf":
        del config.quantization_config


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
