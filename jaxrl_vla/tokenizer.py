"""A built-in word-level tokenizer for instructions (no torch, no downloads).

Ids 0 and 1 are reserved for padding and unknown words; vocabulary words follow
in the order given. Text is lower-cased and split on whitespace and punctuation.
JAX-native tasks that generate instructions in-graph use the same ids, so a
string instruction tokenized here and the task's own token ids agree.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

PAD_ID = 0
UNK_ID = 1
_WORD = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    """Maps text to fixed-length int32 ids plus a boolean mask."""

    def __init__(self, vocab: Sequence[str], max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        words = [w.lower() for w in vocab]
        if len(set(words)) != len(words):
            raise ValueError("vocab has duplicate words")
        self.vocab = ["<pad>", "<unk>"] + words
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [B, max_length] int32 and mask [B, max_length] bool.

        Longer texts are truncated to max_length words.
        """
        ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for row, text in enumerate(texts):
            tokens = [self.word_to_id.get(w, UNK_ID) for w in self.split(text)][: self.max_length]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: np.ndarray, mask: np.ndarray) -> list[str]:
        ids, mask = np.asarray(ids), np.asarray(mask, bool)
        return [" ".join(self.vocab[i] for i, m in zip(row, mrow) if m) for row, mrow in zip(ids, mask)]
