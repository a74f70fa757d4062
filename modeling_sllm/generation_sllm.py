"""Sentence-by-sentence generation with a sentence-level KV cache.

Per step: the stop head decides whether the text ends; if not, the Sentence Decoder writes
the next sentence token by token (its own small cache lives only for that sentence); the
sentence is encoded to one vector and the backbone takes one cached step. The backbone cache
therefore holds one entry per sentence, plus one for the start-of-document state.
"""

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    MaxTimeCriteria,
    StopStringCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: the keys and values of every layer."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def right_align(values: torch.Tensor, lengths: torch.LongTensor, fill) -> torch.Tensor:
    """Move each row's first `lengths[b]` entries to the end of the row, `fill` before them.

    values [B, W, ...], lengths [B] -> [B, W, ...]: turns right padding into left padding.
    """
    batch, width = values.shape[:2]
    index = torch.arange(width, device=values.device) - (width - lengths)[:, None]  # [B, W]
    trailing = [1] * (values.dim() - 2)
    gathered = values.gather(1, index.clamp(min=0).view(batch, width, *trailing).expand_as(values))
    keep = (index >= 0).view(batch, width, *trailing)
    return torch.where(keep, gathered, torch.as_tensor(fill, dtype=values.dtype, device=values.device))


class SentenceWriter:
    """The token buffer of a generate call: prompts [B, P] plus up to `max_new_tokens` new tokens per row."""

    def __init__(self, input_ids: torch.LongTensor, max_new_tokens: int, pad_id: int):
        batch = input_ids.shape[0]
        self.input_ids = input_ids
        self.pad_id = pad_id
        self.max_new_tokens = max_new_tokens
        self.new_tokens = input_ids.new_full((batch, max_new_tokens), pad_id)  # [B, M], right padded
        self.num_new = torch.zeros(batch, dtype=torch.long, device=input_ids.device)  # [B] finished sentences
        self.sentence_len = torch.zeros_like(self.num_new)  # [B] tokens of the sentence being written

    def append(self, token: torch.LongTensor, rows: torch.BoolTensor) -> None:
        """Write token [B] at the end of each row in `rows`."""
        column = (self.num_new + self.sentence_len).clamp(max=self.max_new_tokens - 1)[:, None]
        self.new_tokens.scatter_(1, column, torch.where(rows, token, self.new_tokens.gather(1, column)[:, 0])[:, None])
        self.sentence_len += rows.long()

    def close_sentence(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The sentence just written, tokens [B, Ls] (pad after each row's end) and lengths [B]."""
        width = int(self.sentence_len.max())
        offsets = torch.arange(width, device=self.num_new.device)
        columns = (self.num_new[:, None] + offsets).clamp(max=self.max_new_tokens - 1)  # [B, Ls]
        written = offsets < self.sentence_len[:, None]
        sentence = self.new_tokens.gather(1, columns).masked_fill(~written, self.pad_id)
        lengths = self.sentence_len
        self.num_new = self.num_new + lengths
        self.sentence_len = torch.zeros_like(lengths)
        return sentence, lengths

    @property
    def written(self) -> torch.LongTensor:
        """New tokens per row so far, the current sentence included: [B]."""
        return self.num_new + self.sentence_len

    def left_padded(self) -> torch.LongTensor:
        """Prompt + new tokens as a left-padded batch [B, W]: the layout Transformers' logits
        processors and stopping criteria expect (each row's last token in the last column)."""
        full = torch.cat([self.input_ids, self.new_tokens], 1)  # [B, P+M]
        prompt_len = self.input_ids.shape[1]
        width = prompt_len + int(self.written.max())
        return right_align(full, prompt_len + self.written, self.pad_id)[:, full.shape[1] - width :]

    def sequences(self) -> torch.LongTensor:
        """[B, P + new]: prompts as given, then the new tokens, rows padded with the pad id."""
        width = int(self.num_new.max()) if self.num_new.numel() else 0
        return torch.cat([self.input_ids, self.new_tokens[:, :width]], 1)


class SLLMGenerationMixin:
    """`generate` for SLLMForCausalLM, with the interface of Transformers' `generate`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """Token prompts [B, T] (left padded) -> [B, T + new] token ids, rows padded with the pad id.

        Honours max_new_tokens (a hard cap), min_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty and the other logits processors, eos_token_id, pad_token_id,
        use_cache, output_scores, return_dict_in_generate, and `max_new_sentences`. Scores are one
        [B, V+1] tensor per decoder step (last column: the sentence end; -inf for idle rows).
        """
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        max_new_sentences = model_kwargs.pop("max_new_sentences", getattr(config, "max_new_sentences", None))
        tokenizer = model_kwargs.pop("tokenizer", None)  # for stop_strings, as in Transformers
        if model_kwargs:
            raise ValueError(f"generate() got arguments SLLM does not use: {sorted(model_kwargs)}")
        device = self.start_embedding.weight.device
        if input_ids is None:
            input_ids = torch.empty(1, 0, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, prompt_len = input_ids.shape
        self._prepare_special_tokens(config, True, device=device)
        eos = config._eos_token_tensor
        eos = torch.empty(0, dtype=torch.long, device=device) if eos is None else eos.view(-1)
        pad = config._pad_token_tensor
        pad_id = int(pad) if pad is not None else int(eos[0]) if eos.numel() else 0
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max(config.max_length - prompt_len, 0)
        use_cache = config.use_cache is not False
        # min_new_tokens is enforced per row here, since rows write at different speeds.
        processors = self._get_logits_processor(
            GenerationConfig(**(config.to_dict() | {"min_new_tokens": None})),
            input_ids_seq_length=prompt_len,
            logits_processor=logits_processor or LogitsProcessorList(),
            device=device,
        )
        # Transformers' own criteria (max_length, eos) are handled per row above; keep max_time, stop_strings.
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if config.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        writer = SentenceWriter(input_ids, max_new_tokens, pad_id)
        scores = [] if config.output_scores else None
        if streamer is not None:
            streamer.put(input_ids.cpu())

        # Prefill [start, prompt sentences] right-aligned, so every row appends in the same column.
        segmentation = self.segment(input_ids, attention_mask)
        sentence_mask, num_sentences = segmentation.sentence_mask, segmentation.num_sentences  # [B, S], [B]
        vectors = self.start_embedding.weight.new_zeros(*sentence_mask.shape, self.start_embedding.weight.shape[-1])
        if bool(sentence_mask.any()):
            sentences, lengths = segmentation.sentences[sentence_mask], segmentation.lengths[sentence_mask]
            vectors[sentence_mask] = self.encode_sentences(sentences, lengths)  # [B, S, H]
        inputs = right_align(torch.cat([self.start_states(batch), vectors], 1), num_sentences + 1, 0.0)  # [B, S+1, H]
        backbone_mask = right_align(torch.ones_like(inputs[..., 0], dtype=torch.long), num_sentences + 1, 0)
        cache = DynamicCache(config=self.config.text_config) if use_cache else None
        state = self.run_backbone(inputs, backbone_mask, cache=cache, use_cache=use_cache).last_hidden_state[:, -1]

        done = torch.full((batch,), max_new_tokens == 0 or max_new_sentences == 0, device=device)
        for sentence_count in range(1, max_new_tokens + 1):
            # 1. Does the text end here? Not before min_new_tokens.
            stop_logits = self.stop_head(state).float()  # [B, 2]
            if config.do_sample:
                stop = torch.multinomial(stop_logits.softmax(-1), 1)[:, 0] == 1
            else:
                stop = stop_logits[:, 1] > stop_logits[:, 0]
            done |= stop & (writer.num_new >= (config.min_new_tokens or 0))
            if bool(done.all()):
                break
            # 2. Write the next sentence.
            wrote_eos = self._write_sentence(state, writer, ~done, processors, config, eos, use_cache, scores)
            sentence, lengths = writer.close_sentence()  # [B, Ls], [B]
            if streamer is not None:
                streamer.put(sentence[0, : lengths[0]].cpu())
            done |= wrote_eos | (writer.num_new >= max_new_tokens)
            if max_new_sentences is not None and sentence_count >= max_new_sentences:
                done[:] = True
            if len(criteria):
                done |= criteria(writer.left_padded(), None)
            if bool(done.all()):
                break  # the last sentence is never encoded: nothing would read its state
            # 3. Encode it and take one backbone step.
            vector = self.encode_sentences(sentence, lengths.clamp(min=1))[:, None]  # [B, 1, H]
            backbone_mask = torch.cat([backbone_mask, (~done).long()[:, None]], 1)
            if use_cache:
                state = self.run_backbone(vector, backbone_mask, cache=cache, use_cache=True).last_hidden_state[:, -1]
            else:
                inputs = torch.cat([inputs, vector], 1)
                state = self.run_backbone(inputs, backbone_mask).last_hidden_state[:, -1]

        if streamer is not None:
            streamer.end()
        sequences = writer.sequences()
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(
                sequences=sequences, scores=None if scores is None else tuple(scores), cache=cache
            )
        return sequences

    def _write_sentence(self, state, writer, writing, processors, config, eos, use_cache, scores) -> torch.BoolTensor:
        """Decode one sentence per writing row from backbone states [B, H] into `writer`.

        A row's sentence ends at the decoder's sentence-end class, at eos (the text ends too),
        at `max_sentence_len` tokens, or when the row has written `max_new_tokens`. Returns
        which rows wrote eos.
        """
        vocab_size = self.config.text_config.vocab_size
        decoder, embed, lm_head = self.sentence_decoder, self.get_input_embeddings(), self.get_output_embeddings()
        min_new_tokens = config.min_new_tokens or 0
        condition = decoder.condition(state)  # [B, 1, H]
        cache = DynamicCache(config=decoder.layers.config) if use_cache else None
        hidden = decoder(condition, condition[:, :0], cache=cache, use_cache=use_cache).last_hidden_state[:, -1]
        wrote_eos = torch.zeros_like(writing)
        tokens = []
        for position in range(self.config.max_sentence_len):
            writing = writing & (writer.written < writer.max_new_tokens)
            if not bool(writing.any()):
                break
            # Only rows still writing go through the vocabulary projection (the costliest step);
            # the processors then see the whole batch, as in Transformers (idle rows hold zeros).
            rows = writing.nonzero().flatten()
            logits = hidden.new_zeros(len(writing), vocab_size + 1, dtype=torch.float32)  # [B, V+1]
            logits[rows] = decoder.logits(hidden[rows], lm_head).float()
            if position == 0:
                logits[:, vocab_size] = -float("inf")  # a sentence has at least one token
            if eos.numel():
                early = (writer.written < min_new_tokens)[:, None]
                logits[:, eos] = logits[:, eos].masked_fill(early, -float("inf"))
            if len(processors):
                logits = processors(writer.left_padded(), logits)
            if scores is not None:
                scores.append(logits.masked_fill(~writing[:, None], -float("inf")))
            if config.do_sample:
                chosen = torch.multinomial(logits[rows].softmax(-1), 1)[:, 0]
            else:
                chosen = logits[rows].argmax(-1)
            token = torch.full_like(writing, writer.pad_id, dtype=torch.long).index_copy(0, rows, chosen)  # [B]
            writing = writing & (token != vocab_size)
            writer.append(token, writing)
            wrote_eos |= writing & torch.isin(token, eos)
            writing = writing & ~wrote_eos
            if not bool(writing.any()):
                break
            tokens.append(token.clamp(max=vocab_size - 1))
            if use_cache:
                hidden = decoder(condition, embed(tokens[-1])[:, None], cache=cache, use_cache=True)
            else:
                hidden = decoder(condition, embed(torch.stack(tokens, 1)))
            hidden = hidden.last_hidden_state[:, -1]  # [B, H]
        return wrote_eos
