r"""A small byte-level BPE tokenizer trained on your own text, for SLLMs and token LMs trained from scratch.

Library code, not remote code: a saved checkpoint carries the trained tokenizer's files (tokenizer.json,
tokenizer_config.json), not this module.

Why about 8k tokens. A language model's output projection costs hidden_size x vocab_size multiply-adds per
generated token, whatever the depth, and it is the one per-token cost a Sentence Decoder cannot skip, so it
caps the speed-up any SLLM can have over a token LM. Counted analytically per generated token, at a 256-token
context (`modeling_sllm.from_scratch.multiply_adds_per_token`; Llama layers with SwiGLU FFN 2.6875 x width, tied
embeddings), the projection's share of all multiply-adds at SmolLM2's 49,152 tokens against 8,192:

| model (the scratch study's sizes) | 49,152 tokens | 8,192 tokens |
|---|---|---|
| token LM, width 128, 4 layers | 86% | 50% |
| token LM, width 192, 5 layers | 78% | 37% |
| token LM, width 256, 6 layers | 69% | 27% |
| SLLM around width 256 x 6, 1 encoder + 1 decoder layer (23 tokens per sentence, as measured) | 88% | 54% |
| the same with 2 decoder layers | 83% | 44% |
| the same with 2 decoder layers and a 16-token window | 77% | 36% |

At 49k the projection is most of the work at these widths, and the most an SLLM around the width-256
Llama can save is 1.21x (1-layer decoder), 1.14x, 1.07x in multiply-adds per token, whatever else it
does. At 8k the layers are most of the token LM's work again, which is what the SLLM saves: 1.88x,
1.55x, 1.26x for the same three. (SmolLM2-135M itself, width 576 x 30 layers, spends about a fifth of its
per-token work in its 49k projection; pretrained LLMs of 1B and more a few percent.) A smaller vocabulary
would shrink the projection further but makes every text more tokens long (more steps to write, shorter
words per token), and a larger one leaves too few training examples per token in a corpus of a few million
words; ~8k balances the two at these sizes. `vocab_size` is the caller's choice.

What the segmentation rule needs (see `sentence_boundary_token_ids`): an eos token (it always ends a
sentence, and generation stops at it), the newline as a token of its own (a sentence ends after a token
whose text ends with a newline; here every newline is a separate token, so "\n\n" never merges with the
text around it), and sentence punctuation read from the token texts (the byte-level pre-tokenizer splits
punctuation from words, so "." ends up in tokens such as "." or ")." that end with it). Byte-level BPE
has every byte in its alphabet, so any text encodes and decodes back exactly: no unknown token is needed,
and none is defined.
"""

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    model_max_length: int = 4096,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (an iterable of documents; read once) and wrap it as a
    `PreTrainedTokenizerFast` with pad (id 0), bos (1) and eos (2) tokens.

    Lossless: `decode(encode(text)) == text` for any text (every byte is in the alphabet, no normalizer,
    no added prefix space). Every newline is a token of its own, so the segmentation rule finds a sentence
    end after it. `tokenizer(text)` adds no special tokens: callers add bos/eos where they want them.
    `vocab_size` counts the special tokens and the 256 byte tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),  # a newline is always a token of its own
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_non_empty(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text


__all__ = ["train_bpe_tokenizer", "SPECIAL_TOKENS"]
