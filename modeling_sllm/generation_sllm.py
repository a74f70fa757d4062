"""`generate` for SLLMForCausalLM: Transformers' generation settings resolved (`LoopSettings`), the options the
sentence loop does not implement refused by name, then the loop (sentence_loop.py) run on the prompts."""

import copy
import warnings
from collections.abc import Callable

import torch
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessorList,
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .sentence_loop import LoopSettings, SentenceLoop, SentenceModelParts
from .transformers_compat import (
    attn_implementation,
    logits_processors,
    prepare_generation_config,
    special_token_tensors,
)

# Options of Transformers' generate that the sentence loop does not implement, and when each is in use.
UNSUPPORTED_OPTIONS: dict[str, Callable[[object], bool]] = {
    "num_beams": lambda value: value is not None and value > 1,
    "num_beam_groups": lambda value: value is not None and value > 1,
    "diversity_penalty": bool,
    "penalty_alpha": bool,  # contrastive search
    "constraints": lambda value: value is not None,
    "force_words_ids": lambda value: value is not None,
    "dola_layers": lambda value: value is not None,
    "prompt_lookup_num_tokens": lambda value: value is not None,  # assisted generation
    "assistant_early_exit": lambda value: value is not None,
    "use_mtp": bool,
    "guidance_scale": lambda value: value not in (None, 1, 1.0),  # needs an unconditional forward pass
    "token_healing": bool,
    "prefill_chunk_size": lambda value: value is not None,
    "cache_implementation": lambda value: value not in (None, "dynamic", "static"),
    "output_attentions": bool,
    "output_hidden_states": bool,
}


def check_generation_options(config: GenerationConfig, model_kwargs: dict) -> None:
    """Refuse, naming them, the generate options and arguments the sentence loop does not implement."""
    refused = [name for name, in_use in UNSUPPORTED_OPTIONS.items() if in_use(getattr(config, name, None))]
    refused += [name for name, value in model_kwargs.items() if value is not None and name not in UNSUPPORTED_OPTIONS]
    if refused:
        raise ValueError(
            f"SLLMForCausalLM.generate does not support {', '.join(f'`{name}`' for name in refused)}: its sentence "
            "loop does greedy decoding and sampling, with the options listed in the README's Generation section"
        )


def new_token_budget(config: GenerationConfig, has_default_max_length: bool, prompt_len: int) -> int:
    """New tokens per row, as Transformers counts them: `max_new_tokens`; else `max_length` minus the
    (padded) prompt; else the default `max_length` (20) of new tokens, with Transformers' warning."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if has_default_max_length:
        warnings.warn(
            f"Using the model-agnostic default `max_length` (={config.max_length}) to control the generation "
            "length. We recommend setting `max_new_tokens` to control the maximum length of the generation.",
            UserWarning,
        )
        return config.max_length
    if prompt_len >= config.max_length:
        raise ValueError(
            f"Input length of input_ids is {prompt_len}, but `max_length` is set to {config.max_length}. This can "
            "lead to unexpected behavior. You should consider increasing `max_length` or, better yet, setting "
            "`max_new_tokens`."
        )
    return config.max_length - prompt_len



class SLLMGenerationMixin:
    """`generate` for SLLMForCausalLM, with the interface of Transformers' `generate`."""

    def sentence_model_parts(self) -> SentenceModelParts:
        """The parts of this model the sentence loop uses."""
        config = self.config
        return SentenceModelParts(
            text_config=config.text_config,
            decoder_window=config.decoder_window,
            segmentation_rule=self.segmentation_rule,
            sentence_decoder=self.sentence_decoder,
            decoder_layers=self.decoder_layers(),
            embed_tokens=self.get_input_embeddings(),
            lm_head=self.get_output_embeddings(),
            stop_head=self.stop_head,
            encode_sentences=self.encode_sentences,
            run_backbone=self.run_backbone,
            start_states=self.start_states,
            backbone_positions=self.max_backbone_positions(),
            decoder_columns=config.decoder_window + self.sentence_decoder.num_prefix + config.max_sentence_len,
            decoder_num_layers=(self.decoder_layers() or self.sentence_decoder.layers).config.num_hidden_layers,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """Token prompts [B, T] (left padded) -> [B * num_return_sequences, T + new] token ids, rows
        padded with the pad id. What it honours and refuses: the README's Generation section."""
        settings, input_ids, attention_mask = self._loop_settings(
            input_ids, attention_mask, generation_config, logits_processor, stopping_criteria, streamer, **kwargs
        )
        return SentenceLoop(self.sentence_model_parts(), settings, input_ids, attention_mask).run()

    def _loop_settings(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList | None,
        streamer: BaseStreamer | None,
        **kwargs,
    ) -> tuple[LoopSettings, torch.LongTensor, torch.Tensor]:
        """Resolve a generate call as Transformers does (its generation config, special tokens, logits
        processors, stopping criteria): the loop's settings and the prompts [B * copies, P] with their mask."""
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and self.generation_config.max_length is None
        )
        config, model_kwargs = prepare_generation_config(self, generation_config, **kwargs)
        max_new_sentences = model_kwargs.pop("max_new_sentences", getattr(config, "max_new_sentences", None))
        tokenizer = model_kwargs.pop("tokenizer", None)  # for stop_strings, as in Transformers
        check_generation_options(config, model_kwargs)
        if input_ids is None:
            input_ids = torch.empty(1, 0, dtype=torch.long, device=self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.check_token_ids(input_ids)
        # Several (sampled) sequences per prompt: each row repeated, as Transformers does.
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        prompt_len, device = input_ids.shape[1], input_ids.device
        max_new_tokens = new_token_budget(config, has_default_max_length, prompt_len)
        eos, pad = special_token_tensors(self, config, device)
        eos = torch.empty(0, dtype=torch.long, device=device) if eos is None else eos.view(-1)
        # min_new_tokens (or min_length, counted over the padded prompt) is enforced per row here,
        # since rows write at different speeds: no processor for it.
        min_new_tokens = config.min_new_tokens
        if min_new_tokens is None:
            min_new_tokens = max((config.min_length or 0) - prompt_len, 0)
        processor_config = copy.deepcopy(config)
        processor_config.min_new_tokens, processor_config.min_length = None, 0
        processor_config.max_length = prompt_len + max_new_tokens
        processors = logits_processors(
            self, processor_config, prompt_len, logits_processor or LogitsProcessorList(), device
        )
        # Transformers' own criteria (max_length, eos) are handled per row; keep max_time, stop_strings.
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if config.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        settings = LoopSettings(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            max_new_sentences=max_new_sentences,
            do_sample=bool(config.do_sample),
            use_cache=config.use_cache is not False,
            eos=eos,
            pad_id=int(pad) if pad is not None else int(eos[0]) if eos.numel() else 0,
            processors=processors,
            criteria=criteria,
            streamer=streamer,
            output_scores=bool(config.return_dict_in_generate and config.output_scores),
            output_logits=bool(config.return_dict_in_generate and config.output_logits),
            return_dict=bool(config.return_dict_in_generate),
            static_cache=config.cache_implementation == "static",
            compile_options=self._compile_options(config),
        )
        return settings, input_ids, attention_mask

    def _compile_options(self, config: GenerationConfig) -> dict | None:
        """torch.compile's arguments for the decoder step: with `cache_implementation="static"`, from
        `compile_config` (Transformers' defaults without one), on every device; None (eager) otherwise or with
        `disable_compile`. The static step's 4D mask needs an attention that reads one (sdpa or eager)."""
        if config.cache_implementation != "static":
            return None
        if config.use_cache is False:
            raise ValueError('cache_implementation="static" caches the decoder\'s steps: it needs use_cache=True')
        layers = self.decoder_layers() or self.sentence_decoder.layers
        implementation = attn_implementation(layers.config)
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f'cache_implementation="static" needs the Sentence Decoder\'s attention to be "sdpa" or "eager" (it '
                f"reads a 4D mask over each row's slots), not {implementation!r}"
            )
        if config.disable_compile:
            return None
        return (config.compile_config or CompileConfig()).to_dict()
