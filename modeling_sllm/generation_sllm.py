"""Sentence-by-sentence generation with a sentence-level KV cache.

Each row of a batch moves on its own: when the stop head lets it go on, the Sentence Decoder
writes its next sentence token by token; the finished sentence is encoded to one vector and
the backbone takes one cached step for it. Rows write sentences of different lengths, so a
row that finishes early waits until enough rows are waiting (or none is writing) and they take
the backbone step together, while the other rows keep writing: decoder steps are not spent on
idle rows waiting for the longest sentence. The backbone cache holds one entry per sentence,
plus one for the start-of-document state.
"""

import math

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

# A backbone step waits until this share of the unfinished rows is waiting for it (or no row is
# writing). It costs several decoder steps and little less for fewer rows, so stepping rows one by
# one wastes it, while waiting for every row wastes decoder steps on the longest sentence. Of
# 0.35-1.0, 0.5 was fastest for 8 rows on SmolLM2 here (benchmarks/generation.py prompts).
BACKBONE_STEP_SHARE = 0.5


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


def drop_padding_entries(cache: Cache, mask: torch.Tensor) -> torch.Tensor:
    """Move each row's real cache entries (mask [B, T] = 1) to the end, in order, and cut the
    columns no row needs. Returns the new mask [B, T'] (left padded)."""
    order = torch.sort(mask, dim=1, stable=True).indices  # [B, T]: padding first, then real entries
    width = int(mask.sum(1).max())
    for layer in cache.layers:
        index = order[:, None, -width:, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they have seen
            layer.cumulative_length = width
    return mask.gather(1, order)[:, -width:]


class SentenceWriter:
    """The token buffer of a generate call: prompts [B, P] plus up to `max_new_tokens` new tokens
    per row; each row is writing one sentence (possibly empty so far) after its finished ones."""

    def __init__(self, input_ids: torch.LongTensor, max_new_tokens: int, pad_id: int):
        batch = input_ids.shape[0]
        self.input_ids = input_ids
        self.pad_id = pad_id
        self.max_new_tokens = max_new_tokens
        self.new_tokens = input_ids.new_full((batch, max_new_tokens), pad_id)  # [B, M], right padded
        self.num_new = torch.zeros(batch, dtype=torch.long, device=input_ids.device)  # [B] in finished sentences
        self.sentence_len = torch.zeros_like(self.num_new)  # [B] tokens of the sentence being written
        self.last_start = torch.zeros_like(self.num_new)  # [B] where each row's last finished sentence starts

    def append(self, token: torch.LongTensor, rows: torch.BoolTensor) -> None:
        """Write token [B] at the end of each row in `rows`."""
        column = self.written.clamp(max=self.max_new_tokens - 1)[:, None]
        self.new_tokens.scatter_(1, column, torch.where(rows, token, self.new_tokens.gather(1, column)[:, 0])[:, None])
        self.sentence_len += rows.long()

    def sentences(self, start: torch.LongTensor, lengths: torch.LongTensor) -> torch.LongTensor:
        """New tokens from column start [B], lengths [B] long, as [B, max length] (pad after)."""
        offsets = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=start.device)
        columns = (start[:, None] + offsets).clamp(max=self.max_new_tokens - 1)  # [B, Ls]
        return self.new_tokens.gather(1, columns).masked_fill(offsets >= lengths[:, None], self.pad_id)

    def current(self) -> torch.LongTensor:
        """The sentence each row is writing, [B, Ls] (pad after each row's end)."""
        return self.sentences(self.num_new, self.sentence_len)

    def close(self, rows: torch.BoolTensor) -> None:
        """The sentences that `rows` are writing are finished."""
        self.last_start = torch.where(rows, self.num_new, self.last_start)
        self.num_new = self.num_new + self.sentence_len * rows
        self.sentence_len = self.sentence_len * ~rows

    def last_sentences(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Each row's last finished sentence, tokens [B, Ls] and lengths [B]."""
        lengths = self.num_new - self.last_start
        return self.sentences(self.last_start, lengths), lengths

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
        width = int(self.written.max()) if self.num_new.numel() else 0
        return torch.cat([self.input_ids, self.new_tokens[:, :width]], 1)


class DecoderSteps:
    """The Sentence Decoder's cache while rows write sentences that start at different steps.

    One DynamicCache whose columns are decoder steps, all rows at once; each row attends only to
    the columns of the sentence it is writing (`mask` [B, T]) at its own positions. A sentence
    never spans more than `max_sentence_len` columns, so older ones are dropped as it grows.
    """

    def __init__(self, batch: int, max_sentence_len: int, device: torch.device):
        self.cache = DynamicCache()
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)  # [B, T]
        self.max_sentence_len = max_sentence_len

    def next_mask(self, starting: torch.BoolTensor) -> torch.LongTensor:
        """The attention mask [B, T+1] of the next step; `starting` rows forget their last sentence."""
        if self.mask.shape[1] >= 2 * self.max_sentence_len:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, -self.max_sentence_len :]
                layer.values = layer.values[:, :, -self.max_sentence_len :]
            self.mask = self.mask[:, -self.max_sentence_len :]
        self.mask = torch.cat([self.mask * ~starting[:, None], self.mask.new_ones(len(self.mask), 1)], 1)
        return self.mask


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

        # Each unfinished row is in one phase: `fresh` (a new backbone state: decide whether the
        # text ends), `writing` a sentence, or `waiting` (its sentence is written, not yet stepped).
        done = torch.full((batch,), max_new_tokens == 0 or max_new_sentences == 0, device=device)
        fresh, writing, waiting = ~done, torch.zeros_like(done), torch.zeros_like(done)
        condition = state[:, None]  # [B, 1, H]: each row's decoder conditioning, set when it starts a sentence
        decoder_steps = DecoderSteps(batch, self.config.max_sentence_len, device) if use_cache else None
        new_sentences = torch.zeros_like(writer.num_new)  # [B]
        while True:
            if bool(fresh.any()):  # 1. Does the text end here? Not before min_new_tokens.
                stop_logits = self.stop_head(state).float()  # [B, 2]
                if config.do_sample:
                    stop = torch.multinomial(stop_logits.softmax(-1), 1)[:, 0] == 1
                else:
                    stop = stop_logits[:, 1] > stop_logits[:, 0]
                done |= fresh & stop & (writer.num_new >= (config.min_new_tokens or 0))
                starting = fresh & ~done
                condition = torch.where(starting[:, None, None], self.sentence_decoder.condition(state), condition)
                writing, fresh = writing | starting, torch.zeros_like(fresh)
            if bool(done.all()):
                break
            if bool(writing.any()):  # 2. One decoder step for every row writing a sentence.
                finished, wrote_eos = self._decoder_step(
                    condition, writer, writing, decoder_steps, processors, config, eos, scores
                )
                writer.close(finished)
                new_sentences += finished.long()
                if streamer is not None and bool(finished[0]):
                    tokens, lengths = writer.last_sentences()
                    streamer.put(tokens[0, : lengths[0]].cpu())
                done |= wrote_eos | (writer.num_new >= max_new_tokens)
                if max_new_sentences is not None:
                    done |= new_sentences >= max_new_sentences
                if len(criteria) and bool(finished.any()):
                    done |= finished & criteria(writer.left_padded(), None)
                writing &= ~finished
                waiting |= finished & ~done  # the last sentence is never encoded: nothing would read its state
            # 3. Encode the waiting rows' sentences and take one backbone step for them together.
            unfinished = int((~done).sum())
            if bool(waiting.any()) and (
                not bool(writing.any()) or int(waiting.sum()) >= math.ceil(BACKBONE_STEP_SHARE * unfinished)
            ):
                tokens, lengths = writer.last_sentences()
                vector = torch.zeros_like(state)[:, None]  # [B, 1, H]
                vector[waiting] = self.encode_sentences(tokens[waiting], lengths[waiting])[:, None]
                backbone_mask = torch.cat([backbone_mask, waiting.long()[:, None]], 1)
                if use_cache:
                    new_state = self.run_backbone(vector, backbone_mask, cache=cache, use_cache=True)
                    backbone_mask = drop_padding_entries(cache, backbone_mask)  # rows that did not step
                else:
                    inputs = torch.cat([inputs, vector], 1)
                    new_state = self.run_backbone(inputs, backbone_mask)
                state = torch.where(waiting[:, None], new_state.last_hidden_state[:, -1], state)
                fresh, waiting = waiting, torch.zeros_like(waiting)

        if streamer is not None:
            streamer.end()
        sequences = writer.sequences()
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(
                sequences=sequences, scores=None if scores is None else tuple(scores), cache=cache
            )
        return sequences

    def _decoder_step(self, condition, writer, writing, decoder_steps, processors, config, eos, scores):
        """One Sentence Decoder step for the `writing` rows (each at its own position in its own
        sentence, conditioned on condition [B, 1, H]); the chosen tokens go into `writer`.

        A row's sentence ends at the decoder's sentence-end class, at eos (the text ends too), at
        `max_sentence_len` tokens, or when the row has written `max_new_tokens`. Returns which rows
        finished their sentence and which wrote eos, both [B].
        """
        vocab_size = self.config.text_config.vocab_size
        decoder, embed, lm_head = self.sentence_decoder, self.get_input_embeddings(), self.get_output_embeddings()
        positions = writer.sentence_len  # [B]: tokens of its sentence each row has written
        starting = writing & (positions == 0)
        if decoder_steps is None:  # recompute each row's sentence so far (right padded: causal, so harmless)
            states = decoder(condition, embed(writer.current())).last_hidden_state  # [B, Ls+1, H]
            hidden = states[torch.arange(len(positions), device=positions.device), positions]  # [B, H]
        else:
            last_token = writer.new_tokens.gather(1, (writer.written - 1).clamp(min=0)[:, None])  # [B, 1]
            inputs = decoder.with_context(condition, embed(last_token), positions[:, None])  # [B, 1, H]
            inputs = torch.where((positions == 0)[:, None, None], condition, inputs)
            mask = decoder_steps.next_mask(starting)
            hidden = decoder.step(inputs, positions, mask, decoder_steps.cache).last_hidden_state[:, -1]
        # Only writing rows go through the vocabulary projection (the costliest step); the
        # processors then see the whole batch, as in Transformers (idle rows hold zeros).
        rows = writing.nonzero().flatten()
        logits = hidden.new_zeros(len(writing), vocab_size + 1, dtype=torch.float32)  # [B, V+1]
        logits[rows] = decoder.logits(hidden[rows], lm_head).float()
        logits[:, vocab_size] = logits[:, vocab_size].masked_fill(starting, -float("inf"))  # >= 1 token
        if eos.numel():
            early = (writer.written < (config.min_new_tokens or 0))[:, None]
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
        ended = writing & (token == vocab_size)
        wrote = writing & ~ended
        writer.append(token, wrote)
        wrote_eos = wrote & torch.isin(token, eos)
        full = (writer.sentence_len >= self.config.max_sentence_len) | (writer.written >= writer.max_new_tokens)
        return ended | wrote_eos | (wrote & full), wrote_eos
