"""Token data for training: memory-mapped token files and a deterministic batch order.

- A prepared directory (``training/corpus.py``) holds ``train.bin`` / ``val.bin``; they are
  memory-mapped, never read whole.
- The training stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
  (inputs and next-token targets). Each epoch visits every window once in an order that is
  a pure function of (seed, epoch).
- Micro-batch ``i`` of the run is the global window slice ``[i*G, (i+1)*G)`` with
  ``G = batch_size * world_size``, and rank ``r`` takes its ``batch_size`` rows of it. So the
  data position is one integer (exact resume), and 2 ranks x batch b read exactly the rows
  1 rank x batch 2b reads.
- Validation uses the first windows of ``val.bin`` in order: every evaluation sees the
  same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from earlyexit.errors import InputError
from earlyexit.training.corpus import MANIFEST


def load_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{data_dir}: not a prepared data directory (no {MANIFEST}); run `earlyexit prepare --out {data_dir}`"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def token_file(data_dir: str | Path, split: str) -> np.memmap:
    """The ``split`` ("train" or "val") tokens of a prepared directory, memory-mapped."""
    m = load_manifest(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise InputError(f"{path}: missing; re-run `earlyexit prepare`")
    arr = np.memmap(path, dtype=np.dtype(m["dtype"]), mode="r")
    if len(arr) != m["counts"][f"{split}_tokens"]:
        raise InputError(
            f"{path}: has {len(arr)} tokens but the manifest says {m['counts'][f'{split}_tokens']}; re-run `earlyexit prepare`"
        )
    return arr


class Windows:
    """Fixed-length (input, target) windows over a token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise InputError(
                f"only {len(tokens)} tokens: not enough for one window of --seq-len {seq_len}"
            )

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``idx`` as (inputs, targets), each (len(idx), seq_len) int64."""
        T = self.seq_len
        rows = np.stack(
            [np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int64) for i in idx]
        )
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class TrainBatches:
    """Deterministic micro-batches: batch ``i`` depends only on (seed, i, rank, world)."""

    def __init__(
        self, windows: Windows, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.w, self.b, self.seed, self.rank, self.world = windows, batch_size, seed, rank, world
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.w.n)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``i`` for this rank: (inputs, targets) of shape (batch_size, seq_len)."""
        start = (i * self.world + self.rank) * self.b
        idx = np.empty(self.b, dtype=np.int64)
        for j in range(self.b):
            epoch, pos = divmod(start + j, self.w.n)
            idx[j] = self._order(epoch)[pos]
        return self.w.get(idx)


def val_batches(windows: Windows, batch_size: int, max_batches: int):
    """The first ``max_batches`` validation batches, in order."""
    n = min(windows.n, batch_size * max_batches)
    for s in range(0, n, batch_size):
        yield windows.get(np.arange(s, min(s + batch_size, n)))


def document_segments(tokens, eot: int):
    """Document index per token (B, T) of a packed window: the end-of-text token belongs to
    the document it ends, the token after it starts the next one."""
    is_eot = (tokens == eot).long()
    return is_eot.cumsum(1) - is_eot
