"""``gather_tensor_dicts`` (the tensor-wise gather behind the ZeRO-1 and pipeline checkpoints) returns, bit for
bit, what ``dist.all_gather_object`` of the same dicts returns: 2 gloo ranks, flat and one-level nested dicts
(model / optimizer state shapes), mixed dtypes (fp32 with NaN/-0.0/inf, bf16, fp16, float8, int64, bool),
0-dim, empty, non-contiguous and offset tensors, non-tensor values, rank-dependent keys; default and tiny
chunks; the default group and an explicit subgroup. float8 cannot go through ``all_gather_object`` (torch's
pickle of float8 storage fails to load), so its entry is checked against the sender's dict only."""
from __future__ import annotations

import torch

from parallel_helpers import run_ranks, unwrap


def _local_dict(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40, 3.0 + rank])
    base = torch.randn(6, 5, generator=g)
    d = {
        "w.fp32": torch.randn(3, 4, generator=g),
        "w.special": special,
        "w.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "w.fp16": torch.randn(2, 3, generator=g).to(torch.float16),
        "w.f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(5, dtype=torch.int64) * (rank + 1) - 2 ** 40,
        "mask": torch.tensor([True, False, rank == 1]),
        "scalar": torch.tensor(2.5 + rank),
        "count": torch.tensor(7 + rank, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),                 # non-contiguous
        "offset": base[2:4, 1:],                # storage offset + non-contiguous
        "note": ("rank", rank, 0.5),
        "none": None,
        # optimizer-state shape: name -> {key: tensor | value}
        "layers.0.weight": {"step": torch.tensor(float(3 + rank)),
                            "exp_avg": torch.randn(4, 3, generator=g),
                            "exp_avg_sq": torch.rand(4, 3, generator=g).to(torch.bfloat16),
                            "hyper": {"lr": 1e-3, "betas": (0.9, 0.95)},
                            "tag": "adamw"},
        "layers.1.weight": {"step": torch.tensor(5, dtype=torch.int64), "exp_avg": torch.empty(0)},
        "no_tensors": {"a": 1, "b": [1, 2]},
    }
    if rank == 1:  # keys only one rank has, and a different order
        d = {"only_rank1": torch.randn(33, generator=g).to(torch.bfloat16), **dict(reversed(list(d.items())))}
    return d


def gather_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from dsv3.parallel.data_parallel import gather_tensor_dicts

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    local = _local_dict(rank)
    sub = dist.new_group(list(range(world_size)))
    reference: list = [None] * world_size
    dist.all_gather_object(reference, _without_f8(local))
    out = {"reference": reference,
           "default": gather_tensor_dicts(local, None),
           "tiny_chunks": gather_tensor_dicts(local, sub, chunk_bytes=7),
           "one_byte_chunks": gather_tensor_dicts(local, dist.group.WORLD, chunk_bytes=1)}
    # the gather copies: the caller's tensors are not aliased by the result
    mine = out["default"][rank]
    out["aliased"] = any(torch.is_tensor(v) and v.numel() and v.untyped_storage().data_ptr()
                         == local[k].untyped_storage().data_ptr() for k, v in mine.items())
    return out


def _without_f8(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "w.f8"}


def _same_bits(x: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), ref.contiguous().reshape(-1).view(torch.uint8))


def _assert_same(got, ref, what: str) -> None:
    if torch.is_tensor(ref):
        assert torch.is_tensor(got), what
        assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
        assert got.device.type == "cpu" and not got.requires_grad, what
        assert _same_bits(got, ref), f"{what}: bits differ"
    elif isinstance(ref, dict):
        assert type(got) is dict and list(got.keys()) == list(ref.keys()), f"{what}: keys {list(got)} vs {list(ref)}"
        for k in ref:
            _assert_same(got[k], ref[k], f"{what}.{k}")
    else:
        assert not torch.is_tensor(got) and type(got) is type(ref) and got == ref, f"{what}: {got!r} vs {ref!r}"


def test_gather_tensor_dicts_matches_all_gather_object():
    ranks = unwrap(run_ranks(gather_worker, 2, timeout=60))
    expected = [_local_dict(r) for r in range(2)]
    for r, rec in enumerate(ranks):
        assert not rec["aliased"]
        for src in range(2):
            _assert_same(rec["reference"][src], _without_f8(expected[src]), f"rank {r} all_gather_object[{src}]")
            for kind in ("default", "tiny_chunks", "one_byte_chunks"):
                got = rec[kind][src]
                _assert_same(_without_f8(got), rec["reference"][src], f"rank {r} {kind}[{src}] vs all_gather_object")
                _assert_same(got, expected[src], f"rank {r} {kind}[{src}] vs sent")
