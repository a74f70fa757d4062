"""SLLM: sentence-level LLMs (SentenceVAE) for Hugging Face Transformers.

Importing the package registers `SLLMConfig` / `SLLMForCausalLM` with AutoConfig, AutoModel
and AutoModelForCausalLM; saved checkpoints also carry the code for `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_sllm import SLLMConfig
from .cache_surgery import cache_nbytes
from .hub import build_model_card, push_to_hub_with_card
from .loading import SENTENCE_MODULES, load_sllm
from .modeling_sllm import SLLMForCausalLM, SLLMOutput, SLLMPreTrainedModel
from .segmentation_sllm import Segmentation, segment_sentences, sentence_boundary_token_ids
from .streaming_cache import SinkWindowCache, generate_with_sink_window, sink_window_forward
from .from_scratch import build_scratch_sllm, build_scratch_token_lm, multiply_adds_per_token, scratch_boundaries
from .tokenizer_training import train_bpe_tokenizer

AutoConfig.register(SLLMConfig.model_type, SLLMConfig)
AutoModel.register(SLLMConfig, SLLMForCausalLM)
AutoModelForCausalLM.register(SLLMConfig, SLLMForCausalLM)
# Saved checkpoints carry the code and an auto_map for all three Auto classes.
SLLMConfig.register_for_auto_class()
SLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "SLLMConfig",
    "SLLMForCausalLM",
    "SLLMOutput",
    "SLLMPreTrainedModel",
    "SENTENCE_MODULES",
    "load_sllm",
    "Segmentation",
    "build_model_card",
    "push_to_hub_with_card",
    "cache_nbytes",
    "SinkWindowCache",
    "generate_with_sink_window",
    "sink_window_forward",
    "build_scratch_sllm",
    "build_scratch_token_lm",
    "multiply_adds_per_token",
    "scratch_boundaries",
    "train_bpe_tokenizer",
    "segment_sentences",
    "sentence_boundary_token_ids",
]
