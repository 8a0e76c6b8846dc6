"""Would a gather-fused grouped GEMM pay? A probe for issue #5's largest lever (written in session 20).

The MoE forward gathers each token's K copies into expert order (a [T*K, D] tensor written to HBM and read
back) and then runs the gate/up grouped GEMMs on it. A kernel that gathers x's rows while it loads its A tiles
skips that pass. Whether that pays depends on how close a Triton grouped GEMM gets to torch's CUTLASS one,
so this probe times, same run, at the `small` and 3.2B shapes (N = 2F: gate and up as one joined weight; and
N = F):

- ``torch``: ``x[src]`` then ``torch._grouped_mm`` (CUTLASS), what the step does now;
- ``gather``: ``x[src]`` alone;
- ``triton``: ``dsv3.kernels.gather_gemm``'s kernel on the already-gathered rows (its efficiency against
  CUTLASS);
- ``fused``: the same kernel reading rows ``src`` of x itself (no gathered copy);
- ``fused_two_weights``: the same with gate and up as two weights read by one launch (``moe.GATHER_GEMM``);
  ``_tma``: with the weight tiles loaded by TMA descriptors (``gather_gemm.B_LOADS = "tma"``);
- the weight gradient g^T x_s per expert: CUTLASS on the saved copy (``torch_wgrad``, today's backward), our
  Triton kernel on it (``triton_wgrad``), and gathering x's rows itself (``fused_wgrad``: then the forward
  need not save the copy at all).

At the N = 2F shapes, ``backward`` times the MoE backward's two [T*K, D] passes today against the gathered
kernels (``time_backward``: ``dgrad_gathered_over_today``, ``down_backward_gathered_over_today``).

``fused_over_torch`` > 1 means the fused kernel is faster than gather + CUTLASS. Before timing, each Triton
variant is checked against an fp32 reference (relative error in norm < 1e-2, bf16 output).

    PYTHONPATH=src python3 benchmarks/gather_gemm_probe.py --out gather_gemm.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gather_gemm_probe.py --check-only   # CPU, toy shapes
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from dsv3.kernels.gather_gemm import (gathered_grouped_mm_reference, gathered_grouped_wgrad_reference,
                                      launch_gathered_mm, launch_gathered_wgrad)


def with_tma(fn):
    """fn run with the kernels' weight tiles loaded by TMA descriptors (``gather_gemm.B_LOADS = "tma"``)."""
    import dsv3.kernels.gather_gemm as gg

    def run():
        gg.B_LOADS = "tma"
        try:
            return fn()
        finally:
            gg.B_LOADS = "pointer"
    return run


def routing(T: int, K: int, E: int, device: str):
    """Random top-K routing: (src [T*K] int32 token of each copy in expert order, ends [E] int32, order: the
    sorting permutation, copy order[r] at row r)."""
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.rand(T, E, device=device, generator=g).topk(K, dim=1).indices.reshape(-1)
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=E)
    return (order // K).to(torch.int32), torch.cumsum(counts, 0).to(torch.int32), order


def time_backward(T, K, E, D, F_, bench, dev="cuda", bf=torch.bfloat16) -> dict:
    """The MoE backward's two [T*K, D] passes as today's code runs them against the gathered kernels, ms each:

    - gate/up input gradient: two CUTLASS GEMMs (d_gate w_gate[e], d_up w_up[e]) summed back to the tokens by one
      gather-sum of both, against ONE GEMM over [d_gate | d_up] along the reduction and a gather-sum of one;
    - down projection: combine_backward (writes dy = w g[token], and dw) then CUTLASS dgrad and wgrad on dy,
      against combine_weight_grad and the gathered, scaled dgrad and wgrad (no dy written).
    """
    from dsv3.kernels.gather_gemm import gathered_grouped_mm_nn, gathered_grouped_wgrad
    from dsv3.kernels.moe_permute import combine_backward, combine_weight_grad, gather_sum
    src, ends, order = routing(T, K, E, dev)
    rows = torch.argsort(order)                                   # copy -> row (the inverse permutation)
    w_TK = torch.rand(T, K, device=dev)
    w_M = w_TK.reshape(-1)[order]
    wg, wu = (torch.randn(E, F_, D, device=dev, dtype=bf) * 0.05 for _ in range(2))
    wd = torch.randn(E, D, F_, device=dev, dtype=bf) * 0.05
    g2 = torch.randn(T * K, 2 * F_, device=dev, dtype=bf)
    gg, gu = g2[:, :F_].contiguous(), g2[:, F_:].contiguous()
    g_TD = torch.randn(T, D, device=dev, dtype=bf)
    y = torch.randn(T * K, D, device=dev, dtype=bf)
    h = torch.randn(T * K, F_, device=dev, dtype=bf)

    def today_down():
        dy, dw = combine_backward(g_TD, y, rows, w_TK)
        return torch._grouped_mm(dy, wd, offs=ends), torch._grouped_mm(dy.t(), h, offs=ends), dw

    def gathered_down():
        return (gathered_grouped_mm_nn(g_TD, wd, ends, src, w_M),
                gathered_grouped_wgrad(g_TD, h, ends, g_src=src, g_scale=w_M), combine_weight_grad(g_TD, y, rows, w_TK))
    def today_dgrad():
        return gather_sum(torch._grouped_mm(gg, wg, offs=ends), rows, K, torch._grouped_mm(gu, wu, offs=ends))

    def gathered_dgrad():
        return gather_sum(gathered_grouped_mm_nn(g2, wg, ends, w2_EKN=wu), rows, K)
    # both sides compute the same gradients (each rounds differently: within 1e-2 in norm)
    for a, b in zip((today_dgrad(), *today_down()), (gathered_dgrad(), *gathered_down())):
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err < 1e-2, err
    ms = {"dgrad_today": bench(today_dgrad, 20, warmup=3), "dgrad_gathered": bench(gathered_dgrad, 20, warmup=3),
          "down_backward_today": bench(today_down, 20, warmup=3),
          "down_backward_gathered": bench(gathered_down, 20, warmup=3),
          "dgrad_gathered_tma": bench(with_tma(gathered_dgrad), 20, warmup=3),
          "down_backward_gathered_tma": bench(with_tma(gathered_down), 20, warmup=3)}
    out = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
    out.update(dgrad_gathered_over_today=round(ms["dgrad_today"] / ms["dgrad_gathered"], 3),
               down_backward_gathered_over_today=round(ms["down_backward_today"] / ms["down_backward_gathered"], 3),
               dgrad_gathered_tma_over_today=round(ms["dgrad_today"] / ms["dgrad_gathered_tma"], 3),
               down_backward_gathered_tma_over_today=round(ms["down_backward_today"]
                                                           / ms["down_backward_gathered_tma"], 3))
    return out


def reference(x, w_ENK, ends_E, src_M, w2_ENK=None):
    return gathered_grouped_mm_reference(x.float(), w_ENK.float(), ends_E, src_M,
                                         w2=None if w2_ENK is None else w2_ENK.float())


def reference_wgrad(g_MN, x, ends_E, src_M):
    return gathered_grouped_wgrad_reference(g_MN.float(), x.float(), ends_E, x_src=src_M)


def check(T, K, E, D, N, device, dtype, empty_expert: int | None = None):
    """Both Triton variants against the fp32 reference; ``empty_expert``: a group with no rows inserted there."""
    x = torch.randn(T, D, device=device, dtype=dtype)
    w = torch.randn(E, N, D, device=device, dtype=dtype) * 0.05
    src, ends, _ = routing(T, K, E - (empty_expert is not None), device)
    if empty_expert is not None:
        before = ends[empty_expert - 1:empty_expert] if empty_expert > 0 else ends.new_zeros(1)
        ends = torch.cat([ends[:empty_expert], before, ends[empty_expert:]])
    ref = reference(x, w, ends, src)
    errs = {}
    def two_weights():     # gate and up as two weights read by one launch (what moe.GATHER_GEMM runs)
        return launch_gathered_mm(x, w[:, :N // 2], ends, src, None, w[:, N // 2:])
    for name, y in (("triton", launch_gathered_mm(x[src.long()], w, ends)),
                    ("fused", launch_gathered_mm(x, w, ends, src)),
                    ("fused_two_weights", two_weights()), ("fused_two_weights_tma", with_tma(two_weights)())):
        errs[name] = ((y.float() - ref).norm() / ref.norm()).item()
        assert errs[name] < 1e-2, (name, errs[name])
    g = torch.randn(src.numel(), N, device=device, dtype=dtype)
    ref_w = reference_wgrad(g, x, ends, src)
    for name, dw in (("wgrad_triton", launch_gathered_wgrad(g, x[src.long()], ends)),
                     ("wgrad_fused", launch_gathered_wgrad(g, x, ends, x_src=src))):
        errs[name] = ((dw.float() - ref_w).norm() / ref_w.norm()).item()
        assert errs[name] < 1e-2, (name, errs[name])
        if empty_expert is not None:
            assert (dw[empty_expert] == 0).all(), name
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-only", action="store_true", help="numerics at toy shapes (CPU with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check_only:
        # uneven groups, an empty expert, rows and columns that do not fill a tile
        for empty in (None, 0, 2):
            print("check", empty, check(T=70, K=3, E=5, D=80, N=48, device=device, dtype=torch.float32,
                                        empty_expert=empty), flush=True)
        return
    from fp8_linear import bench   # median ms of CUDA-event-timed calls (benchmarks/ is the script's path)
    shapes = {"small N=2F": (16384, 6, 64, 1536, 1024), "small N=F": (16384, 6, 64, 1536, 512),
              "3b N=2F": (16384, 6, 48, 2048, 2048), "3b N=F": (16384, 6, 48, 2048, 1024)}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shapes": {}}
    for name, (T, K, E, D, N) in shapes.items():
        errs = check(T, K, E, D, N, device, torch.bfloat16)
        x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
        w = torch.randn(E, N, D, device=device, dtype=torch.bfloat16) * 0.05
        src, ends, _ = routing(T, K, E, device)
        srcl = src.long()
        xs = x[srcl]
        wt = w.transpose(-2, -1)
        g = torch.randn(T * K, N, device=device, dtype=torch.bfloat16)
        gt = g.t()

        def two_weights():
            return launch_gathered_mm(x, w[:, :N // 2], ends, src, None, w[:, N // 2:])
        ms = {"torch": bench(lambda: torch._grouped_mm(x[srcl], wt, offs=ends), 20, warmup=3),
              "gather": bench(lambda: x[srcl], 20, warmup=3),
              "cutlass_only": bench(lambda: torch._grouped_mm(xs, wt, offs=ends), 20, warmup=3),
              "triton": bench(lambda: launch_gathered_mm(xs, w, ends), 20, warmup=3),
              "fused": bench(lambda: launch_gathered_mm(x, w, ends, src), 20, warmup=3),
              "fused_two_weights": bench(two_weights, 20, warmup=3),
              "fused_two_weights_tma": bench(with_tma(two_weights), 20, warmup=3),
              # the weight gradient: today it reads the saved [M, D] copy (torch_wgrad); gathering x's rows
              # instead lets the forward keep no copy at all
              "torch_wgrad": bench(lambda: torch._grouped_mm(gt, xs, offs=ends), 20, warmup=3),
              "triton_wgrad": bench(lambda: launch_gathered_wgrad(g, xs, ends), 20, warmup=3),
              "fused_wgrad": bench(lambda: launch_gathered_wgrad(g, x, ends, x_src=src), 20, warmup=3)}
        flop = 2 * T * K * N * D
        row = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
        row.update({f"{k}_tflops": round(flop / v / 1e9, 1) for k, v in ms.items() if k != "gather"})
        row.update(fused_over_torch=round(ms["torch"] / ms["fused"], 3),
                   fused_two_weights_over_torch=round(ms["torch"] / ms["fused_two_weights"], 3),
                   fused_two_weights_tma_over_torch=round(ms["torch"] / ms["fused_two_weights_tma"], 3),
                   triton_over_cutlass=round(ms["cutlass_only"] / ms["triton"], 3),
                   fused_wgrad_over_torch=round(ms["torch_wgrad"] / ms["fused_wgrad"], 3), rel_err=errs)
        if name.endswith("N=2F"):
            row["backward"] = time_backward(T, K, E, D, N // 2, bench)
        res["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
