"""The SLLM read as a token-level causal LM: the distribution of token t + 1 given tokens <= t, what `generate`
samples, as the [B, T, V] logits every tool around Transformers reads (lm-eval, `evaluate`, TRL).

Inside a sentence it is the Sentence Decoder's distribution. After a token where the segmentation rule may end
the sentence, two paths meet: the sentence goes on (after . ! ? ; only with a token glued to it), or it ends
(after . ! ? ; with the mass of the tokens that do not glue, after a hard end or at the length limit surely),
the backbone reads it, and the stop head chooses between another sentence (its first token from the decoder,
one that does not glue after punctuation) and the end of text, which is the eos token's probability here
(the eos token written as a sentence's first token also ends the text: the two add up). A padding column
holds the first token's distribution: nothing read, the start state's.
"""

import torch
import torch.nn.functional as F

from .segmentation_sllm import unglued_start_log_probs


def next_token_logits(
    continuation: torch.Tensor,
    opening: torch.Tensor,
    opens: torch.BoolTensor,
    stop_log_probs: torch.Tensor,
    hard: torch.BoolTensor,
    glued: torch.BoolTensor,
    eos_token_id: int,
) -> torch.Tensor:
    """Token log-probabilities [B, T, V] from the decoder's token logits that continue each column's sentence
    [B, T, V], and at the Q columns where a sentence may end (`opens` [B, T]): the next sentence's first-token
    logits [Q, V], the stop head's log-probs there [Q, 2] (another sentence, the end) and whether the end is
    sure [Q] (a hard end, the length limit, a padding column) or taken by the tokens that do not glue (`glued`
    [V]) after punctuation."""
    log_probs = F.log_softmax(continuation.float(), dim=-1)  # [B, T, V]
    goes_on = log_probs[opens]  # [Q, V]
    ends = torch.where(hard, 0.0, torch.logsumexp(goes_on.masked_fill(glued, -torch.inf), dim=-1))  # [Q]
    first = unglued_start_log_probs(F.log_softmax(opening.float(), dim=-1), ~hard, glued)  # [Q, V]
    new_sentence = (ends + stop_log_probs[:, 0])[:, None] + first  # [Q, V]
    end_of_text = torch.logaddexp(new_sentence[:, eos_token_id], ends + stop_log_probs[:, 1])
    new_sentence = new_sentence.index_copy(1, torch.tensor([eos_token_id], device=first.device), end_of_text[:, None])
    merged = torch.where(hard[:, None] | ~glued, new_sentence, goes_on)  # glued tokens after punctuation go on
    return log_probs.masked_scatter(opens[..., None], merged)
