"""The EP all-gather dispatch's passes over token slots, touching only this rank's copies (Triton on CUDA).

``parallel.ep_dispatch = "allgather"`` (``dsv3.parallel.ep_allgather``) sorts all ep*T*K slots of the gathered
tokens with this rank's copies first; at ep = 2 about half the slots belong to the other rank and are never
computed. Written as torch expressions (Inductor), the four passes over the slots still moved every row: the
forward gather wrote and read all ep*T*K rows, and the combine, its backward and the gather's backward loaded
the other ranks' rows only to drop them with ``where``. These kernels skip them: a masked load or store moves
no bytes.

- ``gather_rows_upto(x, src, n)``: out[j] = x[src[j]] for j < n (a device scalar: no host read); rows >= n are
  left unwritten.
- ``gather_sum_local(g, rows, mine[, g2])``: dx[t] = sum of g[rows[t*K + k]] (+ g2[rows[t*K + k]]) over the
  copies k with mine[t, k]: the gate and up GEMMs' two input gradients are summed here, row by row, where
  autograd would first add them as [ep*T*K, D] tensors (an extra write and two reads of every slot).
- ``gather_sum_local_packed(g, g2, rows, mine, head, width)``: the same sum (of both gradients) written into
  rows of a packed byte buffer behind ``head``'s fp32 bytes: the EP backward all-to-all's send buffer, built
  without a copy into it.
- ``combine_local(y, rows, w, mine)``: out[t] = sum of w[t, k] y[rows[t*K + k]] over mine[t, k], fp32 sums.
- ``combine_backward_local(g, y, rows, w, mine)``: its (dy, dw); dw = 0 and dy unwritten for the others' copies.

Each is a torch custom op (Inductor keeps it as one kernel) whose CPU implementation is the torch expression
it replaces, the reference ``tests/test_local_slots.py`` compares the kernels with. Rows the kernels leave
unwritten are rows the grouped GEMMs never read (past the last local group), so the references may write them.
"""
from __future__ import annotations

import torch

from dsv3.kernels.casting import cast_result

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def gather_rows_upto_reference(x_ND: torch.Tensor, src_M: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x[src] (every row: the rows past n are don't-cares)."""
    return x_ND[src_M]


def gather_sum_local_reference(g_MD: torch.Tensor, rows: torch.Tensor, mine_NK: torch.Tensor,
                               g2_MD: torch.Tensor | None = None) -> torch.Tensor:
    """sum over k with mine[t, k] of g[rows[t*K + k]] (+ g2[...]) -> [N, D] in g's dtype (fp32 sums; the
    others' rows may hold NaN, so ``where``, not a multiply)."""
    N, K = mine_NK.shape
    g_NKD = g_MD[rows].view(N, K, -1).float()
    if g2_MD is not None:
        g_NKD = g_NKD + g2_MD[rows].view(N, K, -1).float()
    g_NKD = torch.where(mine_NK[..., None], g_NKD, 0.0)
    return cast_result(g_NKD.sum(dim=1), g_MD.dtype)


def combine_local_reference(y_MD: torch.Tensor, rows: torch.Tensor, w_NK: torch.Tensor, mine_NK: torch.Tensor
                            ) -> torch.Tensor:
    """sum over k with mine[t, k] of w[t, k] y[rows[t*K + k]] -> [N, D] in y's dtype, fp32 sums."""
    N, K = w_NK.shape
    y_NKD = y_MD[rows].view(N, K, -1).float() * w_NK.float()[..., None]
    return cast_result(torch.where(mine_NK[..., None], y_NKD, 0.0).sum(dim=1), y_MD.dtype)


def combine_backward_local_reference(g_ND: torch.Tensor, y_MD: torch.Tensor, rows: torch.Tensor,
                                     w_NK: torch.Tensor, mine_NK: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [M, D] in y's dtype, dw [N, K] fp32) of ``combine_local``: dy[rows[t*K + k]] = w[t, k] g[t] (for
    every copy: the others' rows are don't-cares), dw[t, k] = <g[t], y[rows[t*K + k]]> for mine, else 0."""
    N, K = w_NK.shape
    g = g_ND.float()
    dy = y_MD.new_empty(y_MD.shape).index_copy(0, rows, (g[:, None, :] * w_NK.float()[..., None])
                                               .view(N * K, -1).to(y_MD.dtype))
    dw = torch.where(mine_NK, (g[:, None, :] * y_MD[rows].view(N, K, -1).float()).sum(dim=-1), 0.0)
    return dy, dw


if HAS_TRITON:
    @triton.jit
    def _gather_rows_upto_kernel(x_ptr, src_ptr, n_ptr, out_ptr, M, D, stride_x, ROWS: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
        # ROWS rows x BLOCK_D columns per program; rows at or past n are masked (no bytes moved)
        j = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        live = (j < M) & (j < tl.load(n_ptr))
        row = tl.load(src_ptr + j, mask=live, other=0).to(tl.int64)
        mask = live[:, None] & (offs < D)[None, :]
        vals = tl.load(x_ptr + row[:, None] * stride_x + offs[None, :], mask=mask)
        tl.store(out_ptr + j[:, None] * D + offs[None, :], vals, mask=mask)

    @triton.jit
    def _gather_sum_local_kernel(g_ptr, g2_ptr, w_ptr, rows_ptr, mine_ptr, out_ptr, head_ptr, head_out_ptr, D,
                                 stride_out, stride_head_out, H, K: tl.constexpr, HAS_G2: tl.constexpr,
                                 HAS_W: tl.constexpr, HAS_HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_H: tl.constexpr):
        # out[t] = sum over token t's local copies k of (g[row] (+ g2[row])) (* w[t, k]): the gather-sum of the
        # gradients, and with HAS_W the weighted combine. A copy at a time into a 1-D accumulator: a [K, BLOCK_D]
        # tile summed over K every block (the combine backward's layout) measured 869 us per `small` EP=2 combine
        # on an H100 against 120 for Inductor's kernel. Out row t at out_ptr + t * stride_out (a packed buffer's
        # rows: ``gather_sum_local_packed``); with HAS_HEAD the first column block also copies head[t] (fp32
        # [N, H]) to head_out_ptr + t * stride_head_out
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            mine = tl.load(mine_ptr + t * K + k) != 0
            row = tl.load(rows_ptr + t * K + k).to(tl.int64)
            v = tl.load(g_ptr + row * D + offs, mask=dmask & mine, other=0.0).to(tl.float32)
            if HAS_G2:
                v += tl.load(g2_ptr + row * D + offs, mask=dmask & mine, other=0.0).to(tl.float32)
            if HAS_W:
                v *= tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)
        if HAS_HEAD:
            if tl.program_id(1) == 0:
                hs = tl.arange(0, BLOCK_H)
                hmask = hs < H
                tl.store(head_out_ptr + t * stride_head_out + hs, tl.load(head_ptr + t * H + hs, mask=hmask),
                         mask=hmask)

    @triton.jit
    def _combine_backward_local_kernel(g_ptr, y_ptr, rows_ptr, w_ptr, mine_ptr, dy_ptr, dw_ptr, D,
                                       K: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, KP)
        kmask = ks < K
        live = kmask & (tl.load(mine_ptr + t * K + ks, mask=kmask, other=0) != 0)
        rows = tl.load(rows_ptr + t * K + ks, mask=live, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * K + ks, mask=live, other=0.0).to(tl.float32)
        acc = tl.zeros([KP, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = offs < D
            g = tl.load(g_ptr + t * D + offs, mask=dmask, other=0.0).to(tl.float32)
            m2 = live[:, None] & dmask[None, :]
            ptrs = rows[:, None] * D + offs[None, :]
            y = tl.load(y_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)
            tl.store(dy_ptr + ptrs, (w[:, None] * g[None, :]).to(dy_ptr.dtype.element_ty), mask=m2)
            acc += g[None, :] * y
        tl.store(dw_ptr + t * K + ks, tl.sum(acc, axis=1), mask=kmask)


def _use_triton(*tensors: torch.Tensor) -> bool:
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def _row_block(D: int) -> int:
    """The widest power-of-two block <= 1024 that divides D (no half-empty last block), else 1024 or less."""
    for b in (1024, 512, 256, 128):
        if D % b == 0:
            return b
    return min(1024, triton.next_power_of_2(D))


def _tile(K: int, D: int) -> tuple[int, int]:
    kp = triton.next_power_of_2(K)
    return kp, max(64, min(triton.next_power_of_2(D), 4096 // kp))


@torch.library.custom_op("dsv3::gather_rows_upto", mutates_args=())
def gather_rows_upto(x_ND: torch.Tensor, src_M: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """out[j] = x[src[j]] for j < n (a 0-d device tensor); rows >= n unwritten on CUDA."""
    if not _use_triton(x_ND, src_M, n):
        return gather_rows_upto_reference(x_ND, src_M, n)
    if x_ND.stride(1) != 1:     # rows may be strided (x inside the packed all-gather buffer), columns not
        x_ND = x_ND.contiguous()
    src_M = src_M.contiguous()
    M, D = src_M.numel(), x_ND.shape[1]
    out = x_ND.new_empty(M, D)
    block = _row_block(D)
    rows = max(1, 2048 // block)
    _gather_rows_upto_kernel[(triton.cdiv(M, rows), triton.cdiv(D, block))](x_ND, src_M, n.reshape(1), out, M, D,
                                                                              x_ND.stride(0), ROWS=rows,
                                                                              BLOCK_D=block)
    return out


@gather_rows_upto.register_fake
def _gather_rows_upto_fake(x_ND, src_M, n):
    return x_ND.new_empty(src_M.numel(), x_ND.shape[1])


@torch.library.custom_op("dsv3::gather_sum_local", mutates_args=())
def gather_sum_local(g_MD: torch.Tensor, rows: torch.Tensor, mine_NK: torch.Tensor,
                     g2_MD: torch.Tensor | None = None) -> torch.Tensor:
    """dx[t] = sum over k with mine[t, k] of g[rows[t*K + k]] (+ g2[rows[t*K + k]]: two gradients of the same
    rows summed in the same pass, never added as [M, D] tensors) -> [N, D], fp32 sums (Triton on CUDA)."""
    if not _use_triton(g_MD, rows, mine_NK):
        return gather_sum_local_reference(g_MD, rows, mine_NK, g2_MD)
    out = g_MD.new_empty(mine_NK.shape[0], g_MD.shape[1])
    _launch_gather_sum(g_MD, g2_MD, rows, mine_NK, out, out.stride(0))
    return out


@gather_sum_local.register_fake
def _gather_sum_local_fake(g_MD, rows, mine_NK, g2_MD=None):
    return g_MD.new_empty(mine_NK.shape[0], g_MD.shape[1])


def _launch_gather_sum(g_MD, g2_MD, rows, mine_NK, out, stride_out, head=None, head_out=None, stride_head_out=0,
                       w=None):
    """``_gather_sum_local_kernel`` over the N tokens: the sum of g (+ g2) (times w [N, K]) into out's rows."""
    g_MD, rows, mine = g_MD.contiguous(), rows.contiguous(), mine_NK.contiguous().view(torch.uint8)
    g2 = g_MD if g2_MD is None else g2_MD.contiguous()
    (N, K), D = mine_NK.shape, g_MD.shape[1]
    H = 0 if head is None else head.shape[1]
    block = _row_block(D)
    _gather_sum_local_kernel[(N, triton.cdiv(D, block))](
        g_MD, g2, g_MD if w is None else w.float().contiguous(), rows, mine, out,
        out if head is None else head.contiguous(), out if head_out is None else head_out,
        D, stride_out, stride_head_out, H, K=K, HAS_G2=g2_MD is not None, HAS_W=w is not None,
        HAS_HEAD=head is not None, BLOCK_D=block, BLOCK_H=triton.next_power_of_2(max(H, 1)))


def gather_sum_local_packed_reference(g_MD: torch.Tensor, g2_MD: torch.Tensor, rows: torch.Tensor,
                                      mine_NK: torch.Tensor, head_NH: torch.Tensor, width: int) -> torch.Tensor:
    """[N, width] uint8 rows: head's bytes (fp32 [N, H]), then ``gather_sum_local(g, rows, mine, g2)``'s row
    (in g's dtype), then zero padding."""
    return pack_bytes([head_NH.float(), gather_sum_local_reference(g_MD, rows, mine_NK, g2_MD)], width)


def pack_bytes(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """[R, c_i] tensors -> one [R, width] uint8 buffer: their bytes side by side, zero padding at the end (the
    row layout of the EP all-gather dispatch, ``dsv3.parallel.ep_allgather``)."""
    cols = [t.contiguous().view(torch.uint8) for t in tensors]
    pad = width - sum(c.shape[1] for c in cols)
    if pad:
        cols.append(cols[0].new_zeros(cols[0].shape[0], pad))
    return torch.cat(cols, dim=1)


@torch.library.custom_op("dsv3::gather_sum_local_packed", mutates_args=())
def gather_sum_local_packed(g_MD: torch.Tensor, g2_MD: torch.Tensor, rows: torch.Tensor, mine_NK: torch.Tensor,
                            head_NH: torch.Tensor, width: int) -> torch.Tensor:
    """``gather_sum_local(g, rows, mine, g2)`` written straight into rows of a packed byte buffer [N, width]
    behind head (fp32 [N, H]): the buffer the EP backward all-to-all sends (``ep_allgather``), with no copy
    into it. Bytes past the two parts are unwritten on CUDA (zero in the reference)."""
    if not _use_triton(g_MD, g2_MD, rows, mine_NK, head_NH):
        return gather_sum_local_packed_reference(g_MD, g2_MD, rows, mine_NK, head_NH, width)
    N, H = head_NH.shape
    item = g_MD.element_size()
    assert width % 4 == 0 and (4 * H) % item == 0 and 4 * H + item * g_MD.shape[1] <= width
    buf = torch.empty(N, width, dtype=torch.uint8, device=g_MD.device)
    body = buf.view(g_MD.dtype)[:, 4 * H // item:]            # row stride width / item, a view: no copy
    _launch_gather_sum(g_MD, g2_MD, rows, mine_NK, body, width // item, head_NH.float(), buf.view(torch.float32),
                       width // 4)
    return buf


@gather_sum_local_packed.register_fake
def _gather_sum_local_packed_fake(g_MD, g2_MD, rows, mine_NK, head_NH, width):
    return g_MD.new_empty(mine_NK.shape[0], width, dtype=torch.uint8)


@torch.library.custom_op("dsv3::combine_local", mutates_args=())
def combine_local(y_MD: torch.Tensor, rows: torch.Tensor, w_NK: torch.Tensor, mine_NK: torch.Tensor
                  ) -> torch.Tensor:
    """out[t] = sum over k with mine[t, k] of w[t, k] y[rows[t*K + k]] -> [N, D] in y's dtype (Triton on CUDA)."""
    if not _use_triton(y_MD, rows, w_NK, mine_NK):
        return combine_local_reference(y_MD, rows, w_NK, mine_NK)
    out = y_MD.new_empty(w_NK.shape[0], y_MD.shape[1])
    _launch_gather_sum(y_MD, None, rows, mine_NK, out, out.stride(0), w=w_NK)
    return out


@combine_local.register_fake
def _combine_local_fake(y_MD, rows, w_NK, mine_NK):
    return y_MD.new_empty(w_NK.shape[0], y_MD.shape[1])


@torch.library.custom_op("dsv3::combine_backward_local", mutates_args=())
def combine_backward_local(g_ND: torch.Tensor, y_MD: torch.Tensor, rows: torch.Tensor, w_NK: torch.Tensor,
                           mine_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dw) of ``combine_local`` (``combine_backward_local_reference``; Triton on CUDA)."""
    if not _use_triton(g_ND, y_MD, rows, w_NK, mine_NK):
        return combine_backward_local_reference(g_ND, y_MD, rows, w_NK, mine_NK)
    g_ND, y_MD, rows = g_ND.contiguous(), y_MD.contiguous(), rows.contiguous()
    mine, w = mine_NK.contiguous().view(torch.uint8), w_NK.float().contiguous()
    (N, K), D = w_NK.shape, y_MD.shape[1]
    dy = torch.empty_like(y_MD)
    dw = torch.empty(N, K, dtype=torch.float32, device=w_NK.device)
    kp, block = _tile(K, D)
    _combine_backward_local_kernel[(N,)](g_ND, y_MD, rows, w, mine, dy, dw, D, K=K, KP=kp, BLOCK_D=block,
                                         num_warps=8)
    return dy, dw


@combine_backward_local.register_fake
def _combine_backward_local_fake(g_ND, y_MD, rows, w_NK, mine_NK):
    return torch.empty_like(y_MD), torch.empty(w_NK.shape, dtype=torch.float32, device=w_NK.device)
