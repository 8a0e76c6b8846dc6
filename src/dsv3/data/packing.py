"""Packing of one split into fixed-length training windows (pure functions of seed and epoch).

The stream of an epoch is the split's documents in a seeded shuffled order, each preceded by EOS, plus a
final EOS::

    EOS d_0 EOS d_1 EOS ... EOS d_{n-1} EOS

so every document token and one EOS per document (the one ending it) is a prediction target, and each
document's first token is predicted from an EOS, as from a BOS. Window j is the stream positions
[j*S, j*S + S + 1): consecutive windows SHARE their boundary token, so every stream position except the
first is a label exactly once per epoch. The last window is padded (input EOS, label IGNORE_INDEX).
Windows are then visited in a seeded shuffled order. Nothing here depends on the batch size.
"""
from __future__ import annotations

import numpy as np

from dsv3.data.shards import SplitTokens

IGNORE_INDEX = -100  # label of padding positions; torch.nn.functional.cross_entropy skips it by default


class EpochLayout:
    """Document order, separator positions and window order of one epoch of one split."""

    def __init__(self, split: SplitTokens, eos_id: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True):
        self.split, self.eos_id, self.seq_len = split, int(eos_id), int(seq_len)
        n = split.n_docs
        lengths = split.doc_lengths()
        # Independent generator streams per (seed, epoch, purpose): epochs reshuffle, and the document and
        # window orders do not depend on each other's draws.
        self.order = (np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle
                      else np.arange(n, dtype=np.int64))
        # sep[k] = stream position of the EOS that starts segment k (segment n is the final lone EOS).
        self.sep = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths[self.order] + 1, out=self.sep[1:])
        self.stream_len = int(self.sep[-1]) + 1
        self.n_windows = windows_per_epoch(split, seq_len)
        self.window_order = (np.random.default_rng([seed, epoch, 1]).permutation(self.n_windows) if shuffle
                             else np.arange(self.n_windows, dtype=np.int64))

    def _segment_end(self, k: int) -> int:
        return int(self.sep[k + 1]) if k < len(self.order) else self.stream_len

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[int]]:
        """Stream tokens [start, stop) and how many of them fall in each successive segment."""
        k = int(np.searchsorted(self.sep, start, side="right")) - 1
        parts, seg_counts, p = [], [], start
        while p < stop:
            s0, hi = int(self.sep[k]), min(stop, self._segment_end(k))
            if p == s0:
                parts.append(np.array([self.eos_id], dtype=np.int64))
            first, last = max(p - s0 - 1, 0), hi - s0 - 1  # document-token range inside segment k
            if last > first:
                base = int(self.split.offsets[self.order[k]])
                parts.append(self.split.read(base + first, base + last))
            seg_counts.append(hi - p)
            p, k = hi, k + 1
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), seg_counts

    def window(self, j: int, with_doc_ids: bool = False):
        """(input_ids [S], labels [S], doc_ids [S] or None) of window j in STREAM order (not shuffled)."""
        S = self.seq_len
        start = j * S
        tokens, seg_counts = self.read(start, min(start + S + 1, self.stream_len))
        valid = len(tokens)
        if valid < S + 1:  # last window of the epoch: pad
            tokens = np.concatenate([tokens, np.full(S + 1 - valid, self.eos_id, dtype=np.int64)])
        inputs, labels = tokens[:S], tokens[1:].copy()
        labels[max(valid - 1, 0):] = IGNORE_INDEX
        doc_ids = None
        if with_doc_ids:
            # Document index of each input position within the row; an EOS belongs to the document it
            # starts. Padding continues the last segment (its labels are ignored anyway).
            ids = np.repeat(np.arange(len(seg_counts), dtype=np.int64), seg_counts)
            doc_ids = np.concatenate([ids, np.full(S + 1 - len(ids), ids[-1], dtype=np.int64)])[:S]
        return inputs, labels, doc_ids

    def shuffled_window(self, i: int, with_doc_ids: bool = False):
        """The i-th window visited in this epoch."""
        return self.window(int(self.window_order[i]), with_doc_ids)


def windows_per_epoch(split: SplitTokens, seq_len: int) -> int:
    """Windows of one epoch: ceil(label positions / S), label positions = tokens + one EOS per document."""
    targets = split.n_tokens + split.n_docs
    return -(-targets // seq_len)
