"""A small word-level tokenizer for the text encoder of the default text-to-image model.

The shipped default model is trained on a few thousand short captions ("grinning face",
"red apple"), and it must run on a CPU and live in git. A CLIP or T5 tokenizer would
bring a 30k-50k entry vocabulary (and an embedding table to match) for a few hundred
words actually used, and cannot be downloaded here anyway. A word-level vocabulary
built from the training captions is the right size, and saved through transformers it
loads like any other: ``AutoTokenizer.from_pretrained(path / "tokenizer")`` and
``DiffusionPipeline.from_pretrained`` need nothing custom.

Conventions, chosen to match how diffusers pipelines call tokenizers
(``tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
truncation=True)``):

* text is NFKD-normalised, accent-stripped and lowercased; split on whitespace and
  punctuation (each punctuation mark is a token);
* special tokens ``[PAD]`` = 0, ``[UNK]`` = 1, ``[BOS]`` = 2, ``[EOS]`` = 3, then the
  words, most frequent first; every sequence is ``[BOS] words [EOS]``;
* ``model_max_length`` = ``max_length`` (counting BOS and EOS), padding on the right;
  truncation keeps the ``[EOS]``, so a pooled "end of text" token always exists.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD, UNK, BOS, EOS = SPECIAL_TOKENS


def build_word_tokenizer(
    captions: Iterable[str | None],
    max_length: int,
    *,
    min_frequency: int = 1,
    vocab_size: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on ``captions`` and wrap it for transformers/diffusers.

    ``max_length`` is the text encoder's sequence length including ``[BOS]``/``[EOS]``.
    Words seen fewer than ``min_frequency`` times map to ``[UNK]``; ``vocab_size`` (total,
    special tokens included) keeps only the most frequent words. ``None`` captions are
    ignored, so ``dataset.texts`` can be passed directly.

    The result can be ``save_pretrained`` into a pipeline's ``tokenizer/`` folder.
    """
    if max_length < 3:
        raise ValueError(f"max_length must leave room for [BOS], a word and [EOS]; got {max_length}")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens; got {vocab_size}")
    texts = [c for c in captions if c is not None and c.strip()]
    if not texts:
        raise ValueError("no captions to build a vocabulary from")

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size if vocab_size is not None else 1 << 30,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if tok.token_to_id(PAD) != 0:  # attention masks and padding_idx=0 embeddings assume it
        raise RuntimeError(f"tokenizers placed {PAD} at id {tok.token_to_id(PAD)}, expected 0")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
