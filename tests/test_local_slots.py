"""dsv3.kernels.local_slots: the custom ops' registration (opcheck on the CPU, where they run their torch
references) and, on a GPU, the Triton kernels against those references with the other ranks' rows poisoned
with NaN: a kernel that read one of them would carry the NaN into its result."""
from __future__ import annotations

import pytest
import torch

from dsv3.kernels.local_slots import (combine_backward_local, combine_backward_local_reference, combine_local,
                                      combine_local_reference, gather_rows_upto, gather_rows_upto_reference,
                                      gather_sum_local, gather_sum_local_packed, gather_sum_local_packed_reference,
                                      gather_sum_local_reference)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _case(device, N=64, K=6, D=40, E=8, E_local=4, dtype=torch.float32, seed=0):
    """N tokens' K copies, this rank holding experts [0, E_local): slots sorted with the local copies first,
    the rows past the local ones (the others' copies) NaN in y and in the gradient g_M."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    mine = idx < E_local
    key = torch.where(mine, idx, E_local).reshape(-1)
    order = torch.argsort(key, stable=True)
    rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    n = mine.sum()
    M = N * K
    x = torch.randn(N, D, generator=g).to(dtype)
    y = torch.randn(M, D, generator=g).to(dtype)
    g_M = torch.randn(M, D, generator=g).to(dtype)
    y[n:] = float("nan")
    g_M[n:] = float("nan")
    g_N = torch.randn(N, D, generator=g).to(dtype)
    w = torch.rand(N, K, generator=g)
    return [t.to(device) for t in (x, order // K, n, rows, mine, y, g_M, g_N, w)]


def test_ops_pass_opcheck_on_cpu():
    x, src, n, rows, mine, y, g_M, g_N, w = _case("cpu", N=12, D=10)
    y, g_M = y.nan_to_num(), g_M.nan_to_num()       # opcheck compares outputs, NaN != NaN
    torch.library.opcheck(torch.ops.dsv3.gather_rows_upto.default, (x, src, n))
    torch.library.opcheck(torch.ops.dsv3.gather_sum_local.default, (g_M, rows, mine))
    torch.library.opcheck(torch.ops.dsv3.gather_sum_local.default, (g_M, rows, mine, y))
    torch.library.opcheck(torch.ops.dsv3.combine_local.default, (y, rows, w, mine))
    head = torch.randn(mine.shape[0], 12)
    torch.library.opcheck(torch.ops.dsv3.gather_sum_local_packed.default, (g_M, y, rows, mine, head, 96))
    torch.library.opcheck(torch.ops.dsv3.combine_backward_local.default, (g_N, y, rows, w, mine))


def test_cpu_references_drop_the_others_rows():
    """The references themselves: finite results from NaN rows, and equal to the same sums over the local
    copies written as a loop."""
    x, src, n, rows, mine, y, g_M, g_N, w = _case("cpu")
    N, K = mine.shape
    out = combine_local(y, rows, w, mine)
    dx = gather_sum_local(g_M, rows, mine)
    dx2 = gather_sum_local(g_M, rows, mine, y)         # two gradients of the same rows, summed in one pass
    dy, dw = combine_backward_local(g_N, y, rows, w, mine)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert torch.isfinite(dx2).all()
    for t in range(N):
        ks = [k for k in range(K) if mine[t, k]]
        want = sum((w[t, k] * y[rows[t * K + k]] for k in ks), torch.zeros(y.shape[1]))
        torch.testing.assert_close(out[t], want)
        torch.testing.assert_close(dx[t], sum((g_M[rows[t * K + k]] for k in ks), torch.zeros(y.shape[1])))
        torch.testing.assert_close(dx2[t], sum((g_M[rows[t * K + k]] + y[rows[t * K + k]] for k in ks),
                                               torch.zeros(y.shape[1])))
        for k in range(K):
            want_dw = (g_N[t] * y[rows[t * K + k]]).sum() if mine[t, k] else torch.tensor(0.0)
            torch.testing.assert_close(dw[t, k], want_dw)
            if mine[t, k]:
                torch.testing.assert_close(dy[rows[t * K + k]], w[t, k] * g_N[t])
    assert torch.equal(gather_rows_upto(x, src, n)[:n], x[src][:n])


def test_packed_reference_lays_out_head_then_sum_then_padding():
    """The EP backward's send rows: head (fp32) bytes, the two-gradient gather-sum's bytes, zeros."""
    x, src, n, rows, mine, y, g_M, g_N, w = _case("cpu", D=10)
    head = torch.randn(mine.shape[0], 12)
    width = 12 * 4 + 10 * 4 + 8
    buf = gather_sum_local_packed(g_M, y, rows, mine, head, width)
    assert buf.dtype == torch.uint8 and buf.shape == (mine.shape[0], width)
    assert torch.equal(buf[:, :48].contiguous().view(torch.float32), head)
    assert torch.equal(buf[:, 48:88].contiguous().view(torch.float32), gather_sum_local(g_M, rows, mine, y))
    assert not buf[:, 88:].any()


@cuda
@pytest.mark.parametrize("D", [40, 1536, 7168])
def test_triton_kernels_match_references(D):
    x, src, n, rows, mine, y, g_M, g_N, w = _case("cuda", N=1000, D=D, E=16, E_local=8, dtype=torch.bfloat16)
    k = int(n)
    got = gather_rows_upto(x, src, n)
    assert torch.equal(got[:k], gather_rows_upto_reference(x, src, n)[:k])
    wide = torch.cat([x, x[:, :7]], dim=1)[:, :D]         # rows strided, as x inside the packed gather buffer
    assert torch.equal(gather_rows_upto(wide, src, n)[:k], got[:k])
    dx, dx_ref = gather_sum_local(g_M, rows, mine), gather_sum_local_reference(g_M, rows, mine)
    assert torch.isfinite(dx).all()
    # both sum the local rows in fp32 and round once: only the summation order may differ
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=1e-2, atol=1e-2)
    assert (dx == dx_ref).float().mean().item() > 0.99
    dx2, dx2_ref = gather_sum_local(g_M, rows, mine, y), gather_sum_local_reference(g_M, rows, mine, y)
    assert torch.isfinite(dx2).all()
    torch.testing.assert_close(dx2.float(), dx2_ref.float(), rtol=1e-2, atol=1e-2)
    assert (dx2 == dx2_ref).float().mean().item() > 0.99
    out, out_ref = combine_local(y, rows, w, mine), combine_local_reference(y, rows, w, mine)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-2, atol=1e-2)
    assert (out == out_ref).float().mean().item() > 0.99
    dy, dw = combine_backward_local(g_N, y, rows, w, mine)
    dy_ref, dw_ref = combine_backward_local_reference(g_N, y, rows, w, mine)
    # the packed form (EP's backward send buffer): head then the sum, at the buffer's row stride; the padding
    # bytes (unwritten on CUDA) are not compared
    head = torch.randn(mine.shape[0], 12, device="cuda")
    width = -(-(48 + 2 * D) // 16) * 16 + 16
    buf = gather_sum_local_packed(g_M, y, rows, mine, head, width)
    ref_buf = gather_sum_local_packed_reference(g_M, y, rows, mine, head, width)
    assert torch.equal(buf[:, :48], ref_buf[:, :48])
    body = buf[:, 48:48 + 2 * D].contiguous().view(torch.bfloat16)
    assert torch.equal(body, dx2)                          # the same kernel and sums as the unpacked op
    torch.testing.assert_close(body.float(), dx2_ref.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(dy[:k], dy_ref[:k])                 # one product, rounded once: exact
    assert torch.isfinite(dw).all() and torch.equal(dw[~mine], torch.zeros_like(dw[~mine]))
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)
