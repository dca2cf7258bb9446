"""Tokenizer: a thin wrapper over a Hugging Face ``tokenizers`` ``tokenizer.json``.

- Loads any ``tokenizer.json`` (the format of every Llama/Mistral/Qwen2/SmolLM repository and
  of the tokenizers we train), encodes with the file's own post-processor (so a Llama
  tokenizer adds its BOS exactly as ``transformers`` does) and decodes incrementally for
  streaming without splitting a multi-byte character.
- :func:`byte_level_tokenizer` builds an untrained byte-level tokenizer (256 byte tokens +
  ``<|endoftext|>``), used for freshly initialised models and tests: no training, no download.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from earlyexit.errors import CheckpointError, InputError

EOT = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids."""

    def __init__(self, tk: _HFTokenizer) -> None:
        self._tk = tk

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such tokenizer file")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None

    def save(self, path: str | Path) -> None:
        self._tk.save(str(path))

    @property
    def vocab_size(self) -> int:
        """Largest token id + 1, special tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters (special tokens included): no token
        covers more characters of a text, so a text of more than ``n * max_token_chars``
        characters has more than ``n`` tokens (a length check that needs no tokenizing)."""
        return max((len(t) for t in self._tk.get_vocab(with_added_tokens=True)), default=1)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                "the text is not valid Unicode (it has an unpaired surrogate)"
            ) from None
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def special_ids(
        self, names: tuple[str, ...] = (EOT, "</s>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")
    ) -> list[int]:
        """Ids of the usual end-of-sequence tokens this vocabulary has."""
        return [i for n in names if (i := self._tk.token_to_id(n)) is not None]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by ByteLevel)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def byte_level_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: ids 0..255 are bytes, 256 is ``<|endoftext|>``."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOT])
    return Tokenizer(tk)


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas, holding back an incomplete character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta = text[len(self.text) :] if text.startswith(self.text) else text
        self.text = text
        return delta
