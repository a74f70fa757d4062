"""The SLLM's losses, from tensors only: `SLLMForCausalLM.forward` chooses what is scored (targets_sllm.py),
computes the states and the log-probability of each target, and hands them here, as Llama's forward hands its
logits to `loss_function`.

- next_sentence: sentence i is decoded from backbone state i (which has seen sentences < i) and the tokens
  before it; the stop head decides "another sentence follows" / "the text ends". Two sums of the same terms:
  `loss`, the causal LM loss (each scored token from the tokens before it, the decisions paid by the token
  that follows them, as `log_softmax(logits)` reads them), and `text_loss`, the SLLM's NLL of the whole text
  (the first token and the end of text included: see the notes on honest measurement).
- reconstruction (Sentence-VAE stage 1): each sentence decoded from its own vector.
- the in-batch contrastive term, and the per-token log-probabilities the decisions fold into.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .segmentation_sllm import Segmentation


@dataclass
class SLLMOutput(ModelOutput):
    """Output of `SLLMForCausalLM.forward`.

    loss: the causal LM loss, as every causal LM of Transformers computes it from its logits: the mean NLL of
        each scored token (label != -100) given the tokens before it, the first column excluded (nothing
        predicts it); divided by their number, or by `num_items_in_batch`. The decisions are paid by the token
        after them: a sentence's end and "another sentence follows" by the next sentence's first token, and
        the end of text by the eos token (the stop head's "the text ends" is the eos token's probability).
        With `loss_over="text"`: `text_loss` (what SLLMTrainer trains on).
    logits: [B, T, V] (or the last `logits_to_keep` columns) log-probabilities: column t holds the model's
        distribution of token t + 1 given tokens <= t, what `generate` samples from (see token_logits.py);
        a padding column holds the first token's (nothing read). Sentence ends by the rule only.
    text_loss: the SLLM's NLL of the whole text: every scored token (the first too) with its sentence-end and
        end-of-text decisions, divided by the number of scored tokens or by `num_items_in_batch`.
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
        tokens not scored. They sum to -text_loss * num_tokens (in eval, without `num_items_in_batch`).
    hidden_states / attentions: with `output_hidden_states` / `output_attentions`, the backbone's,
        over the sentence positions [B, S+1, ...] (next_sentence; attentions need eager attention).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
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


def next_sentence_losses(
    target_nll: torch.Tensor,
    stop_log_probs: torch.Tensor,
    segmentation: Segmentation,
    scored: torch.BoolTensor,
    causal: torch.BoolTensor,
    end_paid: torch.BoolTensor,
    eos_first: torch.BoolTensor,
    num_items_in_batch,
    seq_len: int,
    return_token_log_probs: bool,
    extra_nll: torch.Tensor | None = None,
) -> dict:
    """The next-sentence losses from the NLL of each target [B, S, L+1] (0 where not needed), the stop head's
    log-probs [B, S+1, 2] (state i: before sentence i), the scored tokens [B, S, L] and those the causal loss
    reads [B, S, L], whether each sentence's end is a decision [B, S] and whether its first token is the
    end-of-text token [B, S]; seq_len: T; `extra_nll`:
    an auxiliary term summed into both losses (the contrastive one). Returns SLLMOutput's loss, text_loss,
    sentence_losses, end_of_text_losses, num_tokens (and token_log_probs)."""
    lengths, sentence_mask = segmentation.lengths, segmentation.sentence_mask  # [B, S]
    max_len = scored.shape[-1]
    own = target_nll[..., :max_len] * scored  # [B, S, L]
    last = (lengths - 1).clamp(min=0)[..., None]
    end_nll = target_nll.gather(-1, lengths[..., None])[..., 0]  # [B, S]
    text_end = torch.where(scored.gather(-1, last)[..., 0] & end_paid & sentence_mask, end_nll, 0.0)
    continue_nll, end_of_text_losses = stop_losses(stop_log_probs, scored, segmentation)  # [B, S], [B]
    sentence_losses = (own.sum(-1) + text_end + continue_nll) * sentence_mask
    num_tokens = scored.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)

    # causal: a sentence's first token pays the end before it and "another sentence follows"; the eos token
    # there is also the stop head's "the text ends" (both end the text in generate)
    opening = target_nll[..., 0] - stop_log_probs[:, :-1, 0]  # [B, S]
    opening = torch.where(eos_first, -torch.logaddexp(-opening, stop_log_probs[:, :-1, 1]), opening)
    opening = opening + F.pad(end_nll[:, :-1], (1, 0))  # the end of the sentence before (none before the first)
    causal_nll = torch.where(causal, target_nll[..., :max_len], 0.0)
    causal_nll[..., 0] = torch.where(causal[..., 0], opening, 0.0)
    causal_tokens = causal.sum()
    causal_denominator = num_items_in_batch if num_items_in_batch is not None else causal_tokens.clamp(min=1)
    extra = 0.0 if extra_nll is None else extra_nll
    output = {
        "loss": (causal_nll.sum() + extra) / causal_denominator,
        "text_loss": (sentence_losses.sum() + end_of_text_losses.sum() + extra) / denominator,
        "sentence_losses": sentence_losses,
        "end_of_text_losses": end_of_text_losses,
        "num_tokens": num_tokens,
    }
    if return_token_log_probs:
        output["token_log_probs"] = fold_token_log_probs(
            segmentation, seq_len, own, text_end, continue_nll, end_of_text_losses
        )  # [B, T]
    return output


def stop_losses(stop_log_probs, scored, segmentation: Segmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """The text loss's stop-head NLLs from its log-probs [B, S+1, 2]: "another sentence follows" before each
    scored sentence [B, S], and "the text ends" after each row's last sentence [B] (when its last token is
    scored)."""
    lengths = segmentation.lengths
    rows, final = torch.arange(len(lengths), device=lengths.device), segmentation.num_sentences  # [B]
    final_scored = scored[rows, final - 1, lengths[rows, final - 1] - 1]  # [B]
    return -stop_log_probs[:, :-1, 0] * scored[..., 0], -stop_log_probs[rows, final, 1] * final_scored


def contrastive_loss(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Summed in-batch InfoNCE: each decoder condition [N, H] must pick out the vector [N, H] of the sentence
    it decodes among the batch's (cosine / 0.1)."""
    queries, keys = F.normalize(queries.float(), dim=-1), F.normalize(vectors.float(), dim=-1)  # [N, H] each
    targets = torch.arange(len(keys), device=keys.device)
    return F.cross_entropy(queries @ keys.T / 0.1, targets, reduction="sum")


def reconstruction_losses(target_nll, correct, judged_targets, scored, num_items_in_batch) -> dict:
    """Sentence-VAE stage 1 from the NLL [N, L+1] and argmax-correctness [N, L+1] of each sentence's targets,
    the targets judged [N, L+1] and the scored tokens [N, L]: loss, token accuracy and exact match."""
    total, right = judged_targets.sum(-1), (correct & judged_targets).sum(-1)  # [N]
    judged = total > 0
    num_tokens = scored.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
    loss = target_nll.sum() / denominator
    return {
        "loss": loss,
        "text_loss": loss,
        "num_tokens": num_tokens,
        "token_accuracy": right.sum() / total.sum().clamp(min=1),
        "exact_match": (right[judged] == total[judged]).float().mean(),
        "num_sentences": judged.sum(),
    }


def fold_token_log_probs(
    segmentation: Segmentation,
    seq_len: int,
    own: torch.Tensor,
    end_nll: torch.Tensor,
    continue_nll: torch.Tensor,
    end_of_text_nll: torch.Tensor,
) -> torch.Tensor:
    """Per-token log-probabilities [B, T] from the tokens' own NLLs [B, S, L], each sentence's end [B, S] and
    "continue" [B, S] decisions and the end of text [B], each decision folded into the token where it is paid
    (continue into the first token, the end into the last, the end of text into the row's last). Tokens not
    scored get 0."""
    lengths, token_index = segmentation.lengths, segmentation.token_index  # [B, S], [B, S, L]
    batch, _, max_len = token_index.shape
    positions = torch.arange(max_len, device=lengths.device)  # [L]
    sentence_end = end_nll[..., None] * (positions == lengths[..., None] - 1)  # at the last token
    per_token = own + sentence_end + F.pad(continue_nll[..., None], (0, max_len - 1))  # continue at the first
    rows, last = torch.arange(batch, device=lengths.device), segmentation.num_sentences - 1  # [B]
    per_token = per_token.index_put((rows, last, lengths[rows, last] - 1), end_of_text_nll, accumulate=True)
    values = per_token.masked_fill(token_index < 0, 0.0).view(batch, -1)  # [B, S*L]
    index = token_index.clamp(min=0).view(batch, -1)
    return -values.new_zeros(batch, seq_len).scatter_add(1, index, values)  # [B, T]
