"""Meta-Pooling mixture ``sum_k π_k op_k(x)`` as fused Triton kernels with a custom backward.

Forward (DESIGN.md budget 5·|x|, floor 3·|x|):
  pass 1 (``_meta_pool_forward_kernel``, Triton): one read of x computes every local candidate
    present (skip, avg3/5/7, max3/5/7), their π-weighted mixture, and the strip sums of x.
  the strip gates: two tiny pointwise convs on the strip means (torch).
  pass 2 (``metapool::strip_gate``, C++/CUDA): out = local + π_strip · x · σ(g_h) σ(g_w).
Backward (budget 6·|x|):
  pass 1 (``_strip_reduce_kernel``): the strip's row and column reductions of grad·x, which every
    element's gradient depends on through the strip means (so they must come first).
  pass 2 (``_meta_pool_backward_kernel``): grad of x for every candidate at once (avg adjoint =
    box sums of grad / window counts; max adjoint = a gather from the neighbouring windows whose
    recomputed first-in-row-major argmax is this element; strip and strip-mean adjoints), and
    the α partial sums Σ grad · op_k(x) (as Σ x · adjoint_k(grad)) in the same pass.

How the kernels walk a plane: each program owns one (n, c) plane, a tile of columns held as a
vector, and a chunk of rows it visits one by one. Window ops are separable: a row's horizontal
partials (sums / maxima / first argmax over k columns) come from shifted loads of that row;
the vertical half reduces over a ring of the last RING rows' partials held in registers, so k=3, 5
and 7 share one ring slot per row instead of three independent windows. No atomics anywhere:
cross-program sums are written as partials and reduced by torch, so results are bitwise
reproducible.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference import (LOCAL_CANDIDATES, check_candidates, check_input, check_same_device,
                         compute_dtype)
from .strip_gate import strip_gate

__all__ = ["meta_pool"]

# Canonical slots of the local candidates in the kernels' weight vector.
LOCAL_SLOT = {name: i for i, name in enumerate(LOCAL_CANDIDATES)}  # skip, avg3, avg5, avg7, max3, max5, max7


# =============================================================================================
# Triton kernels
#
# Shapes inside the kernels: a program holds PB planes × BLOCK columns as [PB, BLOCK] tensors;
# rings of per-row partials are [RING, PB, BLOCK]. Row masks are built as full tensors, never as
# scalars (the interpreter mishandles scalar boolean masks).
# =============================================================================================
@triton.jit
def _window_count(idx, r: tl.constexpr, n):
    """Valid positions in the window [idx - r, idx + r] of a length-n axis (count_include_pad=False).

    Clamped to 1 so positions outside the axis (masked out later) never divide by zero.
    """
    return tl.maximum(tl.minimum(idx + r, n - 1) - tl.maximum(idx - r, 0) + 1, 1).to(tl.float32)


@triton.jit
def _ring_max(ring, in_win):
    """Max over the ring rows in the window; NaN if any of them is NaN (as max_pool2d)."""
    m = tl.max(tl.where(in_win, ring, float("-inf")), axis=0)
    has_nan = tl.max((in_win & (ring != ring)).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), m)


@triton.jit
def _load_local_weights(w_ptr, acc_t: tl.constexpr):
    """π of skip, avg3, avg5, avg7, max3, max5, max7 (zero where a candidate is absent)."""
    return (tl.load(w_ptr + 0).to(acc_t), tl.load(w_ptr + 1).to(acc_t), tl.load(w_ptr + 2).to(acc_t),
            tl.load(w_ptr + 3).to(acc_t), tl.load(w_ptr + 4).to(acc_t), tl.load(w_ptr + 5).to(acc_t),
            tl.load(w_ptr + 6).to(acc_t))


@triton.jit
def _row_partials(row_ptr, cols, row_ok, W, R: tl.constexpr, acc_t: tl.constexpr):
    """Sums and maxima of one row over the 3-, 5- and 7-wide windows centred on each column.

    One set of 2R+1 shifted loads (the neighbouring columns are in cache) serves all three
    sizes: the separable first half of every local candidate. Padding never wins a max, adds
    nothing to a sum, and NaN propagates as in max_pool2d.
    """
    s3 = tl.zeros(cols.shape, acc_t)
    s5 = tl.zeros(cols.shape, acc_t)
    s7 = tl.zeros(cols.shape, acc_t)
    m3 = tl.full(cols.shape, float("-inf"), acc_t)
    m5 = tl.full(cols.shape, float("-inf"), acc_t)
    m7 = tl.full(cols.shape, float("-inf"), acc_t)
    for dd in tl.static_range(0, 2 * R + 1):
        d = dd - R  # constexpr: static_range unrolls
        ok = row_ok & (cols + d >= 0) & (cols + d < W)
        v = tl.load(row_ptr + cols + d, mask=ok, other=0.0).to(acc_t)
        vm = tl.where(ok, v, float("-inf"))
        if d * d <= 1:
            s3 += v
            m3 = tl.maximum(m3, vm, propagate_nan=tl.PropagateNan.ALL)
        if d * d <= 4:
            s5 += v
            m5 = tl.maximum(m5, vm, propagate_nan=tl.PropagateNan.ALL)
        s7 += v
        m7 = tl.maximum(m7, vm, propagate_nan=tl.PropagateNan.ALL)
    return s3, s5, s7, m3, m5, m7


@triton.jit
def _meta_pool_forward_kernel(
    x_ptr, w_ptr, out_ptr, zh_ptr, zw_ptr,
    H, W, rows_per_prog, n_planes,
    HAS_SKIP: tl.constexpr, HAS_AVG3: tl.constexpr, HAS_AVG5: tl.constexpr, HAS_AVG7: tl.constexpr,
    HAS_MAX3: tl.constexpr, HAS_MAX5: tl.constexpr, HAS_MAX7: tl.constexpr,
    WRITE_LOCAL: tl.constexpr, STRIP_SUMS: tl.constexpr,
    R: tl.constexpr, RING: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_t = zh_ptr.dtype.element_ty
    planes = tl.program_id(0) * PB + tl.arange(0, PB)
    tile = tl.program_id(1)
    chunk = tl.program_id(2)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    col2 = cols[None, :]
    lane_ok = (planes < n_planes)[:, None] & (col2 < W)  # [PB, BLOCK]
    plane_base = planes[:, None].to(tl.int64) * H * W
    zero_i = tl.zeros([PB, BLOCK], tl.int32)
    r0 = chunk * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, H)
    slots = tl.arange(0, RING)

    w_skip, w_avg3, w_avg5, w_avg7, w_max3, w_max5, w_max7 = _load_local_weights(w_ptr, acc_t)
    inv_w3 = 1.0 / _window_count(col2, 1, W)
    inv_w5 = 1.0 / _window_count(col2, 2, W)
    inv_w7 = 1.0 / _window_count(col2, 3, W)

    ring_row = tl.full([RING], -(1 << 30), tl.int32)
    s3r = tl.zeros([RING, PB, BLOCK], acc_t)
    s5r = tl.zeros([RING, PB, BLOCK], acc_t)
    s7r = tl.zeros([RING, PB, BLOCK], acc_t)
    m3r = tl.full([RING, PB, BLOCK], float("-inf"), acc_t)
    m5r = tl.full([RING, PB, BLOCK], float("-inf"), acc_t)
    m7r = tl.full([RING, PB, BLOCK], float("-inf"), acc_t)
    zw_acc = tl.zeros([PB, BLOCK], acc_t)

    for step in range(0, r1 - r0 + 2 * R):
        t = r0 - R + step  # newest input row
        t_ok = ((zero_i + t) >= 0) & ((zero_i + t) < H) & lane_ok
        s3, s5, s7, m3, m5, m7 = _row_partials(x_ptr + plane_base + t * W, col2 + zero_i, t_ok, W, R, acc_t)
        sel = (slots == step % RING)[:, None, None]
        ring_row = tl.where(slots == step % RING, t, ring_row)
        if HAS_AVG3:
            s3r = tl.where(sel, s3[None, :, :], s3r)
        if HAS_AVG5:
            s5r = tl.where(sel, s5[None, :, :], s5r)
        if HAS_AVG7:
            s7r = tl.where(sel, s7[None, :, :], s7r)
        if HAS_MAX3:
            m3r = tl.where(sel, m3[None, :, :], m3r)
        if HAS_MAX5:
            m5r = tl.where(sel, m5[None, :, :], m5r)
        if HAS_MAX7:
            m7r = tl.where(sel, m7[None, :, :], m7r)

        # Output row p = t - R: every window it needs is in the ring now.
        p = t - R
        p_ok = ((zero_i + p) >= r0) & ((zero_i + p) < r1) & lane_ok
        rr = ring_row[:, None, None]
        row_valid = (rr >= 0) & (rr < H)
        xp = tl.load(x_ptr + plane_base + p * W + col2, mask=p_ok, other=0.0).to(acc_t)
        local = tl.zeros([PB, BLOCK], acc_t)
        if HAS_SKIP:
            local += w_skip * xp
        if HAS_AVG3:
            in3 = row_valid & (rr >= p - 1) & (rr <= p + 1)
            local += w_avg3 * tl.sum(tl.where(in3, s3r, 0.0), axis=0) * inv_w3 / _window_count(p, 1, H)
        if HAS_AVG5:
            in5 = row_valid & (rr >= p - 2) & (rr <= p + 2)
            local += w_avg5 * tl.sum(tl.where(in5, s5r, 0.0), axis=0) * inv_w5 / _window_count(p, 2, H)
        if HAS_AVG7:
            in7 = row_valid & (rr >= p - 3) & (rr <= p + 3)
            local += w_avg7 * tl.sum(tl.where(in7, s7r, 0.0), axis=0) * inv_w7 / _window_count(p, 3, H)
        if HAS_MAX3:
            local += w_max3 * _ring_max(m3r, row_valid & (rr >= p - 1) & (rr <= p + 1))
        if HAS_MAX5:
            local += w_max5 * _ring_max(m5r, row_valid & (rr >= p - 2) & (rr <= p + 2))
        if HAS_MAX7:
            local += w_max7 * _ring_max(m7r, row_valid & (rr >= p - 3) & (rr <= p + 3))
        if WRITE_LOCAL:
            tl.store(out_ptr + plane_base + p * W + col2, local.to(out_ptr.dtype.element_ty), mask=p_ok)
        if STRIP_SUMS:
            # Strip sums of x: each row's partial over this column tile, and the tile's column sums.
            row_sum = tl.sum(xp, axis=1)  # [PB]
            first = (col2 == tile * BLOCK) & p_ok
            tl.store(zh_ptr + (tile * n_planes + planes[:, None]).to(tl.int64) * H + p + zero_i,
                     row_sum[:, None] + tl.zeros([PB, BLOCK], acc_t), mask=first)
            zw_acc += xp
    if STRIP_SUMS:
        tl.store(zw_ptr + (chunk * n_planes + planes[:, None]).to(tl.int64) * W + col2, zw_acc, mask=lane_ok)


@triton.jit
def _strip_reduce_kernel(
    g_ptr, x_ptr, sh_ptr, sw_ptr, rows_out_ptr, cols_out_ptr,
    H, W, rows_per_prog, n_planes,
    PB: tl.constexpr, BLOCK: tl.constexpr,
):
    """rows_out[tile, p, i] = Σ_j g·x·σw over the tile; cols_out[chunk, p, j] = Σ_i g·x·σh over the chunk."""
    acc_t = rows_out_ptr.dtype.element_ty
    planes = tl.program_id(0) * PB + tl.arange(0, PB)
    tile = tl.program_id(1)
    chunk = tl.program_id(2)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    col2 = cols[None, :]
    plane_ok = planes < n_planes
    lane_ok = plane_ok[:, None] & (col2 < W)
    plane_base = planes[:, None].to(tl.int64) * H * W
    r0 = chunk * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, H)
    sw = tl.load(sw_ptr + planes[:, None].to(tl.int64) * W + col2, mask=lane_ok, other=0.0).to(acc_t)
    col_acc = tl.zeros([PB, BLOCK], acc_t)
    for i in range(r0, r1):
        g = tl.load(g_ptr + plane_base + i * W + col2, mask=lane_ok, other=0.0).to(acc_t)
        x = tl.load(x_ptr + plane_base + i * W + col2, mask=lane_ok, other=0.0).to(acc_t)
        q = g * x
        sh = tl.load(sh_ptr + planes.to(tl.int64) * H + i, mask=plane_ok, other=0.0).to(acc_t)
        tl.store(rows_out_ptr + (tile * n_planes + planes).to(tl.int64) * H + i, tl.sum(q * sw, axis=1), mask=plane_ok)
        col_acc += q * sh[:, None]
    tl.store(cols_out_ptr + (chunk * n_planes + planes[:, None]).to(tl.int64) * W + col2, col_acc, mask=lane_ok)


@triton.jit
def _max_adjoint(u_row, q2, x_row_ptr, W, row_ok, scratch_ptr, lanes2, r: tl.constexpr, BLOCK: tl.constexpr,
                 acc_t: tl.constexpr):
    """Horizontal half of the max gather: Σ_b [first argmax column of window (i, q + b) == q] · U(i, q + b).

    U (the column-wise gathered gradient) and the argmax columns are needed at shifted columns,
    which registers cannot give; they go through this program's private scratch rows.
    """
    # First (leftmost) argmax of x[i, q - r : q + r + 1]; strict '>' so a later equal value never wins.
    best = tl.full(u_row.shape, float("-inf"), acc_t)
    arg = tl.full(u_row.shape, -(1 << 30), tl.int32)
    found = arg > 0
    for dd in tl.static_range(0, 2 * r + 1):
        c = q2 + (dd - r)
        ok = row_ok & (c >= 0) & (c < W)
        v = tl.load(x_row_ptr + c, mask=ok, other=0.0).to(acc_t)
        better = ok & ((v > best) | ~found)
        best = tl.where(better, v, best)
        arg = tl.where(better, c, arg)
        found = found | ok
    tl.debug_barrier()  # the previous row's readers are done with the scratch
    tl.store(scratch_ptr + lanes2, u_row)
    tl.store(scratch_ptr + BLOCK + lanes2, arg.to(acc_t))
    tl.debug_barrier()
    adj = tl.zeros(u_row.shape, acc_t)
    lane = lanes2 % (2 * BLOCK)
    for bb in tl.static_range(0, 2 * r + 1):
        ok = (lane + (bb - r) >= 0) & (lane + (bb - r) < BLOCK)
        u = tl.load(scratch_ptr + lanes2 + (bb - r), mask=ok, other=0.0, cache_modifier=".cg")
        a = tl.load(scratch_ptr + BLOCK + lanes2 + (bb - r), mask=ok, other=-1.0, cache_modifier=".cg")
        adj += tl.where(ok & (a == q2.to(acc_t)), u, 0.0)
    return adj


@triton.jit
def _meta_pool_backward_kernel(
    g_ptr, x_ptr, w_ptr, gx_ptr, alpha_part_ptr, scratch_ptr,
    sh_ptr, sw_ptr, gzh_ptr, gzw_ptr, strip_w_ptr,
    H, W, rows_per_prog, n_planes, n_tiles, n_chunks,
    HAS_SKIP: tl.constexpr, HAS_AVG3: tl.constexpr, HAS_AVG5: tl.constexpr, HAS_AVG7: tl.constexpr,
    HAS_MAX3: tl.constexpr, HAS_MAX5: tl.constexpr, HAS_MAX7: tl.constexpr, HAS_STRIP: tl.constexpr,
    R: tl.constexpr, RING: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_t = alpha_part_ptr.dtype.element_ty
    planes = tl.program_id(0) * PB + tl.arange(0, PB)
    tile = tl.program_id(1)
    chunk = tl.program_id(2)
    pid = (tl.program_id(0).to(tl.int64) * n_tiles + tile) * n_chunks + chunk
    # The column vector covers this tile's outputs plus R halo columns each side: the gathers
    # reach R columns out.
    c0 = tile * (BLOCK - 2 * R)
    q2 = (c0 - R + tl.arange(0, BLOCK))[None, :]
    plane_ok = (planes < n_planes)[:, None]
    q_ok = plane_ok & (q2 >= 0) & (q2 < W)  # [PB, BLOCK]
    out_ok = q_ok & (q2 >= c0) & (q2 < c0 + BLOCK - 2 * R)
    plane_base = planes[:, None].to(tl.int64) * H * W
    zero_i = tl.zeros([PB, BLOCK], tl.int32)
    r0 = chunk * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, H)
    lanes2 = tl.arange(0, PB)[:, None] * (2 * BLOCK) + tl.arange(0, BLOCK)[None, :]
    scratch = scratch_ptr + pid * (PB * 2 * BLOCK)
    slots = tl.arange(0, RING)

    w_skip, w_avg3, w_avg5, w_avg7, w_max3, w_max5, w_max7 = _load_local_weights(w_ptr, acc_t)
    if HAS_STRIP:
        w_strip = tl.load(strip_w_ptr).to(acc_t)
        sw = tl.load(sw_ptr + planes[:, None].to(tl.int64) * W + q2, mask=q_ok, other=0.0).to(acc_t)
        gzw = tl.load(gzw_ptr + planes[:, None].to(tl.int64) * W + q2, mask=q_ok, other=0.0).to(acc_t)

    ring_row = tl.full([RING], -(1 << 30), tl.int32)
    m3r = tl.full([RING, PB, BLOCK], float("-inf"), acc_t)  # horizontal maxima of x rows
    m5r = tl.full([RING, PB, BLOCK], float("-inf"), acc_t)
    m7r = tl.full([RING, PB, BLOCK], float("-inf"), acc_t)
    u3r = tl.zeros([RING, PB, BLOCK], acc_t)  # column-gathered max gradients, per element row
    u5r = tl.zeros([RING, PB, BLOCK], acc_t)
    u7r = tl.zeros([RING, PB, BLOCK], acc_t)
    a3r = tl.zeros([RING, PB, BLOCK], acc_t)  # avg adjoints, per element row
    a5r = tl.zeros([RING, PB, BLOCK], acc_t)
    a7r = tl.zeros([RING, PB, BLOCK], acc_t)
    alpha_skip = tl.zeros([PB, BLOCK], acc_t)
    alpha_a3 = tl.zeros([PB, BLOCK], acc_t)
    alpha_a5 = tl.zeros([PB, BLOCK], acc_t)
    alpha_a7 = tl.zeros([PB, BLOCK], acc_t)
    alpha_m3 = tl.zeros([PB, BLOCK], acc_t)
    alpha_m5 = tl.zeros([PB, BLOCK], acc_t)
    alpha_m7 = tl.zeros([PB, BLOCK], acc_t)

    # Row t of x enters the ring; output row p = t - R scatters its gradient into the element
    # rows [p - R, p + R]; element row i = t - 2R has received everything and is finished.
    for step in range(0, r1 - r0 + 4 * R):
        t = r0 - 2 * R + step
        slot = step % RING
        sel = (slots == slot)[:, None, None]
        ring_row = tl.where(slots == slot, t, ring_row)
        rr = ring_row[:, None, None]
        row_valid = (rr >= 0) & (rr < H)
        # Row t takes the slot of the row finished RING steps ago: its accumulators start at zero.
        if HAS_MAX3:
            u3r = tl.where(sel, 0.0, u3r)
        if HAS_MAX5:
            u5r = tl.where(sel, 0.0, u5r)
        if HAS_MAX7:
            u7r = tl.where(sel, 0.0, u7r)
        if HAS_AVG3:
            a3r = tl.where(sel, 0.0, a3r)
        if HAS_AVG5:
            a5r = tl.where(sel, 0.0, a5r)
        if HAS_AVG7:
            a7r = tl.where(sel, 0.0, a7r)
        if HAS_MAX3 or HAS_MAX5 or HAS_MAX7:
            t_ok = ((zero_i + t) >= 0) & ((zero_i + t) < H) & plane_ok
            _s3, _s5, _s7, m3, m5, m7 = _row_partials(x_ptr + plane_base + t * W, q2 + zero_i, t_ok, W, R, acc_t)
            if HAS_MAX3:
                m3r = tl.where(sel, m3[None, :, :], m3r)
            if HAS_MAX5:
                m5r = tl.where(sel, m5[None, :, :], m5r)
            if HAS_MAX7:
                m7r = tl.where(sel, m7[None, :, :], m7r)

        p = t - R
        p_ok = ((zero_i + p) >= 0) & ((zero_i + p) < H) & q_ok
        gp = tl.load(g_ptr + plane_base + p * W + q2, mask=p_ok, other=0.0).to(acc_t)
        # Max: the first row (top to bottom) holding each column's window maximum takes the
        # gradient; the horizontal half of the argmax is resolved when that row finishes.
        if HAS_MAX3:
            in3 = row_valid & (rr >= p - 1) & (rr <= p + 1)
            vm = tl.max(tl.where(in3, m3r, float("-inf")), axis=0)
            va = tl.min(tl.where(in3 & (m3r == vm[None, :, :]), rr, 1 << 30), axis=0)
            u3r += tl.where(rr == va[None, :, :], gp[None, :, :], 0.0)
        if HAS_MAX5:
            in5 = row_valid & (rr >= p - 2) & (rr <= p + 2)
            vm = tl.max(tl.where(in5, m5r, float("-inf")), axis=0)
            va = tl.min(tl.where(in5 & (m5r == vm[None, :, :]), rr, 1 << 30), axis=0)
            u5r += tl.where(rr == va[None, :, :], gp[None, :, :], 0.0)
        if HAS_MAX7:
            in7 = row_valid & (rr >= p - 3) & (rr <= p + 3)
            vm = tl.max(tl.where(in7, m7r, float("-inf")), axis=0)
            va = tl.min(tl.where(in7 & (m7r == vm[None, :, :]), rr, 1 << 30), axis=0)
            u7r += tl.where(rr == va[None, :, :], gp[None, :, :], 0.0)
        # Avg: grad / window count, box-summed: horizontally from shifted loads of this grad row,
        # vertically by adding it to every element row of the window.
        if HAS_AVG3 or HAS_AVG5 or HAS_AVG7:
            h3 = tl.zeros([PB, BLOCK], acc_t)
            h5 = tl.zeros([PB, BLOCK], acc_t)
            h7 = tl.zeros([PB, BLOCK], acc_t)
            for dd in tl.static_range(0, 2 * R + 1):
                d = dd - R  # constexpr: static_range unrolls
                ok = ((zero_i + p) >= 0) & ((zero_i + p) < H) & plane_ok & (q2 + d >= 0) & (q2 + d < W)
                gv = tl.load(g_ptr + plane_base + p * W + q2 + d, mask=ok, other=0.0).to(acc_t)
                if d * d <= 1:
                    h3 += gv / _window_count(q2 + d, 1, W)
                if d * d <= 4:
                    h5 += gv / _window_count(q2 + d, 2, W)
                h7 += gv / _window_count(q2 + d, 3, W)
            if HAS_AVG3:
                in3 = row_valid & (rr >= p - 1) & (rr <= p + 1)
                a3r += tl.where(in3, (h3 / _window_count(p, 1, H))[None, :, :], 0.0)
            if HAS_AVG5:
                in5 = row_valid & (rr >= p - 2) & (rr <= p + 2)
                a5r += tl.where(in5, (h5 / _window_count(p, 2, H))[None, :, :], 0.0)
            if HAS_AVG7:
                in7 = row_valid & (rr >= p - 3) & (rr <= p + 3)
                a7r += tl.where(in7, (h7 / _window_count(p, 3, H))[None, :, :], 0.0)

        i = t - 2 * R
        mask = ((zero_i + i) >= r0) & ((zero_i + i) < r1) & out_ok
        i_in = ((zero_i + i) >= 0) & ((zero_i + i) < H) & plane_ok
        fin = rr == i
        gi = tl.load(g_ptr + plane_base + i * W + q2, mask=mask, other=0.0).to(acc_t)
        xi = tl.load(x_ptr + plane_base + i * W + q2, mask=mask, other=0.0).to(acc_t)
        gx = tl.zeros([PB, BLOCK], acc_t)
        if HAS_SKIP:
            gx += w_skip * gi
            alpha_skip += xi * gi
        if HAS_AVG3:
            adj = tl.sum(tl.where(fin, a3r, 0.0), axis=0)
            gx += w_avg3 * adj
            alpha_a3 += tl.where(mask, xi * adj, 0.0)
        if HAS_AVG5:
            adj = tl.sum(tl.where(fin, a5r, 0.0), axis=0)
            gx += w_avg5 * adj
            alpha_a5 += tl.where(mask, xi * adj, 0.0)
        if HAS_AVG7:
            adj = tl.sum(tl.where(fin, a7r, 0.0), axis=0)
            gx += w_avg7 * adj
            alpha_a7 += tl.where(mask, xi * adj, 0.0)
        x_row = x_ptr + plane_base + i * W
        if HAS_MAX3:
            adj = _max_adjoint(tl.sum(tl.where(fin, u3r, 0.0), axis=0), q2, x_row, W, i_in, scratch, lanes2,
                               1, BLOCK, acc_t)
            gx += w_max3 * adj
            alpha_m3 += tl.where(mask, xi * adj, 0.0)
        if HAS_MAX5:
            adj = _max_adjoint(tl.sum(tl.where(fin, u5r, 0.0), axis=0), q2, x_row, W, i_in, scratch, lanes2,
                               2, BLOCK, acc_t)
            gx += w_max5 * adj
            alpha_m5 += tl.where(mask, xi * adj, 0.0)
        if HAS_MAX7:
            adj = _max_adjoint(tl.sum(tl.where(fin, u7r, 0.0), axis=0), q2, x_row, W, i_in, scratch, lanes2,
                               3, BLOCK, acc_t)
            gx += w_max7 * adj
            alpha_m7 += tl.where(mask, xi * adj, 0.0)
        if HAS_STRIP:
            i_safe = tl.minimum(tl.maximum(i, 0), H - 1)  # per-row values are used only under mask
            row_idx = planes[:, None].to(tl.int64) * H + i_safe
            sh = tl.load(sh_ptr + row_idx, mask=plane_ok, other=0.0).to(acc_t)
            gzh = tl.load(gzh_ptr + row_idx, mask=plane_ok, other=0.0).to(acc_t)
            gx += w_strip * gi * sh * sw + gzh + gzw
        tl.store(gx_ptr + plane_base + i * W + q2, gx.to(gx_ptr.dtype.element_ty), mask=mask)

    out = alpha_part_ptr + pid * 8
    tl.store(out + 0, tl.sum(tl.sum(alpha_skip, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(alpha_a3, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(alpha_a5, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(alpha_a7, axis=1), axis=0))
    tl.store(out + 4, tl.sum(tl.sum(alpha_m3, axis=1), axis=0))
    tl.store(out + 5, tl.sum(tl.sum(alpha_m5, axis=1), axis=0))
    tl.store(out + 6, tl.sum(tl.sum(alpha_m7, axis=1), axis=0))


# =============================================================================================
# Launch helpers
# =============================================================================================
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _radius(names: Sequence[str]) -> int:
    return max([int(n[3:]) // 2 for n in names if n[:3] in ("avg", "max")], default=0)


def _ring(radius: int) -> int:
    return max(2, _next_pow2(2 * radius + 1))


def _flags(names: Sequence[str]) -> dict:
    present = set(names)
    return {f"HAS_{n.upper()}": n in present for n in LOCAL_CANDIDATES}


def _local_weights(names: Sequence[str], pi: torch.Tensor) -> torch.Tensor:
    """π scattered into the kernels' fixed slots (zeros for absent candidates)."""
    w = torch.zeros(8, dtype=pi.dtype, device=pi.device)
    pos = [k for k, n in enumerate(names) if n != "strip"]
    if pos:
        w[[LOCAL_SLOT[names[k]] for k in pos]] = pi[pos]
    return w


class _Grid:
    """How a launch splits N·C planes × W columns × H rows into programs.

    A program takes PB planes so that narrow planes (7×7, 14×14) still fill its lanes, and the
    Triton interpreter (which pays per operation, not per element) does whole batches at once.
    Rows are split into chunks only when there are too few programs to fill the GPU (``sms``
    streaming multiprocessors), since each chunk re-reads its halo rows.
    """

    def __init__(self, planes: int, H: int, W: int, halo: int, max_block: int, sms: Optional[int] = None):
        on_gpu = sms is not None
        self.block = max(min(_next_pow2(W + 2 * halo), max_block), _next_pow2(2 * halo + 2))
        self.tiles = triton.cdiv(W, self.block - 2 * halo)
        lanes = max(self.block, 256) if on_gpu else 2048
        self.pb = max(1, min(_next_pow2(planes), lanes // self.block, 8 if on_gpu else 1 << 30))
        self.plane_blocks = triton.cdiv(planes, self.pb)
        rows = H
        if on_gpu:
            chunks = min(max(1, math.ceil(4 * sms / (self.plane_blocks * self.tiles))), max(1, H // 16))
            rows = math.ceil(H / chunks)
        self.rows = max(1, rows)
        self.chunks = triton.cdiv(H, self.rows) if H > 0 else 1
        # One lane per thread: every ring holds RING values per lane, so lanes per thread multiply
        # register pressure (search mode keeps up to nine rings live).
        self.num_warps = max(1, min(8, self.pb * self.block // 32))

    @classmethod
    def for_tensor(cls, x: torch.Tensor, halo: int, max_block: int) -> "_Grid":
        N, C, H, W = x.shape
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else None
        return cls(N * C, H, W, halo, max_block, sms)

    @property
    def grid(self):
        return (self.plane_blocks, self.tiles, self.chunks)

    @property
    def programs(self) -> int:
        return self.plane_blocks * self.tiles * self.chunks


# Column tile widths: the forward needs no halo lanes; the backward's gathers do, and its rings
# are larger, so it keeps narrower tiles.
FORWARD_MAX_BLOCK = 256
BACKWARD_MAX_BLOCK = 128


def _forward_local(x: torch.Tensor, names: Sequence[str], pi: torch.Tensor, want_local: bool, want_strip: bool):
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    planes = N * C
    R = _radius(names)
    grid = _Grid.for_tensor(x, 0, FORWARD_MAX_BLOCK)
    local = torch.empty_like(x) if want_local else x.new_empty(0)
    zh = torch.empty((grid.tiles, planes, H), dtype=acc, device=x.device) if want_strip else x.new_empty(0, dtype=acc)
    zw = torch.empty((grid.chunks, planes, W), dtype=acc, device=x.device) if want_strip else x.new_empty(0, dtype=acc)
    _meta_pool_forward_kernel[grid.grid](
        x, _local_weights(names, pi.to(acc)), local, zh, zw, H, W, grid.rows, planes,
        **_flags(names), WRITE_LOCAL=want_local, STRIP_SUMS=want_strip,
        R=R, RING=_ring(R), PB=grid.pb, BLOCK=grid.block, num_warps=grid.num_warps,
    )
    if not want_strip:
        return local, None, None
    return local, zh.sum(0).view(N, C, H) / W, zw.sum(0).view(N, C, W) / H


# =============================================================================================
# The strip gates (tiny pointwise convs on the strip means; torch and cuBLAS do them)
# =============================================================================================
def _gate_logits(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,nch->noh", weight.reshape(weight.shape[0], -1).to(z.dtype), z) + bias.to(z.dtype)[None, :, None]


def _gate_backward(grad_g: torch.Tensor, z: torch.Tensor, weight: torch.Tensor):
    w2 = weight.reshape(weight.shape[0], -1).to(grad_g.dtype)
    grad_w = torch.einsum("noh,nch->oc", grad_g, z).reshape(weight.shape).to(weight.dtype)
    grad_b = grad_g.sum((0, 2)).to(weight.dtype)
    grad_z = torch.einsum("oc,noh->nch", w2, grad_g)
    return grad_w, grad_b, grad_z


# =============================================================================================
# Custom ops: forward, backward, fake kernels, autograd
# =============================================================================================
def _names(candidates: str) -> Tuple[str, ...]:
    return tuple(candidates.split(","))


@torch.library.custom_op("metapool::meta_pool", mutates_args=())
def _meta_pool_op(
    x: torch.Tensor, pi: torch.Tensor,
    gate_h_weight: Optional[torch.Tensor], gate_h_bias: Optional[torch.Tensor],
    gate_w_weight: Optional[torch.Tensor], gate_w_bias: Optional[torch.Tensor],
    candidates: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, z_h, z_w): z are the strip means, returned so the backward need not recompute them."""
    names = _names(candidates)
    x = x.contiguous()
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    has_strip = "strip" in names
    has_local = any(n != "strip" for n in names)
    empty_z = (x.new_empty((N, C, H if has_strip else 0), dtype=acc), x.new_empty((N, C, W if has_strip else 0), dtype=acc))
    if x.numel() == 0:
        return torch.empty_like(x), *empty_z
    local, z_h, z_w = _forward_local(x, names, pi, want_local=has_local, want_strip=has_strip)
    if not has_strip:
        return local, *empty_z
    g_h = _gate_logits(z_h, gate_h_weight, gate_h_bias)
    g_w = _gate_logits(z_w, gate_w_weight, gate_w_bias)
    weight = pi[names.index("strip")].to(acc)
    out = strip_gate(x, g_h, g_w, local if has_local else None, weight)
    return out, z_h, z_w


@_meta_pool_op.register_fake
def _meta_pool_fake(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, candidates):
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    strip = "strip" in _names(candidates)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((N, C, H if strip else 0), dtype=acc),
            x.new_empty((N, C, W if strip else 0), dtype=acc))


@torch.library.custom_op("metapool::meta_pool_backward", mutates_args=())
def _meta_pool_backward_op(
    grad: torch.Tensor, x: torch.Tensor, pi: torch.Tensor,
    gate_h_weight: Optional[torch.Tensor], gate_h_bias: Optional[torch.Tensor],
    gate_w_weight: Optional[torch.Tensor], gate_w_bias: Optional[torch.Tensor],
    z_h: torch.Tensor, z_w: torch.Tensor, candidates: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_pi, grad_gate_h_weight, grad_gate_h_bias, grad_gate_w_weight, grad_gate_w_bias).

    Gate gradients are empty tensors when 'strip' is not a candidate.
    """
    names = _names(candidates)
    x = x.contiguous()
    grad = grad.to(x.dtype).contiguous()
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    planes = N * C
    has_strip = "strip" in names
    grad_pi = torch.zeros(len(names), dtype=acc, device=x.device)
    gate_grads = [torch.zeros_like(t) if has_strip else x.new_empty(0)
                  for t in (gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias)]
    if x.numel() == 0:
        return torch.zeros_like(x), grad_pi.to(pi.dtype), *gate_grads

    R = _radius(names)
    sh = sw = gzh = gzw = strip_w = torch.zeros(1, dtype=acc, device=x.device)
    if has_strip:
        g_h = _gate_logits(z_h, gate_h_weight, gate_h_bias)
        g_w = _gate_logits(z_w, gate_w_weight, gate_w_bias)
        sh, sw = torch.sigmoid(g_h).contiguous(), torch.sigmoid(g_w).contiguous()
        strip_w = pi[names.index("strip")].to(acc).reshape(1)
        red = _Grid.for_tensor(x, 0, FORWARD_MAX_BLOCK)
        rows_part = torch.empty((red.tiles, planes, H), dtype=acc, device=x.device)
        cols_part = torch.empty((red.chunks, planes, W), dtype=acc, device=x.device)
        _strip_reduce_kernel[red.grid](
            grad, x, sh, sw, rows_part, cols_part, H, W, red.rows, planes,
            PB=red.pb, BLOCK=red.block, num_warps=red.num_warps)
        row_sum = rows_part.sum(0).view(N, C, H)  # Σ_w grad·x·σ(g_w)
        col_sum = cols_part.sum(0).view(N, C, W)  # Σ_h grad·x·σ(g_h)
        grad_pi[names.index("strip")] = (row_sum * sh).sum()
        grad_gh = strip_w * row_sum * sh * (1 - sh)
        grad_gw = strip_w * col_sum * sw * (1 - sw)
        gh_w, gh_b, grad_zh = _gate_backward(grad_gh, z_h, gate_h_weight)
        gw_w, gw_b, grad_zw = _gate_backward(grad_gw, z_w, gate_w_weight)
        gate_grads = [gh_w, gh_b, gw_w, gw_b]
        gzh, gzw = (grad_zh / W).contiguous(), (grad_zw / H).contiguous()

    grid = _Grid.for_tensor(x, R, BACKWARD_MAX_BLOCK)
    grad_x = torch.empty_like(x)
    alpha_part = torch.empty((grid.programs, 8), dtype=acc, device=x.device)
    scratch = torch.empty((grid.programs * grid.pb * 2 * grid.block,), dtype=acc, device=x.device)
    _meta_pool_backward_kernel[grid.grid](
        grad, x, _local_weights(names, pi.to(acc)), grad_x, alpha_part, scratch,
        sh, sw, gzh, gzw, strip_w,
        H, W, grid.rows, planes, grid.tiles, grid.chunks,
        **_flags(names), HAS_STRIP=has_strip,
        R=R, RING=_ring(R), PB=grid.pb, BLOCK=grid.block, num_warps=grid.num_warps,
    )
    alpha_sums = alpha_part.sum(0)
    for k, n in enumerate(names):
        if n != "strip":
            grad_pi[k] = alpha_sums[LOCAL_SLOT[n]]
    return grad_x, grad_pi.to(pi.dtype), *gate_grads


@_meta_pool_backward_op.register_fake
def _meta_pool_backward_fake(grad, x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, z_h, z_w, candidates):
    strip = "strip" in _names(candidates)
    gates = [torch.empty_like(t) if strip else x.new_empty(0)
             for t in (gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias)]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(pi), *gates)


def _setup_context(ctx, inputs, output):
    x, pi, ghw, ghb, gww, gwb, candidates = inputs
    _, z_h, z_w = output
    ctx.save_for_backward(x, pi, ghw, ghb, gww, gwb, z_h, z_w)
    ctx.candidates = candidates
    ctx.mark_non_differentiable(z_h, z_w)


def _backward(ctx, grad_out, _grad_zh, _grad_zw):
    x, pi, ghw, ghb, gww, gwb, z_h, z_w = ctx.saved_tensors
    gx, gpi, g_ghw, g_ghb, g_gww, g_gwb = _meta_pool_backward_op(grad_out, x, pi, ghw, ghb, gww, gwb, z_h, z_w, ctx.candidates)
    strip = "strip" in _names(ctx.candidates)
    gates = (g_ghw, g_ghb, g_gww, g_gwb) if strip else (None, None, None, None)
    return gx, gpi, *gates, None


_meta_pool_op.register_autograd(_backward, setup_context=_setup_context)


# =============================================================================================
# Public entry point
# =============================================================================================
def meta_pool(
    x: torch.Tensor,
    alpha: Optional[torch.Tensor],
    candidates: Sequence[str],
    gates: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """``sum_k softmax(alpha)_k op_k(x)`` over ``candidates`` with the Triton kernels.

    alpha: (K,) logits, or None with a single candidate (a fixed layer: that op alone, no weight).
    gates: (gate_h.weight, gate_h.bias, gate_w.weight, gate_w.bias), required with 'strip'.
    Accumulates in float32 (float64 for float64 x) and returns x's dtype.
    """
    names = check_candidates(candidates)
    check_input(x)
    if alpha is None:
        if len(names) != 1:
            raise ValueError(f"alpha is required with several candidates, got {list(names)}")
        pi = None
    else:
        if alpha.shape != (len(names),):
            raise ValueError(f"alpha must have shape ({len(names)},) for candidates {list(names)}, got {tuple(alpha.shape)}")
        pi = torch.softmax(alpha.to(compute_dtype(x.dtype)), dim=0)
    if "strip" in names:
        if gates is None or len(gates) != 4 or any(g is None for g in gates):
            raise ValueError("the 'strip' candidate needs gates=(gate_h.weight, gate_h.bias, gate_w.weight, gate_w.bias)")
        C = x.shape[1]
        for name, g, shape in zip(("gate_h.weight", "gate_h.bias", "gate_w.weight", "gate_w.bias"), gates,
                                  ((C, C, 1), (C,), (C, C, 1), (C,))):
            if tuple(g.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for {C} channels, got {tuple(g.shape)}")
    else:
        gates = (None, None, None, None)
    check_same_device(x=x, alpha=pi, **{f"gate{i}": g for i, g in enumerate(gates)})
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
    return mix(x, pi, names, gates)


def mix(x: torch.Tensor, pi: Optional[torch.Tensor], names: Tuple[str, ...], gates) -> torch.Tensor:
    """The launch behind :func:`meta_pool`, for arguments already validated (``FusedMetaPooling``
    checks its input once and its candidates and gates when built).

    pi: softmax(α) in the compute dtype, or None for a fixed layer (its one op, weight 1).
    """
    if names == ("skip",):
        return x  # a fixed skip layer computes nothing
    if pi is None:
        pi = torch.ones(1, dtype=torch.float32, device=x.device)
    if "strip" not in names:
        gates = (None, None, None, None)
    out, _, _ = _meta_pool_op(x, pi, *gates, ",".join(names))
    return out


# The schema defined above gets its decomposition for torch.onnx / torch.export now (the package
# registered the ops that existed when it was imported).
from .. import export as _export  # noqa: E402

_export.register()
