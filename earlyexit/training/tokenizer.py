"""Training a byte-level BPE tokenizer with Hugging Face ``tokenizers``.

GPT-2-style byte-level BPE: every byte is in the base alphabet, so any text round-trips;
``<|endoftext|>`` is the only special token and gets id 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from earlyexit.tokenizer import EOT, Tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (special token included) on ``texts``."""
    tk = _HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk)
