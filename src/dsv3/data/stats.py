"""Corpus statistics the trainer prints next to its loss."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def entropy_nats(counts: np.ndarray) -> float:
    """Shannon entropy, in nats, of the distribution given by non-negative ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def split_unigram_counts(split, vocab_size: int, eos_id: int, chunk: int = 1 << 24) -> np.ndarray:
    """Token counts over a split's loss targets: every document token plus one EOS per document."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, split.n_tokens, chunk):
        ids = split.read(start, min(start + chunk, split.n_tokens))
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    counts[eos_id] += split.n_docs
    return counts


def unigram_entropy(data, split: str = "train") -> float:
    """Unigram entropy of a prepared split, in NATS per token (comparable to a cross-entropy loss).

    It is the loss of the best model that ignores context: a trained model should go well below it. The
    distribution is over the loss targets (document tokens plus one EOS per document). ``data`` is a data
    directory or an open ``TokenDataset``; the value recorded by `dsv3 prepare` is used when present.
    """
    from dsv3.data.shards import TokenDataset

    ds = data if isinstance(data, TokenDataset) else TokenDataset(Path(data), verify=False)
    recorded = ds.meta["splits"].get(split, {}).get("unigram_entropy_nats")
    if recorded is not None:
        return float(recorded)
    return entropy_nats(split_unigram_counts(ds.split(split), ds.vocab_size, ds.eos_id))
