"""ZeRO-1 ``ShardedOptimizer.state_dict``: the tensor-broadcast gather equals, bit for bit, the former
pickled ``all_gather_object`` gather (kept as ``_state_dict_via_objects``), on 2 gloo ranks, plain DP and EP."""
from __future__ import annotations

import pytest
import torch

from parallel_helpers import make_batches, run_ranks, small_config, unwrap

STEPS, BATCH, SEQ = 2, 4, 16


def state_worker(rank: int, world_size: int, cfg, batches, parallel: dict) -> dict:
    """Per moment dtype (fp32 AdamW, bf16-moment AdamW): a few ZeRO-1 steps, then the state gathered both
    ways, plus the new way with tiny chunks (many buffers, tensors packed across chunk boundaries)."""
    from dsv3.model import DeepseekV3
    from dsv3.parallel import data_parallel as dp
    from dsv3.parallel.mesh import init_distributed, model_config_for
    from dsv3.parallel.runtime import DataExpertParallel
    from dsv3.train.config import TrainConfig

    mesh = init_distributed({"bucket_mb": 0.05, **parallel}, cfg, device="cpu")
    cfg = model_config_for(cfg, mesh.config)
    out = {"ep_rank": mesh.ep_rank}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = DeepseekV3(cfg)
        model.train()
        par = DataExpertParallel(model, mesh)
        opt = par.build_optimizer(TrainConfig(lr=2e-3, weight_decay=0.1, bf16_moments=bf16))
        assert isinstance(opt, dp.ShardedOptimizer)
        local = batches[0][0].shape[0] // mesh.dp
        for ids, labels in batches:
            sl = slice(mesh.dp_rank * local, (mesh.dp_rank + 1) * local)
            model(ids[sl], labels[sl], return_logits=False).loss.backward()
            par.finish_gradients()
            opt.step()
            opt.zero_grad(set_to_none=True)
        # a non-tensor state value on one owned dense parameter of each rank (dense state is sharded over both
        # ranks, so these are two different names): travels through the metadata
        z = opt.parts[0]
        p = next(iter(z.optim.state))
        z.optim.state[p]["note"] = ("rank", rank, 0.5)
        reference = opt._state_dict_via_objects()
        new = opt.state_dict()
        old_cap = dp._GATHER_CHUNK_BYTES
        dp._GATHER_CHUNK_BYTES = 1000
        try:
            small = opt.state_dict()
        finally:
            dp._GATHER_CHUNK_BYTES = old_cap
        out[bf16] = {"reference": reference, "new": new, "small_chunks": small}
    return out


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert got["format"] == ref["format"], what
    g, r = got["state"], ref["state"]
    assert list(g.keys()) == list(r.keys()), f"{what}: parameter names differ"
    for name, st in r.items():
        assert list(g[name].keys()) == list(st.keys()), f"{what}: {name} keys differ"
        for k, v in st.items():
            x = g[name][k]
            if torch.is_tensor(v):
                assert torch.is_tensor(x) and x.dtype == v.dtype and x.shape == v.shape, f"{what}: {name}.{k}"
                assert x.device.type == "cpu" and not x.requires_grad, f"{what}: {name}.{k}"
                assert torch.equal(x, v), f"{what}: {name}.{k} values differ"
            else:
                assert not torch.is_tensor(x) and type(x) is type(v) and x == v, f"{what}: {name}.{k}: {x!r} vs {v!r}"


@pytest.mark.parametrize("parallel", [{"dp": 2}, {"ep": 2}], ids=["dp2", "ep2"])
def test_state_dict_matches_object_gather(parallel):
    cfg = small_config()
    batches = make_batches(cfg, STEPS, BATCH, SEQ)
    ranks = unwrap(run_ranks(state_worker, 2, cfg, batches, parallel, timeout=90))
    if "ep" in parallel:
        assert [r["ep_rank"] for r in ranks] == [0, 1]
    for r, rec in enumerate(ranks):
        for bf16 in (False, True):
            res = rec[bf16]
            ref = res["reference"]["state"]
            # the state is complete (every trained parameter) and the non-tensor values of both ranks are in it
            assert sum(1 for st in ref.values() if "note" in st) == 2
            assert all("exp_avg" in st and st["step"].ndim == 0 for st in ref.values())
            moment = torch.bfloat16 if bf16 else torch.float32
            assert {st["exp_avg"].dtype for st in ref.values()} == {moment}
            for kind in ("new", "small_chunks"):
                _assert_same(res[kind], res["reference"], f"rank {r} bf16={bf16} {kind}")
                _assert_same(res[kind], ranks[0][bf16]["reference"], f"rank {r} vs rank 0 bf16={bf16} {kind}")
