"""The SLLM's objectives: what `SLLMForCausalLM.forward` hands its sentences, backbone states and labels to.

- next_sentence: sentence i decoded (teacher-forced, packed) from backbone state i and the tokens before it,
  plus the stop head's "another sentence follows" / "the text ends" decisions: the SLLM's NLL of the text,
  every token scored, the first sentence and the end of text included (see the notes on honest measurement).
- reconstruction (Sentence-VAE stage 1): each sentence decoded from its own vector.
- the in-batch contrastive term, and the per-token log-probabilities the decisions fold into.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .segmentation_sllm import Segmentation
from .sentence_vae import token_window

if TYPE_CHECKING:
    from .modeling_sllm import SLLMForCausalLM


@dataclass
class SLLMOutput(ModelOutput):
    """Output of `SLLMForCausalLM.forward`.

    loss: total NLL of the scored tokens (sentence-end and end-of-text decisions included)
        divided by the number of scored tokens (labels != -100), or by `num_items_in_batch`.
    sentence_losses: [B, S] NLL of each sentence: its tokens, its end, and the decision that
        it follows at all (next_sentence) — 0 for padding sentences.
    end_of_text_losses: [B] NLL of the final "the text ends here" decision (next_sentence).
    num_tokens: number of scored tokens in the batch.
    sentence_states: [B, S+1, H] backbone output per sentence position (next_sentence).
    token_accuracy / exact_match: reconstruction metrics (objective="reconstruction") over the
        scored targets (tokens and sentence ends) and the `num_sentences` sentences judged.
    token_log_probs: [B, T] with `return_token_log_probs=True`: each input token's log-probability,
        with the decisions folded in where they are paid ("another sentence follows" into a
        sentence's first token, its end into its last, "end of text" into the row's last); 0 for
        tokens not scored. They sum to -loss * num_tokens (in eval, without `num_items_in_batch`).
    hidden_states / attentions: with `output_hidden_states` / `output_attentions`, the backbone's,
        over the sentence positions [B, S+1, ...] (next_sentence; attentions need eager attention).
    """

    loss: torch.FloatTensor | None = None
    sentence_losses: torch.FloatTensor | None = None
    end_of_text_losses: torch.FloatTensor | None = None
    num_tokens: torch.LongTensor | None = None
    sentence_states: torch.FloatTensor | None = None
    token_accuracy: torch.FloatTensor | None = None
    exact_match: torch.FloatTensor | None = None
    num_sentences: torch.LongTensor | None = None
    token_log_probs: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def next_sentence_loss(
    model: "SLLMForCausalLM",
    input_ids,
    attention_mask,
    segmentation,
    scored,
    codes,
    backbone,
    num_items_in_batch,
    return_token_log_probs,
) -> SLLMOutput:
    """Sentence i decoded from backbone state i (which has seen sentences < i only) and the tokens
    before it, plus the stop decisions: the SLLM's NLL of the text."""
    sentence_mask = segmentation.sentence_mask  # [B, S]
    states = backbone.last_hidden_state  # [B, S+1, H]
    # Only sentences with a scored token reach the decoder (a long unscored context costs one backbone
    # position per sentence, not a decoder pass): the others' NLLs are 0.
    decoded = sentence_mask & scored.any(-1)  # [B, S]
    picked = decoded.view(-1).nonzero().flatten()  # [N'] flat index b * S + i of each decoded sentence

    def pick(values: torch.Tensor) -> torch.Tensor:  # [B, S, ...] -> [N', ...]
        return values.flatten(0, 1).index_select(0, picked)

    context = pick(states[:, :-1])  # [N', H]
    window = None
    if model.config.decoder_window:
        start = segmentation.token_index[..., 0]  # [B, S]: column of each sentence's first token
        window_ids, window_mask = token_window(input_ids, attention_mask, start, model.config.decoder_window)
        window = (pick(window_ids), pick(window_mask))  # [N', W]
    sentences, lengths = pick(segmentation.sentences), pick(segmentation.lengths)  # [N', L], [N']
    token_nll, _, _, target_nll = decode_nll(model, context, sentences, lengths, pick(scored), window)
    # back to every sentence [N] (and its L+1 targets), as the other per-sentence tensors are
    batch, num_sentences = decoded.shape
    token_nll = token_nll.new_zeros(batch * num_sentences).index_copy(0, picked, token_nll)[sentence_mask.view(-1)]
    every_target = target_nll.new_zeros(batch * num_sentences, target_nll.shape[-1])  # [B*S, L+1]
    target_nll = every_target.index_copy(0, picked, target_nll)[sentence_mask.view(-1)]  # [N, L+1]
    continue_nll, end_of_text_losses = stop_losses(model, states, scored, segmentation)  # [B, S], [B]
    sentence_losses = continue_nll.masked_scatter(sentence_mask, token_nll + continue_nll[sentence_mask])

    num_tokens = scored.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
    loss = (sentence_losses.sum() + end_of_text_losses.sum()) / denominator
    if model.training and model.config.contrastive_weight > 0:
        loss = (
            loss
            + model.config.contrastive_weight
            * contrastive_loss(model, context, codes[decoded[sentence_mask]])
            / denominator
        )
    token_log_probs = None
    if return_token_log_probs:
        token_log_probs = fold_token_log_probs(
            segmentation, input_ids.shape[1], target_nll, continue_nll, end_of_text_losses
        )  # [B, T]
    return SLLMOutput(
        loss=loss,
        sentence_losses=sentence_losses,
        end_of_text_losses=end_of_text_losses,
        num_tokens=num_tokens,
        sentence_states=states,
        token_log_probs=token_log_probs,
        hidden_states=backbone.hidden_states,
        attentions=backbone.attentions,
    )


def stop_losses(
    model: "SLLMForCausalLM", states, scored, segmentation: Segmentation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop-head NLLs: "another sentence follows" before each scored sentence [B, S], and "the text
    ends" after each row's last sentence [B] (when its last token is scored)."""
    stop_log_probs = F.log_softmax(model.stop_head(states).float(), dim=-1)  # [B, S+1, 2]
    continue_nll = -stop_log_probs[:, :-1, 0] * scored[..., 0]  # [B, S]
    last = segmentation.num_sentences  # [B], state index after the last sentence
    rows = torch.arange(len(last), device=last.device)
    last_scored = scored[rows, last - 1, segmentation.lengths[rows, last - 1] - 1]  # [B]
    return continue_nll, -stop_log_probs[rows, last, 1] * last_scored


def scored_tokens(input_ids, attention_mask, labels, segmentation: Segmentation) -> torch.BoolTensor:
    """[B, S, L] True where a token is scored: real tokens whose label is not -100."""
    real = segmentation.token_index >= 0
    if labels is None:
        return real
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    used = labels != -100
    if attention_mask is not None:
        used = used & attention_mask.bool()
    if bool((labels[used] != input_ids[used]).any()):
        raise ValueError("labels must equal input_ids where they are not -100: SLLM scores the input text itself")
    return real & segmentation.gather(used, 0).bool()


def contrastive_loss(model: "SLLMForCausalLM", context: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Summed in-batch InfoNCE: the decoder condition of each context [N, H] must pick out the
    vector [N, H] of the sentence it decodes among the batch's (cosine / 0.1)."""
    queries = F.normalize(model.sentence_decoder.condition(context)[:, 0].float(), dim=-1)  # [N, H]
    keys = F.normalize(vectors.float(), dim=-1)  # [N, H]
    targets = torch.arange(len(keys), device=keys.device)
    return F.cross_entropy(queries @ keys.T / 0.1, targets, reduction="sum")


def decode_nll(model: "SLLMForCausalLM", context, sentences, lengths, scored, window=None, count_correct=False):
    """Teacher-forced NLL of sentences [N, L] decoded from context [N, H] and, with `decoder_window`,
    window = (ids, mask) [N, W] of the tokens before each sentence.

    Targets: tokens t1..tn then the sentence end; scored like the token they follow.
    Returns per sentence [N]: the NLL, the argmax-correct targets (with `count_correct`, else None) and
    the scored targets; and the NLL of each target [N, L+1] (0 where not scored).
    """
    num = sentences.shape[0]
    vocab_size = model.config.text_config.vocab_size
    condition = model.sentence_decoder.condition(context)  # [N, 1, H]
    embeds = model.get_input_embeddings()(sentences)  # [N, L, H]
    if model.training and model.config.decoder_word_dropout > 0:
        kept = torch.rand(sentences.shape, device=embeds.device) >= model.config.decoder_word_dropout  # [N, L]
        embeds = embeds * kept[..., None].to(embeds.dtype)
    window_embeds = window_mask = None
    if window is not None:
        window_embeds, window_mask = model.get_input_embeddings()(window[0]), window[1]  # [N, W, H], [N, W]
    states = model.sentence_decoder(
        condition, embeds, window_embeds, window_mask, layers=model.decoder_layers(), lengths=lengths
    ).last_hidden_state  # [N, L+1, H]

    targets = torch.cat([sentences, sentences.new_zeros(num, 1)], dim=1)  # [N, L+1]
    rows = torch.arange(num, device=sentences.device)
    targets[rows, lengths] = vocab_size  # end-of-sentence class after the last token
    target_scored = torch.cat([scored, scored.new_zeros(num, 1)], dim=1)  # [N, L+1]
    target_scored[rows, lengths] = scored[rows, lengths - 1]
    previous = F.pad(sentences, (1, 0), value=-1)  # [N, L+1]: the token before each target (-1: none)
    # A text cut where the sentence end is no decision (the rule ends no sentence there): the stop head's
    ends = model.segmentation_rule.ends(previous[rows, lengths], lengths)
    target_scored[rows, lengths] &= model.sentence_decoder.end_head.may_end(ends)

    picked = target_scored.nonzero(as_tuple=True)  # only scored positions reach the vocab projection
    scored_states, scored_targets, scored_previous = states[picked], targets[picked], previous[picked]  # [M, H], [M]
    sentence_correct = None
    if count_correct:  # the whole distribution, for its argmax
        logits, classes = output_logits(model, scored_states, scored_targets, scored_previous, picked[1])
        nll = -F.log_softmax(logits.float(), dim=-1).gather(1, classes[:, None])[:, 0]  # [M]
        correct = (logits.argmax(-1) == classes).float()
        sentence_correct = nll.new_zeros(num).index_add(0, picked[0], correct)  # [N]
    else:
        nll = -target_log_probs(model, scored_states, scored_targets, scored_previous, picked[1])  # [M]
    sentence_nll = nll.new_zeros(num).index_add(0, picked[0], nll)  # [N]
    target_nll = nll.new_zeros(targets.shape).index_put(picked, nll)  # [N, L+1]
    return sentence_nll, sentence_correct, target_scored.sum(-1), target_nll


def candidate_logits(
    model: "SLLMForCausalLM", states: torch.Tensor, targets: torch.LongTensor
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
    """
    decoder = model.sentence_decoder
    lm_head, vocab_size = model.get_output_embeddings(), model.config.text_config.vocab_size
    if not (model.training and model.config.training_vocab in ("in_batch", "sampled")):
        return decoder.token_logits(states, lm_head), None, targets  # [M, V]
    # The random negatives push down tokens the data never shows; without them such tokens
    # keep whatever logit they drift to and win the full-vocabulary argmax at evaluation.
    num_negatives = model.config.sampled_negatives
    negatives = torch.randint(vocab_size, (num_negatives,), device=targets.device)
    batch_targets = targets[targets < vocab_size]
    candidates = torch.unique(torch.cat([batch_targets, negatives]))  # [C] sorted token ids
    token_logits = decoder.token_logits(states, lm_head, candidates)  # [M, C]
    if model.config.training_vocab == "sampled" and num_negatives:
        drawn_only = ~torch.isin(candidates, batch_targets)  # [C]
        included = 1 - (1 - 1 / vocab_size) ** num_negatives  # chance that a token is drawn at all
        token_logits = token_logits - drawn_only * math.log(included)
    classes = torch.where(targets < vocab_size, torch.searchsorted(candidates, targets), len(candidates))
    return token_logits, candidates, classes


def output_logits(
    model: "SLLMForCausalLM",
    states: torch.Tensor,
    targets: torch.LongTensor,
    previous: torch.LongTensor,
    length: torch.LongTensor,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """Decoder states [M, H] -> logits [M, C+1] over `candidate_logits`' tokens and the sentence end (class
    C), and the target classes [M]; previous [M] and length [M]: the sentence's token before each target
    (-1: none) and its length so far."""
    token_logits, candidates, classes = candidate_logits(model, states, targets)
    decoder, rule = model.sentence_decoder, model.segmentation_rule
    return decoder.class_logits(states, token_logits, previous, length, rule, candidates), classes


def target_log_probs(
    model: "SLLMForCausalLM",
    states: torch.Tensor,
    targets: torch.LongTensor,
    previous: torch.LongTensor,
    length: torch.LongTensor,
) -> torch.Tensor:
    """`output_logits`' log-probability of each target [M], without its [M, C+1] distribution."""
    token_logits, candidates, classes = candidate_logits(model, states, targets)
    decoder, rule = model.sentence_decoder, model.segmentation_rule
    return decoder.target_log_probs(states, token_logits, previous, length, rule, classes, candidates)


def reconstruction_loss(
    model: "SLLMForCausalLM", vectors, sentences, lengths, scored, num_items_in_batch
) -> SLLMOutput:
    """Sentence-VAE stage 1: decode each sentence from its own vector."""
    sentence_nll, correct, total, _ = decode_nll(model, vectors, sentences, lengths, scored, count_correct=True)
    judged = total > 0
    num_tokens = scored.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
    return SLLMOutput(
        loss=sentence_nll.sum() / denominator,
        num_tokens=num_tokens,
        token_accuracy=correct.sum() / total.sum().clamp(min=1),
        exact_match=(correct[judged] == total[judged]).float().mean(),
        num_sentences=judged.sum(),
    )


def fold_token_log_probs(
    segmentation: Segmentation,
    seq_len: int,
    target_nll: torch.Tensor,
    continue_nll: torch.Tensor,
    end_nll: torch.Tensor,
) -> torch.Tensor:
    """Per-token log-probabilities [B, T] from the decoder's per-target NLLs [N, L+1] (tokens, then
    the sentence end) and the stop decisions' NLLs [B, S] ("continue") and [B] (end of text), each
    decision folded into the token where it is paid. Tokens not scored (all NLLs 0) get 0."""
    lengths, token_index = segmentation.lengths, segmentation.token_index  # [B, S], [B, S, L]
    batch, num_sentences, max_len = token_index.shape
    nll = target_nll.new_zeros(batch, num_sentences, max_len + 1)
    nll[segmentation.sentence_mask] = target_nll  # [B, S, L+1]
    positions = torch.arange(max_len, device=lengths.device)  # [L]
    own = nll[..., :max_len] * (positions < lengths[..., None])  # [B, S, L] the tokens' own NLLs
    sentence_end = nll.gather(-1, lengths[..., None]) * (positions == lengths[..., None] - 1)  # at the last
    per_token = own + sentence_end + F.pad(continue_nll[..., None], (0, max_len - 1))  # continue at the first
    rows, last = torch.arange(batch, device=lengths.device), segmentation.num_sentences - 1  # [B]
    per_token = per_token.index_put((rows, last, lengths[rows, last] - 1), end_nll, accumulate=True)
    values = per_token.masked_fill(token_index < 0, 0.0).view(batch, -1)  # [B, S*L]
    index = token_index.clamp(min=0).view(batch, -1)
    return -values.new_zeros(batch, seq_len).scatter_add(1, index, values)  # [B, T]
