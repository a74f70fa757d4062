"""Loading SLLMs and the models they wrap: a checkpoint in either form (a full SLLM folder, or sentence modules
around a base model), a base causal LM with its tokenizer, and the names of the sentence modules (what a LoRA run
saves beside the adapter). Used by the training script's --init_from, the benchmarks and users' own code; not
part of the remote code.
"""

import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .embedded_backbone import SMOLLM2_GGUF, load_smollm2, smollm2_folder
from .modeling_sllm import SLLMForCausalLM

# The SLLM's own modules around the backbone: trained in every stage, saved with a LoRA adapter (`modules_to_save`).
SENTENCE_MODULES = ["sentence_encoder", "sentence_decoder", "stop_head", "start_embedding"]
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What the two save methods write: save_pretrained's weights, save_sentence_modules' file (modules only).
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
SENTENCE_MODULES_FILE = "sentence_modules.safetensors"


def with_pad_token(tokenizer):
    """The tokenizer, given eos as its pad token if it has none (before a model is built from it, so the
    saved generation config has it)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str):
    """The tokenizer of a base model name as --base_model takes it ('smollm2': the embedded one's)."""
    if name == "smollm2":
        return with_pad_token(AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF))
    return with_pad_token(AutoTokenizer.from_pretrained(name))


def load_base_model(name: str) -> tuple[PreTrainedModel, object, str]:
    """(causal LM, its tokenizer with a pad token, its name) for a Hub id or local path, or 'smollm2': the
    embedded SmolLM2-135M."""
    if name == "smollm2":
        llm, tokenizer = load_smollm2()
        return llm, with_pad_token(tokenizer), SMOLLM2_NAME
    try:
        llm = AutoModelForCausalLM.from_pretrained(name)
    except ValueError as error:  # e.g. an encoder-decoder or an encoder-only checkpoint
        reason = str(error).splitlines()[0]
        raise ValueError(f"{name} cannot be wrapped: it is not a causal LM ({reason})") from error
    return llm, load_tokenizer(name), name


def checkpoint_folder(source: str | os.PathLike) -> Path:
    """A local folder as is; anything else is read as a Hub model id and downloaded."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source} is a file: an SLLM checkpoint is a folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source)))
    except Exception as error:  # an invalid id, no such repo, offline: name what was asked for
        raise FileNotFoundError(
            f"{source}: no such folder, and no Hub model repo of that id could be fetched "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def load_sllm(
    source: str | os.PathLike, base_model: str = "smollm2", allow_other_backbone: bool = False
) -> tuple[SLLMForCausalLM, object, str]:
    """(SLLM model, tokenizer with a pad token, base model name) from an SLLM checkpoint in either form:

    - a full SLLM folder (`save_pretrained`: config.json + the model's weights; its tokenizer if saved
      beside it, else `base_model`'s);
    - a sentence-modules folder (`save_sentence_modules`: config.json + sentence_modules.safetensors, no
      backbone), wrapped around `base_model` with `SLLMForCausalLM.from_sentence_modules` (which refuses a
      backbone other than the one they were trained on unless `allow_other_backbone`).

    `source` is a local folder or a Hub model id; `base_model` as --base_model takes it. Used by the
    training script's --init_from and the generation benchmark's --checkpoint."""
    folder = checkpoint_folder(source)
    if (folder / SENTENCE_MODULES_FILE).exists():
        llm, tokenizer, name = load_base_model(base_model)
        model = SLLMForCausalLM.from_sentence_modules(folder, llm, allow_other_backbone=allow_other_backbone)
        return model, tokenizer, name
    if (folder / "config.json").exists() and any((folder / weights).exists() for weights in FULL_WEIGHTS):
        model = SLLMForCausalLM.from_pretrained(folder)
        has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_tokenizer(str(folder) if has_tokenizer else base_model)
        return model, tokenizer, model.config.text_config.name_or_path or base_model
    raise ValueError(
        f"{source} holds no SLLM checkpoint: neither a full SLLM folder (config.json + {FULL_WEIGHTS[0]}, written "
        f"by save_pretrained) nor a sentence-modules folder (config.json + {SENTENCE_MODULES_FILE}, written by "
        f"save_sentence_modules); it has {sorted(p.name for p in folder.iterdir())[:10]}"
    )
