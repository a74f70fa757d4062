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
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
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

from .configuration_sllm import OBJECTIVES, TRAINING_VOCABS, SLLMConfig
from .continuous_batching import SLLMContinuousBatchingMixin
from .generation_sllm import SLLMGenerationMixin
from .loss_sllm import SLLMOutput, contrastive_loss, next_sentence_losses, reconstruction_losses
from .segmentation_sllm import Segmentation, SegmentationRule, sentence_boundary_token_ids
from .targets_sllm import Targets, choose_targets
from .transformers_compat import attn_implementation, keep_custom_generation_fields, set_attn_implementation
from .sentence_vae import SentenceDecoder, SentenceEncoder, copy_backbone_layers, token_window
from .token_logits import next_token_logits

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

    @torch.compiler.disable  # data-dependent shapes: eager under torch.compile, the modules after it traced
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
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
        loss_over: str = "next_tokens",
        objective: str | None = None,
        training_vocab: str | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> SLLMOutput | tuple:
        """Token batch [B, T] -> SLLMOutput (a tuple with `return_dict=False`), as a causal LM: `loss` and `logits`.

        Labels must equal input_ids, or -100 where a token is not to be scored (padding, a prompt); as in every
        causal LM, `loss` scores each labelled token from the columns before it (see SLLMOutput). `logits`
        [B, T, V]: by default outside training (`return_logits`; in training the loss reads one class per
        target and builds none), of the last `logits_to_keep` columns (0: all). `loss_over="text"`
        makes `loss` the text loss (the first token and the end of text scored too: SLLMTrainer's objective).
        `return_token_log_probs=True` adds `token_log_probs` [B, T] (next_sentence). Training choices are
        arguments, as the training code passes them (SLLMTrainer): `objective` ("next_sentence" or stage 1's
        "reconstruction") and `training_vocab` (the training softmax, see `candidate_logits`); None: the
        config's defaults (configs saved before they were arguments keep theirs)."""
        return_dict, output_hidden_states, output_attentions, objective, training_vocab = self.forward_settings(
            input_ids, inputs_embeds, return_dict, output_hidden_states, output_attentions, return_token_log_probs,
            loss_over, objective, training_vocab,
        )  # fmt: skip
        keep = self.logits_columns(return_logits, logits_to_keep, input_ids.shape[1], objective)
        segmentation = self.segment(input_ids, attention_mask)
        self.check_sentences(segmentation, objective)
        targets = choose_targets(
            input_ids, attention_mask, labels, segmentation, self.end_is_decision(segmentation),
            self.end_of_text_token(), self.config.text_config.vocab_size,
        )  # fmt: skip
        sentence_mask = segmentation.sentence_mask  # [B, S]
        sentences = segmentation.sentences[sentence_mask]  # [N, L]
        lengths = segmentation.lengths[sentence_mask]  # [N]
        codes, vectors = self.encode(sentences, lengths)  # [N, H] each: sentence vectors, backbone inputs
        if objective == "reconstruction":
            output = self.reconstruction_output(codes, sentences, lengths, targets, sentence_mask, num_items_in_batch,
                                                training_vocab)  # fmt: skip
        else:
            inputs, mask = self.backbone_inputs(vectors, sentence_mask)  # [B, S+1, H], [B, S+1]
            backbone = self.run_backbone(
                inputs, mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions
            )
            output = self.next_sentence_output(
                input_ids, attention_mask, segmentation, targets, codes, inputs, backbone.last_hidden_state,
                num_items_in_batch, return_token_log_probs, keep, training_vocab,
            )  # fmt: skip
            output.hidden_states, output.attentions = backbone.hidden_states, backbone.attentions
        if loss_over == "text":
            output.loss = output.text_loss
        return output if return_dict else output.to_tuple()

    def forward_settings(
        self, input_ids, inputs_embeds, return_dict, output_hidden_states, output_attentions, return_token_log_probs,
        loss_over, objective, training_vocab,
    ) -> tuple:  # fmt: skip
        """forward's arguments resolved against the config and checked, each refusal naming its argument:
        (return_dict, output_hidden_states, output_attentions, objective, training_vocab)."""
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        if loss_over not in ("next_tokens", "text"):
            raise ValueError(f"loss_over must be 'next_tokens' or 'text', got {loss_over!r}")
        objective, training_vocab = objective or config.objective, training_vocab or config.training_vocab
        for name, value, choices in (("objective", objective, OBJECTIVES), ("training_vocab", training_vocab, TRAINING_VOCABS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.check_forward_inputs(
            input_ids, inputs_embeds, output_hidden_states or output_attentions or return_token_log_probs, objective
        )
        if output_attentions and (attention := attn_implementation(self.llm.config)) != "eager":
            raise ValueError(
                f"output_attentions needs the backbone's eager attention, it runs "
                f"{attention!r}: load the model with attn_implementation='eager'"
            )
        return return_dict, output_hidden_states, output_attentions, objective, training_vocab

    def next_sentence_output(
        self, input_ids, attention_mask, segmentation, targets: Targets, codes, inputs, states, num_items_in_batch,
        return_token_log_probs, keep, training_vocab,
    ) -> SLLMOutput:  # fmt: skip
        """The next-sentence pass after the backbone (its inputs and output states [B, S+1, H]): the Sentence
        Decoder over the sentences a loss (or the logits) reads, each target's log-probability (with the
        `training_vocab` softmax), the losses from those tensors, and the logits of the last `keep` columns
        (None: none, 0: all)."""
        config, sentence_mask = self.config, segmentation.sentence_mask
        stop_log_probs = F.log_softmax(self.stop_head(states).float(), dim=-1)  # [B, S+1, 2]
        # only sentences with a target to score reach the decoder (a long unscored context costs one backbone
        # position per sentence, not a decoder pass); the logits read every sentence
        decoded = targets.needed.any(-1) if keep is None else sentence_mask  # [B, S]
        decoder_states = self.decode_sentences(input_ids, attention_mask, segmentation, states, decoded)
        target_nll = self.target_nll(decoder_states, targets, decoded, training_vocab)  # [B, S, L+1]
        extra_nll = None
        if self.training and config.contrastive_weight > 0:
            queries = self.sentence_decoder.condition(states[:, :-1][decoded])[:, 0]  # [N', H]
            extra_nll = config.contrastive_weight * contrastive_loss(queries, codes[decoded[sentence_mask]])
        losses = next_sentence_losses(
            target_nll, stop_log_probs, segmentation, targets.scored, targets.causal, targets.end_paid,
            targets.eos_first, num_items_in_batch, input_ids.shape[1], return_token_log_probs, extra_nll,
        )  # fmt: skip
        logits = None
        if keep is not None:
            logits = self.next_token_logits(
                input_ids, attention_mask, segmentation, inputs, states, stop_log_probs, decoder_states, keep
            )
        return SLLMOutput(**losses, logits=logits, sentence_states=states)

    def reconstruction_output(
        self, codes, sentences, lengths, targets: Targets, sentence_mask, num_items_in_batch, training_vocab
    ) -> SLLMOutput:
        """Sentence-VAE stage 1: each sentence [N, L] (the `sentence_mask` [B, S] ones) decoded from its own vector
        [N, H]."""
        states = self.decode(codes, sentences, lengths)  # [N, L+1, H]
        scored = targets.scored[sentence_mask]  # [N, L]
        targets, previous = targets.classes[sentence_mask], targets.previous[sentence_mask]  # [N, L+1]
        rows = torch.arange(len(lengths), device=lengths.device)
        last_scored = scored[rows, lengths - 1]
        ends = self.segmentation_rule.ends(previous[rows, lengths], lengths)
        judged = F.pad(scored, (0, 1)).index_put(  # the end: a decision to pay where the rule may end
            (rows, lengths), last_scored & self.sentence_decoder.end_head.may_end(ends)
        )  # [N, L+1]
        index = judged.nonzero(as_tuple=True)
        logits, classes = self.output_logits(
            states[index], targets[index], previous[index], index[1], training_vocab=training_vocab
        )  # [M, C+1]
        log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, classes[:, None])[:, 0]  # [M]
        target_nll = log_probs.new_zeros(targets.shape).index_put(index, -log_probs)
        correct = torch.zeros_like(judged).index_put(index, logits.argmax(-1) == classes)
        return SLLMOutput(**reconstruction_losses(target_nll, correct, judged, scored, num_items_in_batch))

    def logits_columns(self, return_logits: bool | None, logits_to_keep: int, seq_len: int, objective: str) -> int | None:
        """How many last columns get logits (0: all, None: none): by default (`return_logits=None`) all outside
        training where the model has a token-level distribution, none in training. Asked for where it has
        none: refused, naming why."""
        reason = self.no_token_distribution(objective)
        if return_logits is None:
            return_logits = not (self.training or reason)
        if not return_logits:
            return None
        if reason:
            raise ValueError(f"this SLLM gives no logits: {reason}")
        if not 0 <= int(logits_to_keep) <= seq_len:
            raise ValueError(f"logits_to_keep must be in [0, {seq_len}] (0: every column), got {logits_to_keep}")
        return int(logits_to_keep)

    def no_token_distribution(self, objective: str = "next_sentence") -> str | None:
        """Why the model (run with `objective`) has no exact token-level distribution, or None."""
        if objective != "next_sentence":
            return f"objective={objective!r} does not predict the next token"
        if self.config.sentence_end != "rule":
            return (
                f"sentence_end={self.config.sentence_end!r}: a text has many segmentations and no exact token-level "
                "distribution (loss and token_log_probs score the rule's segmentation)"
            )
        if self.end_of_text_token() is None:
            return "the model has no eos_token_id to give the end of text to"
        return None

    def end_of_text_token(self) -> int | None:
        """The eos token id that stands for the stop head's end of text (the first of the generation config's)."""
        eos = self.generation_config.eos_token_id
        eos = self.config.text_config.eos_token_id if eos is None else eos
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return eos

    def end_is_decision(self, segmentation: Segmentation) -> torch.BoolTensor:
        """[B, S]: whether each sentence's end is a decision the decoder pays (where the rule could end it)."""
        ends = self.segmentation_rule.ends(segmentation.last_tokens, segmentation.lengths)
        return self.sentence_decoder.end_head.may_end(ends) & segmentation.sentence_mask

    def decode(self, context, sentences, lengths, window=None) -> torch.Tensor:
        """The teacher-forced Sentence Decoder: sentences [N, L] (lengths [N]) from context [N, H] (a backbone
        state, or in reconstruction the sentence's own vector) and, with `decoder_window`, window = (ids, mask)
        [N, W] of the tokens before each -> states [N, L+1, H]: state j predicts target j (j = length: the end)."""
        condition = self.sentence_decoder.condition(context)  # [N, 1, H]
        embeds = self.get_input_embeddings()(sentences)  # [N, L, H]
        if self.training and self.config.decoder_word_dropout > 0:
            kept = torch.rand(sentences.shape, device=embeds.device) >= self.config.decoder_word_dropout  # [N, L]
            embeds = embeds * kept[..., None].to(embeds.dtype)
        window_embeds = window_mask = None
        if window is not None:
            window_embeds, window_mask = self.get_input_embeddings()(window[0]), window[1]  # [N, W, H], [N, W]
        return self.sentence_decoder(
            condition, embeds, window_embeds, window_mask, layers=self.decoder_layers(), lengths=lengths
        ).last_hidden_state

    def decode_sentences(self, input_ids, attention_mask, segmentation, states, decoded) -> torch.Tensor:
        """The `decoded` sentences [B, S] (N' of them), each from its backbone state (states [B, S+1, H]) and
        the tokens before it -> decoder states [N', L+1, H]."""
        window = None
        if self.config.decoder_window:
            start = segmentation.token_index[..., 0]  # [B, S]: column of each sentence's first token
            ids, real = token_window(input_ids, attention_mask, start, self.config.decoder_window)  # [B, S, W]
            window = (ids[decoded], real[decoded])
        context = states[:, :-1][decoded]  # [N', H]
        return self.decode(context, segmentation.sentences[decoded], segmentation.lengths[decoded], window)

    def target_nll(self, decoder_states, targets: Targets, decoded, training_vocab=None) -> torch.Tensor:
        """The NLL [B, S, L+1] of the needed targets (0 elsewhere) from the decoder states [N', L+1, H] of the
        `decoded` sentences [B, S]: only those targets reach the vocabulary projection."""
        slot = decoded.view(-1).cumsum(0).view_as(decoded) - 1  # [B, S]: each decoded sentence's row
        index = targets.needed.nonzero(as_tuple=True)  # (b, i, j) of each needed target
        sentence = index[:2]
        log_probs = self.target_log_probs(
            decoder_states[slot[sentence], index[2]], targets.classes[index], targets.previous[index], index[2],
            targets.before[sentence], targets.before_len[sentence], training_vocab,
        )  # fmt: skip
        return log_probs.new_zeros(targets.classes.shape).index_put(index, -log_probs)

    def candidate_logits(
        self, states: torch.Tensor, targets: torch.LongTensor, training_vocab: str | None = None
    ) -> tuple[torch.Tensor, torch.LongTensor | None, torch.LongTensor]:
        """Decoder states [M, H] -> the token logits [M, C] that compete, their token ids [C] (None: the whole
        vocabulary) and the target classes [M] (the sentence end is class C).

        C is the whole vocabulary, except in training with `training_vocab="in_batch"` or "sampled": then
        only the tokens that occur as targets in the batch, plus `sampled_negatives` tokens drawn
        uniformly from the vocabulary, compete (a sampled softmax), which skips most of the
        vocabulary projection. "sampled" also corrects each candidate's logit by -log(its inclusion
        probability) (log-Q correction: 0 for the batch's targets, -log(1 - (1 - 1/V)^k), about log(V / k),
        for a token only drawn among the k negatives), so the loss it optimises estimates the full
        softmax's rather than a biased one. Evaluation and generation always use the whole vocabulary.
        `training_vocab`: as the training code asks (None: the config's default).
        """
        decoder, config = self.sentence_decoder, self.config
        lm_head, vocab_size = self.get_output_embeddings(), config.text_config.vocab_size
        training_vocab = training_vocab or config.training_vocab
        if not (self.training and training_vocab in ("in_batch", "sampled")):
            return decoder.token_logits(states, lm_head), None, targets  # [M, V]
        # The random negatives push down tokens the data never shows; without them such tokens
        # keep whatever logit they drift to and win the full-vocabulary argmax at evaluation.
        num_negatives = config.sampled_negatives
        negatives = torch.randint(vocab_size, (num_negatives,), device=targets.device)
        batch_targets = targets[targets < vocab_size]
        candidates = torch.unique(torch.cat([batch_targets, negatives]))  # [C] sorted token ids
        token_logits = decoder.token_logits(states, lm_head, candidates)  # [M, C]
        if training_vocab == "sampled" and num_negatives:
            drawn_only = ~torch.isin(candidates, batch_targets)  # [C]
            included = 1 - (1 - 1 / vocab_size) ** num_negatives  # chance that a token is drawn at all
            token_logits = token_logits - drawn_only * math.log(included)
        classes = torch.where(targets < vocab_size, torch.searchsorted(candidates, targets), len(candidates))
        return token_logits, candidates, classes

    def output_logits(self, states, targets, previous, length, before=None, before_len=None, training_vocab=None):
        """Decoder states [M, H] -> logits [M, C+1] over `candidate_logits`' tokens and the sentence end (class
        C), and the target classes [M]; previous [M] and length [M]: the sentence's token before each target
        (-1: none) and its length so far; before, before_len [M]: the sentence before's last token and length."""
        token_logits, candidates, classes = self.candidate_logits(states, targets, training_vocab)
        logits = self.sentence_decoder.class_logits(
            states, token_logits, previous, length, self.segmentation_rule, candidates, before, before_len
        )
        return logits, classes

    def target_log_probs(
        self, states, targets, previous, length, before=None, before_len=None, training_vocab=None
    ) -> torch.Tensor:
        """`output_logits`' log-probability of each target [M], without its [M, C+1] distribution."""
        token_logits, candidates, classes = self.candidate_logits(states, targets, training_vocab)
        return self.sentence_decoder.target_log_probs(
            states, token_logits, previous, length, self.segmentation_rule, classes, candidates, before, before_len
        )

    def next_token_logits(
        self, input_ids, attention_mask, segmentation, inputs, states, stop_log_probs, decoder_states, keep
    ) -> torch.Tensor:
        """The logits [B, T', V] of the last `keep` columns (0: all; see token_logits.py), from the backbone's
        inputs and states [B, S+1, H], the stop head's log-probs [B, S+1, 2] and every sentence's decoder states
        [N, L+1, H]. Where the rule may end a sentence but the text goes on with a glued token (os.path), the
        sentence that would have ended there is read by the encoder and the backbone here, as generate would."""
        batch, seq_len = input_ids.shape
        first_column = seq_len - keep if keep else 0
        lengths, sentence_mask = segmentation.lengths, segmentation.sentence_mask  # [B, S]
        every = decoder_states.new_zeros(*lengths.shape, *decoder_states.shape[1:])  # [B, S, L+1, H]
        every[sentence_mask] = decoder_states
        hidden = states.shape[-1]
        continuation = states.new_zeros(batch, seq_len, hidden)  # [B, T, H]: what continues each column's sentence
        opening = states.new_zeros(batch, seq_len, hidden)  # [B, T, H]: what opens the next sentence after it
        stop = stop_log_probs.new_zeros(batch, seq_len, 2)  # [B, T, 2]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hard = ~real  # a padding column: the start state's first token, as after a sure end
        opens = ~real
        pads = (~real).nonzero(as_tuple=True)
        opening[pads], stop[pads] = every[pads[0], 0, 0], stop_log_probs[pads[0], 0]

        b, i, j = (segmentation.token_index >= first_column).nonzero(as_tuple=True)  # real tokens kept
        column = segmentation.token_index[b, i, j]
        continuation[b, column] = every[b, i, j + 1]
        ends = self.segmentation_rule.ends(segmentation.sentences[b, i, j], j + 1)
        hard[b, column], opens[b, column] = ends.hard, ends.hard | ends.punctuation
        last = j == lengths[b, i] - 1  # the sentence ends here (the rule ended it, or the text does)
        ended = last & opens[b, column]  # the backbone has read it: the state after it exists
        stop[b[ended], column[ended]] = stop_log_probs[b[ended], i[ended] + 1]
        follows = ended & (i + 1 < segmentation.num_sentences[b])
        opening[b[follows], column[follows]] = every[b[follows], i[follows] + 1, 0]
        final = ended & ~follows  # the text's last sentence: the state after it, no sentence yet
        glued_on = ~last & opens[b, column]  # a rule end the text goes on from (after punctuation, a glued token)
        hypothetical = self.hypothetical_states(inputs, segmentation, b, i, j, glued_on)  # [P, H]
        stop[b[glued_on], column[glued_on]] = F.log_softmax(self.stop_head(hypothetical).float(), dim=-1)
        after = torch.cat([states[b[final], i[final] + 1], hypothetical])  # the states whose first token is missing
        where = (torch.cat([b[final], b[glued_on]]), torch.cat([column[final], column[glued_on]]))
        if len(after):
            window = None
            if self.config.decoder_window:
                ids, real_window = token_window(
                    input_ids[where[0]], attention_mask[where[0]] if attention_mask is not None else None,
                    (where[1] + 1)[:, None], self.config.decoder_window,
                )  # fmt: skip
                window = (ids[:, 0], real_window[:, 0])
            nothing = input_ids.new_zeros(len(after), 0)  # a sentence with no token yet: its first token's state
            opening[where] = self.decode(after, nothing, nothing.new_zeros(len(after)), window)[:, 0]

        kept = slice(first_column, seq_len)
        opens, hard = opens[:, kept], hard[:, kept]
        decoder, lm_head = self.sentence_decoder, self.get_output_embeddings()
        continuation_logits = decoder.token_logits(continuation[:, kept].flatten(0, 1), lm_head)  # [B*T', V]
        return next_token_logits(
            continuation_logits.view(batch, seq_len - first_column, -1),
            decoder.token_logits(opening[:, kept][opens], lm_head),
            opens,
            stop[:, kept][opens],
            hard[opens],
            self.segmentation_rule.is_continuation,
            self.end_of_text_token(),
        )

    def hypothetical_states(self, inputs, segmentation, b, i, j, picked) -> torch.Tensor:
        """Backbone states [P, H] after sentence i of row b cut after its token j, for the `picked` (b, i, j):
        the encoder reads the cut sentence, the backbone [start, sentences < i, the cut sentence] (inputs
        [B, S+1, H])."""
        b, i, j = b[picked], i[picked], j[picked]
        if len(b) == 0:
            return inputs.new_zeros(0, inputs.shape[-1])
        tokens = segmentation.sentences[b, i]  # [P, L]
        vectors = self.encode(tokens, j + 1)[1].to(inputs.dtype)  # [P, H]: only the first j + 1 tokens are read
        width = int(i.max()) + 2
        rows = torch.arange(len(b), device=b.device)
        hypothetical = inputs[b, :width].index_put((rows, i + 1), vectors)  # [P, width, H]
        mask = torch.arange(width, device=b.device) <= (i + 1)[:, None]  # [P, width]
        return self.run_backbone(hypothetical, mask).last_hidden_state[rows, i + 1]

    def check_forward_inputs(self, input_ids, inputs_embeds, backbone_outputs_asked: bool, objective: str) -> None:
        """Refuse, before any lookup, what forward cannot read or answer."""
        if inputs_embeds is not None:
            raise ValueError("SLLMForCausalLM reads token ids: pass input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("SLLMForCausalLM.forward needs input_ids")
        self.check_token_ids(input_ids)
        if objective != "next_sentence" and backbone_outputs_asked:
            raise ValueError(
                f"objective={objective!r} does not run the backbone: output_hidden_states, "
                "output_attentions and return_token_log_probs are next_sentence outputs"
            )

    @torch.compiler.disable  # reads counts on the host: eager under torch.compile
    def check_sentences(self, segmentation: Segmentation, objective: str) -> None:
        """Every row has a sentence, and (next_sentence) the backbone has a position for each."""
        empty = (segmentation.num_sentences == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} of input_ids are empty or all padding: nothing to encode")
        positions = self.max_backbone_positions() if objective == "next_sentence" else None
        if positions is not None and (most := int(segmentation.num_sentences.max())) + 1 > positions:
            raise ValueError(
                f"a row of input_ids has {most} sentences: with the start state the backbone needs {most + 1} "
                f"positions, but {type(self.llm).__name__} has {positions} (max_position_embeddings)"
            )

    def backbone_inputs(self, vectors, sentence_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone inputs of the N sentences [N, H] placed by sentence_mask [B, S] -> the backbone's inputs
        [start, sentence_0, ..., sentence_{S-1}] [B, S+1, H] and their mask [B, S+1]."""
        batch, num_sentences = sentence_mask.shape
        sentence_vectors = vectors.new_zeros(batch, num_sentences, vectors.shape[-1])
        sentence_vectors[sentence_mask] = vectors  # [B, S, H]
        inputs = torch.cat([self.start_states(batch, vectors.device), sentence_vectors], dim=1)  # [B, S+1, H]
        return inputs, torch.cat([sentence_mask.new_ones(batch, 1), sentence_mask], dim=1)

    def sentence_states(self, vectors, sentence_mask, output_hidden_states=False, output_attentions=False):
        """Backbone inputs of the N sentences [N, H] placed by sentence_mask [B, S] -> the backbone's output
        over [start, sentence_0, ..., sentence_{S-1}]: last_hidden_state [B, S+1, H]."""
        inputs, mask = self.backbone_inputs(vectors, sentence_mask)
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
