"""SLLM configuration: a causal-LM backbone config (`text_config`) plus the Sentence-VAE settings."""

from dataclasses import field

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

SENTENCE_INITS = ("random", "backbone")
OBJECTIVES = ("next_sentence", "reconstruction")
TRAINING_VOCABS = ("full", "in_batch", "sampled")
SENTENCE_POOLINGS = ("mean", "rotary")
DECODER_WARM_STARTS = ("last", "first", "first_last")
BACKBONE_INPUTS = ("encoder", "embedding_mean")
SENTENCE_ENDS = ("learned", "rule")
SENTENCE_UNITS = ("sentence", "clause", "fixed")
BOUNDARY_FIELDS = ("sentence_end_token_ids", "punctuation_end_token_ids", "continuation_token_ids")


class SLLMConfig(PreTrainedConfig):
    r"""
    Configuration of a Sentence-level LLM (SentenceVAE, arXiv 2408.00655) built around any causal LM.

    Args:
        text_config: config of the wrapped causal LM (any `AutoModelForCausalLM` architecture).
        encoder_layers / decoder_layers: depth of the Sentence Encoder / Decoder. Both are small
            instances of the backbone's own architecture (paper's H1/H2/H4 = 1/2/4 layers).
        sentence_num_attention_heads / sentence_intermediate_size: heads and FFN size of those
            layers; `None` keeps the backbone's values (required when `sentence_init="backbone"`).
        sentence_dropout: dropout on the token embeddings fed to the sentence modules and on
            the sentence vectors.
        decoder_word_dropout: in training, the share of the Sentence Decoder's teacher-forced input
            tokens replaced by nothing (only the context is left at that position), so the decoder
            must read the sentence vector instead of guessing from the previous tokens.
        sentence_pooling: how the Sentence Encoder folds its token states into one vector. "mean"
            averages them (order is then only in what attention mixed into each state). "rotary"
            (the default: stage 1 learns several times faster, see the README) rotates each state
            by its position (fixed per-dimension-pair angles, as RoPE does to queries and keys)
            before summing (divided by sqrt(length)), and the Sentence Decoder adds the context
            rotated back by each target's position, so the state of the token to write is read
            out directly (binding by rotation). Both projections between them start as the
            identity so the binding holds from the first step.
        sentence_init: "random" (as in the paper) or "backbone" (encoder warm-started from the
            backbone's first layers, decoder from backbone layers chosen by `decoder_warm_start`,
            and its final norm).
        decoder_warm_start: which backbone layers start the decoder with `sentence_init="backbone"`:
            its "last" `decoder_layers`, its "first" ones, or "first_last" (the first half and the last
            half of them, e.g. layers 0, 1, 28, 29 for 4 decoder layers of a 30-layer backbone).
        decoder_shares_backbone: the Sentence Decoder is the backbone's own decoder (its weights shared,
            not copied; `decoder_layers` is then unused): the quality end of the design space. It keeps
            the sentence-level cache's memory saving but not the per-token compute saving.
        decoder_prefix_vectors: m, the context vector expanded to m prefix vectors that the decoder
            attends to (identity-initialised, so m copies of the context at the start).
        decoder_window: W, the decoder also attends to the last W tokens before the sentence it writes
            (the end of the previous sentences; fewer at the start of a text). In `generate` each row
            keeps a window of W tokens, so the backbone's sentence-level cache stays the only thing
            that grows with the context. 0 = the context vector only.
        backbone_input: what the backbone reads for a sentence: "encoder" (the Sentence Encoder's vector)
            or "embedding_mean" (the mean of the sentence's token embeddings, close to the backbone's
            native input space, plus a zero-initialised learned projection of the encoder's vector).
        contrastive_weight: weight of an in-batch contrastive term in training (next_sentence): each
            decoder condition must pick out the encoder vector of its own sentence among the batch's,
            which keeps contexts from collapsing to one vector. Not part of the evaluation loss.
        sentence_end: how the Sentence Decoder ends a sentence. "learned": an end head scores "end of
            sentence" as one more class at every position. "rule": the segmentation rule decides, as it
            does for the training text, so no end is learned or mis-predicted: the sentence ends for
            sure after a token that always ends one (or at `max_sentence_len` tokens), never after an
            ordinary token, and after . ! ? ; with the probability the decoder gives to a next token
            that is not glued to it (the glued ones continue the sentence). Exact, and one decoder step
            fewer per sentence that ends in a newline.
        decoder_context_norm: scale the context to the token embeddings before the Sentence Decoder reads it
            (an RMS norm whose gain starts at the RMS of the backbone's input embeddings). A backbone output
            state is far larger than a token embedding (SmolLM2: norm ~47 against ~3.2), so added to every
            token embedding unscaled it drowns the identity of the token being read: the decoder then sees
            one vector per sentence and stays at unigram quality. Configs saved before the option read as False.
        sentence_unit: what one position of the backbone holds, as `sentence_boundary_token_ids(tokenizer,
            unit)` derives the boundary ids below: "sentence" (ends after . ! ? ; newlines, CJK ends, eos),
            "clause" (also after , and :, glued tokens kept together as in "3,000"), or "fixed" (units of
            exactly `max_sentence_len` tokens, only eos ends one early). Configs saved before read as "sentence".
        max_sentence_len: longest sentence in tokens; longer ones are split, never truncated.
        sentence_end_token_ids: tokens that always end a sentence (text ending in a newline or
            CJK 。！？；, and eos).
        punctuation_end_token_ids: tokens whose text ends with . ! ? ; they end a sentence unless
            the next token is in `continuation_token_ids`.
        continuation_token_ids: tokens glued to the previous one (no leading space, start with a
            letter or digit), so "3.14" and "os.path" are not cut.
        `sentence_boundary_token_ids(tokenizer)` derives the three lists from a tokenizer.
        objective: the default of forward's `objective` argument: "next_sentence" (SLLM language modelling)
            or "reconstruction" (Sentence-VAE stage 1: each sentence is decoded back from its own vector).
            The training code passes its stage's objective as an argument and leaves this field alone.
        training_vocab: the default of forward's `training_vocab` argument (the training code passes its own):
            "full" softmax over the vocabulary, or "in_batch": in training only, the
            tokens that occur as targets in the batch plus `sampled_negatives` tokens drawn uniformly
            from the vocabulary (a sampled softmax; evaluation and generation always use the full
            vocabulary). The random negatives keep tokens absent from the data from winning the
            full softmax. "sampled": the same candidates with the log-Q correction (each drawn-only
            token's logit - log of its chance to be drawn, about + log(V / sampled_negatives)), so the training loss estimates the full
            softmax's: the cheap softmax for stage 2, whose loss is the perplexity.
        sampled_negatives: with training_vocab "in_batch" or "sampled", the number of vocabulary tokens drawn
            uniformly at random into each training step's softmax.
    """

    model_type = "sllm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    encoder_layers: int = 1
    decoder_layers: int = 1
    sentence_num_attention_heads: int | None = None
    sentence_intermediate_size: int | None = None
    sentence_dropout: float = 0.1
    decoder_word_dropout: float = 0.0
    sentence_pooling: str = "rotary"
    sentence_init: str = "backbone"
    decoder_warm_start: str = "last"
    decoder_shares_backbone: bool = False
    decoder_prefix_vectors: int = 1
    decoder_window: int = 0
    backbone_input: str = "encoder"
    contrastive_weight: float = 0.0
    sentence_end: str = "rule"
    sentence_unit: str = "sentence"
    decoder_context_norm: bool = True
    max_sentence_len: int = 64
    sentence_end_token_ids: list[int] = field(default_factory=list)
    punctuation_end_token_ids: list[int] = field(default_factory=list)
    continuation_token_ids: list[int] = field(default_factory=list)
    objective: str = "next_sentence"
    training_vocab: str = "full"
    sampled_negatives: int = 2048

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "SLLMConfig":
        """Configs saved before an option existed are read as the model they describe: before `sentence_end`,
        a learned end head; before `decoder_context_norm`, no context norm."""
        saved_before = {"sentence_end": "learned", "decoder_context_norm": False}
        config_dict = {name: value for name, value in saved_before.items() if name not in config_dict} | config_dict
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("encoder_layers", "decoder_layers", "max_sentence_len", "decoder_prefix_vectors"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SLLMConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.sampled_negatives, int) or self.sampled_negatives < 0:
            raise ValueError(
                f"SLLMConfig.sampled_negatives must be a non-negative integer, got {self.sampled_negatives!r}"
            )
        for name in ("sentence_dropout", "decoder_word_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SLLMConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.decoder_window, int) or self.decoder_window < 0:
            raise ValueError(f"SLLMConfig.decoder_window must be a non-negative integer, got {self.decoder_window!r}")
        if not isinstance(self.contrastive_weight, (int, float)) or self.contrastive_weight < 0:
            raise ValueError(f"SLLMConfig.contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        for name, choices in (
            ("decoder_warm_start", DECODER_WARM_STARTS),
            ("backbone_input", BACKBONE_INPUTS),
            ("sentence_end", SENTENCE_ENDS),
            ("sentence_unit", SENTENCE_UNITS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"SLLMConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.sentence_init not in SENTENCE_INITS:
            raise ValueError(f"SLLMConfig.sentence_init must be one of {SENTENCE_INITS}, got {self.sentence_init!r}")
        if self.sentence_pooling not in SENTENCE_POOLINGS:
            raise ValueError(
                f"SLLMConfig.sentence_pooling must be one of {SENTENCE_POOLINGS}, got {self.sentence_pooling!r}"
            )
        if self.sentence_pooling == "rotary" and self.text_config.hidden_size % 2:
            raise ValueError(
                f"SLLMConfig.sentence_pooling='rotary' rotates pairs of dimensions: hidden_size "
                f"{self.text_config.hidden_size} must be even"
            )
        if self.training_vocab not in TRAINING_VOCABS:
            raise ValueError(f"SLLMConfig.training_vocab must be one of {TRAINING_VOCABS}, got {self.training_vocab!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SLLMConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("sentence_num_attention_heads", "sentence_intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"SLLMConfig.{name} must be None or a positive integer, got {value!r}")
        if self.sentence_init == "backbone" and (
            self.sentence_num_attention_heads is not None or self.sentence_intermediate_size is not None
        ):
            raise ValueError(
                "SLLMConfig.sentence_init='backbone' copies backbone layers, so sentence_num_attention_heads and "
                "sentence_intermediate_size must stay None"
            )
        num_layers = self.text_config.num_hidden_layers
        if self.sentence_init == "backbone" and max(self.encoder_layers, self.decoder_layers) > num_layers:
            raise ValueError(
                f"SLLMConfig.encoder_layers/decoder_layers ({self.encoder_layers}/{self.decoder_layers}) exceed the "
                f"backbone's {num_layers} layers, so they cannot be warm-started from it"
            )
        vocab_size = self.text_config.vocab_size
        for name in BOUNDARY_FIELDS:
            ids = getattr(self, name)
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"SLLMConfig.{name} holds ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


__all__ = ["SLLMConfig"]
