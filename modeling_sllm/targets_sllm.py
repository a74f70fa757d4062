"""What a forward pass scores, from the labels, the attention mask and the segmentation: the scored tokens, the
decoder targets the losses and the logits read, and each target's class and context. `SLLMForCausalLM.forward`
chooses them first (`choose_targets`); the losses (loss_sllm.py) take them as tensors."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .segmentation_sllm import Segmentation


@dataclass
class Targets:
    """What one forward pass scores."""

    scored: torch.BoolTensor  # [B, S, L] real tokens whose label is not -100
    causal: torch.BoolTensor  # [B, S, L] the scored tokens a column before them predicts (the causal loss's)
    end_paid: torch.BoolTensor  # [B, S] whether each sentence's end is a decision the decoder pays
    needed: torch.BoolTensor  # [B, S, L+1] the decoder targets whose NLL a loss reads (L: the sentence's end)
    eos_first: torch.BoolTensor  # [B, S] real sentences whose first token is the end-of-text token
    classes: torch.LongTensor  # [B, S, L+1] each decoder target's class: its token, vocab_size at the end
    previous: torch.LongTensor  # [B, S, L+1] the sentence's token before each target (-1: none)
    before: torch.LongTensor  # [B, S] the last token of the sentence before (-1: none)
    before_len: torch.LongTensor  # [B, S] the length of the sentence before (0: none)


@torch.compiler.disable  # reads the labels on the host (the check): eager under torch.compile
def choose_targets(
    input_ids, attention_mask, labels, segmentation: Segmentation, end_paid, eos: int | None, vocab_size: int
) -> Targets:
    """The targets of a pass over input_ids [B, T] with labels [B, T] (None: every real token), given which
    sentence ends are decisions (`end_paid` [B, S]), the end-of-text token id (None: none) and the vocabulary
    size (the sentence end's class)."""
    scored = scored_tokens(input_ids, attention_mask, labels, segmentation)
    causal = next_token_scored(scored, segmentation)
    eos_first = (segmentation.sentences[..., 0] == (-1 if eos is None else eos)) & segmentation.sentence_mask
    needed = needed_targets(scored, causal, end_paid, segmentation)
    classes, previous = sentence_targets(segmentation.sentences, segmentation.lengths, vocab_size)
    return Targets(scored, causal, end_paid, needed, eos_first, classes, previous, *sentence_before(segmentation))


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


def sentence_targets(sentences: torch.LongTensor, lengths: torch.LongTensor, vocab_size: int):
    """Sentences [..., L] with lengths [...] -> the decoder's targets [..., L+1] (tokens, then the sentence end:
    class vocab_size) and the sentence's token before each target [..., L+1] (-1: none)."""
    targets = F.pad(sentences, (0, 1))
    targets = targets.scatter(-1, lengths[..., None], vocab_size)
    return targets, F.pad(sentences, (1, 0), value=-1)


def sentence_before(segmentation: Segmentation) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The last token and the length of the sentence before each sentence, [B, S] each (-1 and 0: none)."""
    return F.pad(segmentation.last_tokens, (1, 0), value=-1)[:, :-1], F.pad(segmentation.lengths, (1, 0))[:, :-1]


def next_token_scored(scored: torch.BoolTensor, segmentation: Segmentation) -> torch.BoolTensor:
    """[B, S, L]: the scored tokens that a column before them predicts (the causal loss's), all but column 0."""
    return scored & (segmentation.token_index > 0)


def needed_targets(scored, causal, end_paid, segmentation: Segmentation) -> torch.BoolTensor:
    """[B, S, L+1]: the targets whose NLL a loss reads. Tokens: the scored ones. A sentence's end: in the text
    loss where its last token is scored and the end is a decision (`end_paid` [B, S]), in the causal loss where
    the next sentence's first token is scored."""
    lengths = segmentation.lengths  # [B, S]
    last_scored = scored.gather(-1, (lengths - 1).clamp(min=0)[..., None])[..., 0] & (lengths > 0)
    next_first = F.pad(causal[:, 1:, 0], (0, 1), value=False)  # [B, S]
    end = (last_scored & end_paid) | next_first  # [B, S]
    positions = torch.arange(scored.shape[-1] + 1, device=lengths.device)
    return F.pad(scored, (0, 1), value=False) | ((positions == lengths[..., None]) & end[..., None])
