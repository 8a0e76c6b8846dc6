"""The packed loader: exact coverage, packing against a brute-force stream, resume, DP slices, doc_ids."""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch

from dsv3.data.loader import IGNORE_INDEX, PackedLoader, validation_batches
from dsv3.data.packing import EpochLayout
from dsv3.data.shards import TokenDataset
from dsv3.data.synthetic import make_docs, quick_prepare, write_text_tree
from dsv3.errors import UserError

S = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_text_tree(root / "in", make_docs(50, 11))
    # Tiny shards so windows read across shard edges.
    quick_prepare([root / "in"], root / "out", val_fraction=0.2, shard_tokens=97)
    return root / "out"


def doc_list(data, split="train") -> list[list[int]]:
    sp = TokenDataset(data).split(split)
    return [sp.document(i).tolist() for i in range(sp.n_docs)]


def target_counter(data, split="train") -> Counter:
    """What one epoch must predict: every document token, plus one EOS per document."""
    eos = TokenDataset(data).eos_id
    c = Counter()
    for d in doc_list(data, split):
        c.update(d + [eos])
    return c


def label_counter(batches) -> Counter:
    c = Counter()
    for b in batches:
        lab = b["labels"]
        c.update(lab[lab != IGNORE_INDEX].tolist())
    return c


def batches_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packing_matches_brute_force_stream(data):
    """Every window equals the slice of a stream built the obvious way from the same document order."""
    ds = TokenDataset(data)
    docs = doc_list(data)
    for epoch in (0, 1):
        lay = EpochLayout(ds.split("train"), ds.eos_id, S, seed=5, epoch=epoch)
        stream = [ds.eos_id]
        for k in lay.order:
            stream += docs[k] + [ds.eos_id]
        assert sorted(lay.order.tolist()) == list(range(len(docs)))
        for j in range(lay.n_windows):
            inp, lab, _ = lay.window(j)
            w = stream[j * S: j * S + S + 1]
            padded = w + [ds.eos_id] * (S + 1 - len(w))  # the last window is padded with EOS inputs
            assert inp.tolist() == padded[:S]
            assert lab.tolist() == w[1:] + [IGNORE_INDEX] * (S + 1 - len(w))
        assert (lay.n_windows - 1) * S < len(stream) - 1 <= lay.n_windows * S


def test_exact_coverage_per_epoch_and_reshuffle(data):
    with PackedLoader(data, seq_len=S, batch_size=1, seed=1, prefetch=0) as loader:
        W = loader.windows_per_epoch
        epochs = [[next(loader) for _ in range(W)] for _ in range(2)]
        assert loader.epoch == 2
    for ep in epochs:
        assert label_counter(ep) == target_counter(data)  # every token exactly once, no more
        for b in ep:  # labels are the inputs shifted by one inside a row
            x, y = b["input_ids"][0], b["labels"][0]
            ok = y[:-1] != IGNORE_INDEX
            assert torch.equal(x[1:][ok], y[:-1][ok])
    first = lambda ep: [b["input_ids"].tolist() for b in ep]  # noqa: E731
    assert first(epochs[0]) != first(epochs[1])  # epoch 1 reshuffled
    assert sorted(first(epochs[0])) != sorted(first(epochs[1]))  # document order too, not only windows


def test_deterministic_for_seed(data):
    def take(seed, prefetch):
        with PackedLoader(data, seq_len=S, batch_size=4, seed=seed, prefetch=prefetch) as loader:
            return [next(loader) for _ in range(12)]

    a, b, c = take(3, 4), take(3, 0), take(4, 4)
    assert all(batches_equal(x, y) for x, y in zip(a, b))
    assert not all(batches_equal(x, y) for x, y in zip(a, c))
    assert a[0]["input_ids"].dtype == torch.int64 and a[0]["labels"].shape == (4, S)


@pytest.mark.parametrize("stop_at", [0, 3, 7, 13])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume_across_epochs_with_ramp(data, stop_at, prefetch):
    ramp = lambda step: 2 if step < 4 else (4 if step < 9 else 6)  # noqa: E731
    kw = dict(seq_len=64, batch_size=ramp, seed=9, document_mask=True, prefetch=prefetch)
    with PackedLoader(data, **kw) as ref:
        expected = [next(ref) for _ in range(20)]
        assert ref.epoch >= 1  # the run crosses at least one epoch edge
    with PackedLoader(data, **kw) as first:
        for _ in range(stop_at):
            next(first)
        state = first.state_dict()
    import json

    state = json.loads(json.dumps(state))  # what a checkpoint would store
    with PackedLoader(data, **{**kw, "prefetch": 3 - prefetch}) as resumed:
        resumed.load_state_dict(state)
        for k in range(stop_at, 20):
            assert batches_equal(next(resumed), expected[k]), k


def test_next_batch_override_and_consumed(data):
    with PackedLoader(data, seq_len=S, batch_size=2, seed=2, prefetch=2) as loader, \
            PackedLoader(data, seq_len=S, batch_size=2, seed=2, prefetch=0) as ref:
        for size in (2, 4, 4, 2, 8):
            got = loader.next_batch(size)
            assert batches_equal(got, ref.next_batch(size)) and got["input_ids"].shape[0] == size
        assert loader.state_dict()["consumed"] == 20 and loader.step == 5


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_parallel_slices_disjoint_and_complete(data, world_size):
    G = 6
    with PackedLoader(data, seq_len=S, batch_size=G, seed=4, prefetch=0) as single:
        whole = [next(single) for _ in range(5)]
    ranks = [PackedLoader(data, seq_len=S, batch_size=G, seed=4, rank=r, world_size=world_size, prefetch=2)
             for r in range(world_size)]
    try:
        for step in range(5):
            parts = [next(r) for r in ranks]
            assert all(p["input_ids"].shape[0] == G // world_size for p in parts)
            glued = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            assert batches_equal(glued, whole[step])  # the ranks' slices tile the global batch exactly
    finally:
        for r in ranks:
            r.close()
    with pytest.raises(UserError):
        next(PackedLoader(data, seq_len=S, batch_size=4, world_size=3, prefetch=0))


def test_doc_ids_follow_eos(data):
    eos = TokenDataset(data).eos_id
    with PackedLoader(data, seq_len=S, batch_size=8, seed=0, document_mask=True, prefetch=0) as loader:
        for _ in range(loader.windows_per_epoch // 8 + 2):
            b = next(loader)
            for x, y, d in zip(b["input_ids"], b["labels"], b["doc_ids"]):
                # Independent rule: a new document starts at every EOS after position 0 (the synthetic text
                # never contains the EOS string, so EOS tokens are exactly the separators).
                ref = torch.cumsum((x == eos).long(), 0) - (x[0] == eos).long()
                real = y != IGNORE_INDEX
                assert torch.equal(d[real], ref[real])
                assert d[0] == 0 and bool((d[1:] >= d[:-1]).all())


def test_validation_batches_fixed_and_complete(data):
    def run(**kw):
        return list(validation_batches(data, seq_len=S, batch_size=4, **kw))

    a, b = run(), run()
    assert all(batches_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert label_counter(a) == target_counter(data, "validation")
    assert all(x["input_ids"].shape == (4, S) for x in a)  # last batch padded with ignored rows
    assert len(run(max_batches=1)) == 1
    halves = [run(rank=r, world_size=2) for r in range(2)]
    assert label_counter(halves[0] + halves[1]) == target_counter(data, "validation")


def test_prefetch_thread_stops(data):
    before = threading.active_count()
    loader = PackedLoader(data, seq_len=S, batch_size=2, prefetch=2)
    next(loader)
    assert threading.active_count() == before + 1
    loader.close()
    loader.close()
    assert threading.active_count() == before
    next(loader)  # usable after close: restarts its thread
    del loader
    import gc

    gc.collect()
    assert threading.active_count() == before  # dropped loaders do not leak threads


def test_state_mismatch_refused(data):
    with PackedLoader(data, seq_len=S, batch_size=2, seed=1, prefetch=0) as a:
        next(a)
        state = a.state_dict()
    with PackedLoader(data, seq_len=S * 2, batch_size=2, seed=1, prefetch=0) as b, pytest.raises(UserError):
        b.load_state_dict(state)
    with PackedLoader(data, seq_len=S, batch_size=2, seed=2, prefetch=0) as c, pytest.raises(UserError):
        c.load_state_dict(state)
