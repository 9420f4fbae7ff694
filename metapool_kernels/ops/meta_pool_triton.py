"""Triton kernels of ``metapool::meta_pool`` and ``metapool::meta_pool_backward``: the op's CUDA
kernels (registered in :mod:`metapool_kernels.ops.meta_pool`, which also holds the op's schema
docs, fake kernels and autograd). Without a GPU they run on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``) through :func:`metapool_kernels.ops.meta_pool.triton_on_cpu`.

Forward (docs/DESIGN.md budget 5·|x|, floor 3·|x|; this moves 3·|x| with 'strip', 2·|x| without):
  pass 1, only with 'strip' (``_strip_reduce_kernel``): the strip sums of x (reads x once).
  the strip gates (``_strip_gate_kernel``): both tiny pointwise convs on the strip means, bias
    and sigmoid in one launch, the means summed from pass 1's partials as the GEMM reads them.
  pass 2 (``_meta_pool_forward_kernel``): one read of x computes every local candidate present
    (skip, avg3/5/7, max3/5/7) and the strip term π_strip · x · σ(g_h) σ(g_w), mixes them in the
    accumulation dtype and writes the output once (so float16/bfloat16 round the mixture once).
Backward (budget 6·|x|; this moves 5·|x| with 'strip', 3·|x| without):
  pass 1, only with 'strip' (``_strip_reduce_kernel``): the strip's row and column reductions of
    grad·x, which every element's gradient depends on through the strip means.
  pass 2 (``_meta_pool_backward_kernel``): grad of x for every candidate at once (avg adjoint =
    box sums of grad / window counts; max adjoint = each window's gradient sent to its
    recomputed argmax; strip and strip-mean adjoints), and the α partial sums Σ grad · op_k(x)
    in the same pass (max: grad · window max at the outputs; avg: x · adjoint at the elements).

Where each candidate lives:
  skip      ``_meta_pool_forward_kernel`` (π_skip · x); ``_meta_pool_backward_kernel`` (π_skip · grad)
  avg3/5/7  ``_row_partials`` (row sums), ``_line_sum`` / ``_window_count``; backward:
            ``_grad_row_partials`` (weights ``_tap_weights``), ``_line_sum``
  max3/5/7  ``_row_partials`` (row maxima), ``_line_max``; backward: ``_argmax_position`` (rows),
            ``_scatter``, ``_argmax_offset`` (columns), ``_from_lane``
  strip     ``_strip_reduce_kernel`` (z_h, z_w), ``_strip_gate_kernel`` (the gate convs), the
            π · x · σ_h σ_w term in the forward kernel; backward: ``_strip_reduce_kernel`` on
            grad · x, ``_gate_backward``, the strip adjoints in the backward kernel
  π         ``_weight`` (constexpr slots; a fixed layer's weight is 1)

How the kernels walk a plane: each program owns PB channels of one sample, a tile of columns, and
a chunk of rows it visits one by one; a [PB, BLOCK] register tile is one row of those channels.
Every tensor is addressed through its strides, so NCHW and channels_last (NHWC) inputs are both
read in place; in NHWC the PB channels are the contiguous axis. Window ops are separable: a row's
horizontal partials (sums / maxima / argmax over k columns) come from shifted loads of that row,
one set of loads for k = 3, 5 and 7. The forward's vertical half reduces over delay lines: each
candidate keeps the partials of the rows its window still needs as separate registers (l0 the row
just read), and a window is a sum or max over fixed line positions, so the compiled loop does
only the window's own arithmetic and one register move per line entry per row. The backward
uses the same lines: the maxima of x's rows (for each window's argmax row), the max gradients
gathered per element row, and the avg gradients per output row. Its one cross-lane step is the
max adjoint's horizontal half: for each column shift, a lane sends what all its max windows give
the lane that far away (``_from_lane``, one exchange per shift for every max candidate). The strip
reductions' row loops are software-pipelined (``tl.range(..., num_stages=2)``): on the GPU the
next row's loads are in flight as asynchronous copies while the current row computes. What each
loop compiles to (SASS instructions per element, barriers per row step) is read off the AOT
builds by bench/predicted.py. No atomics anywhere:
cross-program sums are written as partials and reduced by torch, so results are bitwise
reproducible.

Hot-path hygiene (a layer must be capturable in a CUDA graph): the launchers never build a tensor
from host data, never read a device value on the host, and allocate only outputs and reduction
partials; π is read by the kernels at constexpr positions, and a fixed layer's weight is a
constexpr 1. Every launch runs under its tensors' device.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference import LOCAL_CANDIDATES, compute_dtype
from .layout import output_format

# Column tile widths: the forward needs no halo lanes; the backward's cross-lane exchanges do,
# and its lines are longer, so it keeps narrower tiles.
FORWARD_MAX_BLOCK = 256
BACKWARD_MAX_BLOCK = 128
# A GPU program holds at most this many lanes (one per thread) and this many channels.
GPU_LANES = 256
GPU_MAX_PLANES = 8
# An interpreted program takes wide tiles: the interpreter pays per operation, not per element.
INTERPRETER_LANES = 2048


# The launch kernels compile once per tile class, not once per layer shape: Triton would otherwise
# specialise every integer argument (== 1 as a constant, multiples of 16 as such), so each plane
# size, channel count, row chunk and batch size could compile a variant. Shapes, chunking and the
# strides of the outer axes are plain runtime integers; the two strides that may be the unit one
# (channels in NHWC, columns in NCHW) keep only the == 1 specialisation, which makes accesses
# contiguous. Alignment for vector accesses comes from VEC (see _aligned_strides), not from values.
_RUNTIME_INTS = ("C", "H", "W", "rows_per_prog", "c_blocks", "n_tiles", "n_chunks", "n_pi",
                 "n_h_parts", "n_w_parts", "h_divisor", "w_divisor",
                 "sxn", "sxh", "son", "soh", "sgn", "sgh", "san", "sah", "sbn", "sbh")
_MAYBE_UNIT_STRIDES = ("sxc", "sxw", "soc", "sow", "sgc", "sgw", "sac", "saw", "sbc", "sbw")
_launch_kernel = triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_MAYBE_UNIT_STRIDES)


# =============================================================================================
# Triton kernels
#
# Shapes inside the kernels: a program holds PB channels × BLOCK columns as [PB, BLOCK] tensors,
# and a delay line is seven of them (positions 0-6; a window uses fixed positions, the rest stay
# unused and compile away). Load masks are built as full tensors, never as scalars (the
# interpreter mishandles scalar boolean masks). Candidates are constexpr positions
# in π (-1: absent); FIXED: a fixed layer, its one candidate weighs exactly 1 and π is not read.
# =============================================================================================
@triton.jit
def _window_count(idx, r: tl.constexpr, n, ACC: tl.constexpr):
    """Valid positions in the window [idx - r, idx + r] of a length-n axis (count_include_pad=False),
    in the accumulation dtype (exact: a small integer).

    Clamped to 1 so positions outside the axis (masked out later) never divide by zero.
    """
    return tl.maximum(tl.minimum(idx + r, n - 1) - tl.maximum(idx - r, 0) + 1, 1).to(ACC)


@triton.jit
def _weight(pi_ptr, SLOT: tl.constexpr, FIXED: tl.constexpr, ACC: tl.constexpr):
    """π of the candidate at SLOT; exactly 1 for a fixed layer."""
    if FIXED:
        w = tl.full([1], 1.0, ACC)
    else:
        w = tl.load(pi_ptr + SLOT + tl.zeros([1], tl.int32)).to(ACC)
    return w


@triton.jit
def _row_partials(row_ptrs, cols, stride_w, row_ok, W, R: tl.constexpr, ACC: tl.constexpr):
    """Sums and maxima of one row over the 3-, 5- and 7-wide windows centred on each column.

    One set of 2R+1 shifted loads (the neighbouring columns are in cache) serves all three
    sizes: the separable first half of every local candidate. Padding never wins a max, adds
    nothing to a sum, and NaN propagates as in max_pool2d.
    """
    for k in tl.static_range(0, 2 * R + 1):
        d = (k + 1) // 2 * (1 - 2 * (k % 2))  # constexpr: 0, -1, 1, -2, 2, …; the centre starts every sum
        ok = row_ok & (cols >= -d) & (cols < W - d)
        v = tl.load(row_ptrs + d * stride_w, mask=ok, other=0.0).to(ACC)
        vm = tl.where(ok, v, float("-inf"))
        if k == 0:
            s3, s5, s7, m3, m5, m7 = v, v, v, vm, vm, vm
        else:
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
def _aligned_strides(stride_n, stride_c, stride_h, stride_w, VEC: tl.constexpr, CL: tl.constexpr):
    """The strides with every one but the unit stride written as a multiple of VEC (the launcher
    checked that they are): the compiler can then prove the alignment vector accesses need."""
    if VEC > 1:
        stride_n = stride_n // VEC * VEC
        stride_h = stride_h // VEC * VEC
        if CL:
            stride_w = stride_w // VEC * VEC
        else:
            stride_c = stride_c // VEC * VEC
    return stride_n, stride_c, stride_h, stride_w


@triton.jit
def _aligned_extents(C, W, VEC: tl.constexpr, CL: tl.constexpr):
    """C (NHWC) or W (NCHW), the extent of the contiguous axis, written as a multiple of VEC (the
    launcher checked that it is): masks are then provably constant over each vector."""
    if VEC > 1:
        if CL:
            C = C // VEC * VEC
        else:
            W = W // VEC * VEC
    return C, W


@triton.jit
def _program_tile(C, W, c_blocks, PB: tl.constexpr, BLOCK: tl.constexpr, HALO: tl.constexpr):
    """This program's sample n, channels [PB], strip-buffer rows n·C + c [PB] (int64), column
    vector [1, BLOCK] (with HALO extra columns each side), and first output column."""
    pid0 = tl.program_id(0)
    n = pid0 // c_blocks
    chans = (pid0 % c_blocks) * PB + tl.arange(0, PB)
    planes = n.to(tl.int64) * C + chans
    c0 = tl.program_id(1) * (BLOCK - 2 * HALO)
    cols = (c0 - HALO + tl.arange(0, BLOCK))[None, :]
    return n, chans, planes, cols, c0


@triton.jit
def _shift(l0, l1, l2, l3, l4, l5, l6, new, L: tl.constexpr):
    """Row ``new`` enters a delay line of the last L rows' partials (l0 the newest, l_{L-1} the
    oldest; the rest are unused and stay as they are, so the compiler drops them)."""
    if L > 6:
        l6 = l5
    if L > 5:
        l5 = l4
    if L > 4:
        l4 = l3
    if L > 3:
        l3 = l2
    if L > 2:
        l2 = l1
    l1 = l0
    return new, l1, l2, l3, l4, l5, l6


@triton.jit
def _pick(l0, l1, l2, l3, l4, l5, l6, K: tl.constexpr):
    """l_K of a delay line."""
    if K == 0:
        v = l0
    elif K == 1:
        v = l1
    elif K == 2:
        v = l2
    elif K == 3:
        v = l3
    elif K == 4:
        v = l4
    elif K == 5:
        v = l5
    else:
        v = l6
    return v


@triton.jit
def _line_sum(l0, l1, l2, l3, l4, l5, l6, LO: tl.constexpr, HI: tl.constexpr):
    """l_LO + … + l_HI of a delay line (constexpr positions: the window's rows are registers)."""
    # Pairwise, (l_LO + l_LO+1) + (…): summed as one chain from l_LO, the fixed avg5 layer's
    # lines crash LLVM's SLP vectorizer inside Triton's compiler (an assertion on phi reordering).
    total = _pick(l0, l1, l2, l3, l4, l5, l6, LO) + _pick(l0, l1, l2, l3, l4, l5, l6, LO + 1)
    if LO + 3 <= HI:
        total += _pick(l0, l1, l2, l3, l4, l5, l6, LO + 2) + _pick(l0, l1, l2, l3, l4, l5, l6, LO + 3)
    if LO + 5 <= HI:
        total += _pick(l0, l1, l2, l3, l4, l5, l6, LO + 4) + _pick(l0, l1, l2, l3, l4, l5, l6, LO + 5)
    total += _pick(l0, l1, l2, l3, l4, l5, l6, HI)
    return total


@triton.jit
def _line_max(l0, l1, l2, l3, l4, l5, l6, LO: tl.constexpr, HI: tl.constexpr):
    """max(l_LO, …, l_HI), NaN if any is NaN (as max_pool2d)."""
    m = _pick(l0, l1, l2, l3, l4, l5, l6, LO)
    for j in tl.static_range(LO + 1, HI + 1):
        m = tl.maximum(m, _pick(l0, l1, l2, l3, l4, l5, l6, j), propagate_nan=tl.PropagateNan.ALL)
    return m


@_launch_kernel
def _meta_pool_forward_kernel(
    x_ptr, pi_ptr, sh_ptr, sw_ptr, out_ptr,
    C, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow, rows_per_prog, c_blocks,
    SKIP: tl.constexpr, AVG3: tl.constexpr, AVG5: tl.constexpr, AVG7: tl.constexpr,
    MAX3: tl.constexpr, MAX5: tl.constexpr, MAX7: tl.constexpr, STRIP: tl.constexpr, FIXED: tl.constexpr,
    R: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    VEC: tl.constexpr, CL: tl.constexpr,
):
    """out = Σ π_k op_k(x) over the candidates present, one row of PB channels × BLOCK columns at a time.

    sh, sw: σ(g_h) (N·C, H) and σ(g_w) (N·C, W) of the strip candidate (unused without it).

    The vertical half of each window reduces over a delay line of per-row partials held in
    registers: a k-wide window (radius r) keeps the last R + r + 1 rows, l0 = row t just read,
    and output row p = t - R reduces lines l_{R-r} … l_{R+r}, positions fixed at compile time. Rows
    outside the plane enter as neutral partials (0, -inf), so no window needs a row mask.
    """
    C, W = _aligned_extents(C, W, VEC, CL)
    n, chans, planes, col2, c0 = _program_tile(C, W, c_blocks, PB, BLOCK, 0)
    sxn, sxc, sxh, sxw = _aligned_strides(sxn, sxc, sxh, sxw, VEC, CL)
    son, soc, soh, sow = _aligned_strides(son, soc, soh, sow, VEC, CL)
    chunk = tl.program_id(2)
    chan_ok = chans < C
    lane_ok = chan_ok[:, None] & (col2 < W)  # [PB, BLOCK]
    x_cols = x_ptr + (n.to(tl.int64) * sxn + chans.to(tl.int64)[:, None] * sxc + col2 * sxw)
    o_cols = out_ptr + (n.to(tl.int64) * son + chans.to(tl.int64)[:, None] * soc + col2 * sow)
    r0 = chunk * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, H)

    if SKIP >= 0:
        w_skip = _weight(pi_ptr, SKIP, FIXED, ACC)
    if MAX3 >= 0:
        w_max3 = _weight(pi_ptr, MAX3, FIXED, ACC)
    if MAX5 >= 0:
        w_max5 = _weight(pi_ptr, MAX5, FIXED, ACC)
    if MAX7 >= 0:
        w_max7 = _weight(pi_ptr, MAX7, FIXED, ACC)
    if AVG3 >= 0:
        w_avg3 = _weight(pi_ptr, AVG3, FIXED, ACC) / _window_count(col2, 1, W, ACC)
    if AVG5 >= 0:
        w_avg5 = _weight(pi_ptr, AVG5, FIXED, ACC) / _window_count(col2, 2, W, ACC)
    if AVG7 >= 0:
        w_avg7 = _weight(pi_ptr, AVG7, FIXED, ACC) / _window_count(col2, 3, W, ACC)
    if STRIP >= 0:
        w_strip = _weight(pi_ptr, STRIP, FIXED, ACC) * tl.load(
            sw_ptr + planes[:, None] * W + col2, mask=lane_ok, other=0.0).to(ACC)

    zero = tl.zeros([PB, BLOCK], ACC)
    low = tl.full([PB, BLOCK], float("-inf"), ACC)
    s3_0, s3_1, s3_2, s3_3, s3_4, s3_5, s3_6 = zero, zero, zero, zero, zero, zero, zero
    s5_0, s5_1, s5_2, s5_3, s5_4, s5_5, s5_6 = zero, zero, zero, zero, zero, zero, zero
    s7_0, s7_1, s7_2, s7_3, s7_4, s7_5, s7_6 = zero, zero, zero, zero, zero, zero, zero
    m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6 = low, low, low, low, low, low, low
    m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6 = low, low, low, low, low, low, low
    m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6 = low, low, low, low, low, low, low

    for step in range(0, r1 - r0 + 2 * R):  # the compiler does not pipeline it (no cp.async in its SASS)
        t = r0 - R + step  # newest input row
        if R > 0:
            t_ok = lane_ok & (t >= 0) & (t < H)
            s3, s5, s7, m3, m5, m7 = _row_partials(x_cols + t * sxh, col2, sxw, t_ok, W, R, ACC)
            if AVG3 >= 0:
                s3_0, s3_1, s3_2, s3_3, s3_4, s3_5, s3_6 = _shift(s3_0, s3_1, s3_2, s3_3, s3_4, s3_5, s3_6, s3, R + 2)
            if AVG5 >= 0:
                s5_0, s5_1, s5_2, s5_3, s5_4, s5_5, s5_6 = _shift(s5_0, s5_1, s5_2, s5_3, s5_4, s5_5, s5_6, s5, R + 3)
            if AVG7 >= 0:
                s7_0, s7_1, s7_2, s7_3, s7_4, s7_5, s7_6 = _shift(s7_0, s7_1, s7_2, s7_3, s7_4, s7_5, s7_6, s7, R + 4)
            if MAX3 >= 0:
                m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6 = _shift(m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6, m3, R + 2)
            if MAX5 >= 0:
                m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6 = _shift(m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6, m5, R + 3)
            if MAX7 >= 0:
                m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6 = _shift(m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6, m7, R + 4)

        # Output row p = t - R: every window it needs is in the delay lines now.
        p = t - R
        p_ok = lane_ok & (p >= r0) & (p < r1)
        local = tl.zeros([PB, BLOCK], ACC)
        if SKIP >= 0 or STRIP >= 0:
            xp = tl.load(x_cols + p * sxh, mask=p_ok, other=0.0).to(ACC)
        if SKIP >= 0:
            local += w_skip * xp
        if AVG3 >= 0:
            box = _line_sum(s3_0, s3_1, s3_2, s3_3, s3_4, s3_5, s3_6, R - 1, R + 1)
            local += (w_avg3 / _window_count(p, 1, H, ACC)) * box
        if AVG5 >= 0:
            box = _line_sum(s5_0, s5_1, s5_2, s5_3, s5_4, s5_5, s5_6, R - 2, R + 2)
            local += (w_avg5 / _window_count(p, 2, H, ACC)) * box
        if AVG7 >= 0:
            box = _line_sum(s7_0, s7_1, s7_2, s7_3, s7_4, s7_5, s7_6, R - 3, R + 3)
            local += (w_avg7 / _window_count(p, 3, H, ACC)) * box
        if MAX3 >= 0:
            local += w_max3 * _line_max(m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6, R - 1, R + 1)
        if MAX5 >= 0:
            local += w_max5 * _line_max(m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6, R - 2, R + 2)
        if MAX7 >= 0:
            local += w_max7 * _line_max(m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6, R - 3, R + 3)
        if STRIP >= 0:
            p_safe = tl.minimum(tl.maximum(p, 0), H - 1)  # per-row values are used only under p_ok
            sh = tl.load(sh_ptr + planes[:, None] * H + p_safe, mask=chan_ok[:, None], other=0.0).to(ACC)
            local += w_strip * xp * sh
        tl.store(o_cols + p * soh, local.to(out_ptr.dtype.element_ty), mask=p_ok)


@_launch_kernel
def _strip_reduce_kernel(
    a_ptr, b_ptr, sh_ptr, sw_ptr, rows_out_ptr, cols_out_ptr,
    C, H, W, san, sac, sah, saw, sbn, sbc, sbh, sbw, rows_per_prog, c_blocks,
    WEIGHTED: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    VEC: tl.constexpr, CL: tl.constexpr,
):
    """The strip reductions over one tile of columns × chunk of rows, as partials for torch to sum.

    WEIGHTED (backward, q = a·b = grad·x): rows_out[tile, plane, i] = Σ_j q·sw, cols_out[chunk,
    plane, j] = Σ_i q·sh. Otherwise (forward, q = a = x): the plain row and column sums of x.
    """
    C, W = _aligned_extents(C, W, VEC, CL)
    n, chans, planes, col2, c0 = _program_tile(C, W, c_blocks, PB, BLOCK, 0)
    san, sac, sah, saw = _aligned_strides(san, sac, sah, saw, VEC, CL)
    sbn, sbc, sbh, sbw = _aligned_strides(sbn, sbc, sbh, sbw, VEC, CL)
    tile = tl.program_id(1)
    chunk = tl.program_id(2)
    n_planes = tl.num_programs(0) // c_blocks * C
    chan_ok = chans < C
    lane_ok = chan_ok[:, None] & (col2 < W)
    a_base = a_ptr + (n.to(tl.int64) * san + chans.to(tl.int64)[:, None] * sac)
    b_base = b_ptr + (n.to(tl.int64) * sbn + chans.to(tl.int64)[:, None] * sbc)
    r0 = chunk * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, H)
    if WEIGHTED:
        sw = tl.load(sw_ptr + planes[:, None] * W + col2, mask=lane_ok, other=0.0).to(ACC)
    col_acc = tl.zeros([PB, BLOCK], ACC)
    for i in tl.range(r0, r1, num_stages=2):
        q = tl.load(a_base + i * sah + col2 * saw, mask=lane_ok, other=0.0).to(ACC)
        if WEIGHTED:
            q *= tl.load(b_base + i * sbh + col2 * sbw, mask=lane_ok, other=0.0).to(ACC)
            sh = tl.load(sh_ptr + planes[:, None] * H + i, mask=chan_ok[:, None], other=0.0).to(ACC)
            row = tl.sum(q * sw, axis=1)
            col_acc += q * sh
        else:
            row = tl.sum(q, axis=1)
            col_acc += q
        tl.store(rows_out_ptr + (tile * n_planes + planes) * H + i, row, mask=chan_ok)
    tl.store(cols_out_ptr + (chunk * n_planes + planes[:, None]) * W + col2, col_acc, mask=lane_ok)


@triton.jit
def _tap_weights(cols, W, ACC: tl.constexpr):
    """1 / column count of the window around column q + d, for every tap d of the 3-, 5- and 7-wide
    windows (cR_j: radius R, d = j - R): the avg adjoints' column weights, computed once per
    program (they depend on the column only)."""
    c1_0 = 1.0 / _window_count(cols - 1, 1, W, ACC)
    c1_1 = 1.0 / _window_count(cols, 1, W, ACC)
    c1_2 = 1.0 / _window_count(cols + 1, 1, W, ACC)
    c2_0 = 1.0 / _window_count(cols - 2, 2, W, ACC)
    c2_1 = 1.0 / _window_count(cols - 1, 2, W, ACC)
    c2_2 = 1.0 / _window_count(cols, 2, W, ACC)
    c2_3 = 1.0 / _window_count(cols + 1, 2, W, ACC)
    c2_4 = 1.0 / _window_count(cols + 2, 2, W, ACC)
    c3_0 = 1.0 / _window_count(cols - 3, 3, W, ACC)
    c3_1 = 1.0 / _window_count(cols - 2, 3, W, ACC)
    c3_2 = 1.0 / _window_count(cols - 1, 3, W, ACC)
    c3_3 = 1.0 / _window_count(cols, 3, W, ACC)
    c3_4 = 1.0 / _window_count(cols + 1, 3, W, ACC)
    c3_5 = 1.0 / _window_count(cols + 2, 3, W, ACC)
    c3_6 = 1.0 / _window_count(cols + 3, 3, W, ACC)
    return c1_0, c1_1, c1_2, c2_0, c2_1, c2_2, c2_3, c2_4, c3_0, c3_1, c3_2, c3_3, c3_4, c3_5, c3_6


@_launch_kernel
def _strip_gate_kernel(
    zh_parts_ptr, zw_parts_ptr, wh_ptr, bh_ptr, ww_ptr, bw_ptr, zh_ptr, zw_ptr, sh_ptr, sw_ptr,
    C, H, W, n_h_parts, n_w_parts, h_divisor, w_divisor,
    WRITE_Z: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr,
):
    """σ(W z + b) of one strip gate (program_id(1): 0 the rows' gate over H, 1 the columns' over W)
    for one sample and BO output channels: the two pointwise convs, bias and sigmoid in one launch.

    z, the strip means (N·C, S), is summed from the strip reduction's partials (n_parts, N·C, S)
    and divided by the reduced extent as the GEMM reads it; WRITE_Z: the first channel block
    also writes z (the forward returns it for the backward).
    """
    n = tl.program_id(0)
    rows_gate = tl.program_id(1) == 0
    o0 = tl.program_id(2) * BO
    if rows_gate:
        parts_ptr, w_ptr, b_ptr, z_ptr, s_ptr = zh_parts_ptr, wh_ptr, bh_ptr, zh_ptr, sh_ptr
        S, n_parts, divisor = H, n_h_parts, h_divisor
    else:
        parts_ptr, w_ptr, b_ptr, z_ptr, s_ptr = zw_parts_ptr, ww_ptr, bw_ptr, zw_ptr, sw_ptr
        S, n_parts, divisor = W, n_w_parts, w_divisor
    n_planes = tl.num_programs(0) * C
    outs = o0 + tl.arange(0, BO)
    pos = tl.arange(0, BS)
    out_ok = (outs < C)[:, None] & (pos < S)[None, :]
    first_block = (tl.zeros([BC, BS], tl.int32) + o0) == 0
    acc = tl.zeros([BO, BS], ACC)
    for c0 in range(0, C, BC):
        chans = c0 + tl.arange(0, BC)
        z_ok = (chans < C)[:, None] & (pos < S)[None, :]
        rows = (n.to(tl.int64) * C + chans)[:, None] * S + pos[None, :]
        z = tl.zeros([BC, BS], ACC)
        for part in range(0, n_parts):
            z += tl.load(parts_ptr + part * n_planes * S + rows, mask=z_ok, other=0.0).to(ACC)
        z = z / divisor
        if WRITE_Z:
            tl.store(z_ptr + rows, z, mask=z_ok & first_block)
        w = tl.load(w_ptr + outs[:, None] * C + chans[None, :], mask=(outs < C)[:, None] & (chans < C)[None, :],
                    other=0.0).to(ACC)
        acc += tl.dot(w, z, input_precision="ieee")
    g = acc + tl.load(b_ptr + outs, mask=outs < C, other=0.0).to(ACC)[:, None]
    tl.store(s_ptr + (n.to(tl.int64) * C + outs)[:, None] * S + pos[None, :], tl.sigmoid(g), mask=out_ok)


@triton.jit
def _grad_row_partials(row_ptrs, cols, stride_w, row_ok, W,
                       c1_0, c1_1, c1_2, c2_0, c2_1, c2_2, c2_3, c2_4, c3_0, c3_1, c3_2, c3_3, c3_4, c3_5, c3_6,
                       R: tl.constexpr, ACC: tl.constexpr):
    """Σ_{|d| ≤ r} grad[q + d] / count_r(q + d) of one grad row for r = 1, 2, 3 (weights from
    _tap_weights): the horizontal half of the avg adjoints, each output's gradient spread over
    its window and divided by the window's column count. One set of 2R+1 shifted loads serves all
    three sizes."""
    ok = row_ok & (cols >= 0) & (cols < W)
    v = tl.load(row_ptrs, mask=ok, other=0.0).to(ACC)
    h3 = v * c1_1
    h5 = v * c2_2
    h7 = v * c3_3
    for dd in tl.static_range(1, R + 1):
        for sign in tl.static_range(0, 2):
            d = dd * (2 * sign - 1)  # constexpr: -1, 1, -2, 2, …
            ok = row_ok & (cols >= -d) & (cols < W - d)
            v = tl.load(row_ptrs + d * stride_w, mask=ok, other=0.0).to(ACC)
            if dd == 1:
                h3 += v * (c1_0 if d < 0 else c1_2)
                h5 += v * (c2_1 if d < 0 else c2_3)
                h7 += v * (c3_2 if d < 0 else c3_4)
            if dd == 2:
                h5 += v * (c2_0 if d < 0 else c2_4)
                h7 += v * (c3_1 if d < 0 else c3_5)
            if dd == 3:
                h7 += v * (c3_0 if d < 0 else c3_6)
    return h3, h5, h7


@triton.jit
def _argmax_offset(x_row_ptrs, q2, sxw, W, row_ok, r: tl.constexpr, ACC: tl.constexpr):
    """Column of each window's argmax in row i, as an offset from the window's centre column,
    in max_pool2d's order: columns scan left to right and a column takes over when it is larger
    or NaN, so the last NaN wins, else the first maximum."""
    best = tl.full(q2.shape, float("-inf"), ACC)
    off = tl.full(q2.shape, 0, tl.int32)
    found = q2 < -(1 << 30)
    for dd in tl.static_range(0, 2 * r + 1):
        ok = row_ok & (q2 >= r - dd) & (q2 < W + r - dd)
        v = tl.load(x_row_ptrs + (dd - r) * sxw, mask=ok, other=0.0).to(ACC)
        better = ok & ((v > best) | (v != v) | ~found)
        best = tl.where(better, v, best)
        off = tl.where(better, dd - r, off)
        found = found | ok
    return off


@triton.jit
def _from_lane(v, d: tl.constexpr):
    """v at lane q + d for every lane q (0 beyond the tile, which only the halo lanes reach): the
    one cross-lane exchange of the backward."""
    block: tl.constexpr = v.shape[1]
    src = tl.zeros(v.shape, tl.int32) + tl.arange(0, block)[None, :] + d
    shifted = tl.gather(v, tl.minimum(tl.maximum(src, 0), block - 1), axis=1)
    return tl.where((src >= 0) & (src < block), shifted, 0.0)


@triton.jit
def _argmax_position(l0, l1, l2, l3, l4, l5, l6, t, H, LO: tl.constexpr, HI: tl.constexpr):
    """Line position (row t - position) of each column's window argmax over positions LO … HI, in
    max_pool2d's order: rows scan top to bottom (the oldest first) and a row takes over when its
    value is larger or NaN, so the last row holding a NaN wins, else the first row holding the
    maximum. Rows outside the plane never win; whether a row is inside is one scalar per row.
    Also returns the window's max (the max candidate's output)."""
    best = tl.full(l0.shape, float("-inf"), l0.dtype)
    pos = tl.full(l0.shape, HI, tl.int32)
    found = t < -(1 << 30)  # a scalar False: no row of the window taken yet
    for jj in tl.static_range(0, HI - LO + 1):
        v = _pick(l0, l1, l2, l3, l4, l5, l6, HI - jj)
        valid = (t - (HI - jj) >= 0) & (t - (HI - jj) < H)
        take = valid & ((v > best) | (v != v) | ~found)
        best = tl.where(take, v, best)
        pos = tl.where(take, HI - jj, pos)
        found = found | valid
    return pos, best


@triton.jit
def _scatter(u0, u1, u2, u3, u4, u5, u6, pos, g, LO: tl.constexpr, N: tl.constexpr):
    """u_j += g where the argmax position is LO + j, for the N element rows of a window."""
    u0 += tl.where(pos == LO, g, 0.0)
    u1 += tl.where(pos == LO + 1, g, 0.0)
    u2 += tl.where(pos == LO + 2, g, 0.0)
    if N > 3:
        u3 += tl.where(pos == LO + 3, g, 0.0)
        u4 += tl.where(pos == LO + 4, g, 0.0)
    if N > 5:
        u5 += tl.where(pos == LO + 5, g, 0.0)
        u6 += tl.where(pos == LO + 6, g, 0.0)
    return u0, u1, u2, u3, u4, u5, u6


@_launch_kernel
def _meta_pool_backward_kernel(
    g_ptr, x_ptr, pi_ptr, gx_ptr, alpha_part_ptr,
    sh_ptr, sw_ptr, gzh_ptr, gzw_ptr,
    C, H, W, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, son, soc, soh, sow,
    rows_per_prog, c_blocks, n_tiles, n_chunks, n_pi,
    SKIP: tl.constexpr, AVG3: tl.constexpr, AVG5: tl.constexpr, AVG7: tl.constexpr,
    MAX3: tl.constexpr, MAX5: tl.constexpr, MAX7: tl.constexpr, STRIP: tl.constexpr, FIXED: tl.constexpr,
    R: tl.constexpr, HALO: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr, VEC: tl.constexpr, CL: tl.constexpr,
):
    """grad_x of the mixture, and each program's α partials Σ x · adjoint_k(grad) at π's positions
    (alpha_part[program, k]; 0 at the strip's, which the launcher adds from the strip reductions).

    sh, sw: σ(g_h), σ(g_w); gzh, gzw: the gradients of the strip means, already divided by W, H.
    """
    # The column vector covers this tile's outputs plus HALO ≥ R columns each side (the gathers
    # reach R columns out; HALO rounds R up to VEC so that NCHW tiles start aligned).
    C, W = _aligned_extents(C, W, VEC, CL)
    n, chans, planes, q2, c0 = _program_tile(C, W, c_blocks, PB, BLOCK, HALO)
    sgn, sgc, sgh, sgw = _aligned_strides(sgn, sgc, sgh, sgw, VEC, CL)
    sxn, sxc, sxh, sxw = _aligned_strides(sxn, sxc, sxh, sxw, VEC, CL)
    son, soc, soh, sow = _aligned_strides(son, soc, soh, sow, VEC, CL)
    chunk = tl.program_id(2)
    pid = (tl.program_id(0).to(tl.int64) * n_tiles + tl.program_id(1)) * n_chunks + chunk
    plane_ok = (chans < C)[:, None]
    q_ok = plane_ok & (q2 >= 0) & (q2 < W)  # [PB, BLOCK]
    out_ok = q_ok & (q2 >= c0) & (q2 < c0 + BLOCK - 2 * HALO)
    g_cols = g_ptr + (n.to(tl.int64) * sgn + chans.to(tl.int64)[:, None] * sgc + q2 * sgw)
    x_cols = x_ptr + (n.to(tl.int64) * sxn + chans.to(tl.int64)[:, None] * sxc + q2 * sxw)
    o_cols = gx_ptr + (n.to(tl.int64) * son + chans.to(tl.int64)[:, None] * soc + q2 * sow)
    r0 = chunk * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, H)

    if SKIP >= 0:
        w_skip = _weight(pi_ptr, SKIP, FIXED, ACC)
    if AVG3 >= 0:
        w_avg3 = _weight(pi_ptr, AVG3, FIXED, ACC)
    if AVG5 >= 0:
        w_avg5 = _weight(pi_ptr, AVG5, FIXED, ACC)
    if AVG7 >= 0:
        w_avg7 = _weight(pi_ptr, AVG7, FIXED, ACC)
    if AVG3 >= 0 or AVG5 >= 0 or AVG7 >= 0:
        (c1_0, c1_1, c1_2, c2_0, c2_1, c2_2, c2_3, c2_4,
         c3_0, c3_1, c3_2, c3_3, c3_4, c3_5, c3_6) = _tap_weights(q2, W, ACC)
    if MAX3 >= 0:
        w_max3 = _weight(pi_ptr, MAX3, FIXED, ACC)
    if MAX5 >= 0:
        w_max5 = _weight(pi_ptr, MAX5, FIXED, ACC)
    if MAX7 >= 0:
        w_max7 = _weight(pi_ptr, MAX7, FIXED, ACC)
    if STRIP >= 0:
        w_strip = _weight(pi_ptr, STRIP, FIXED, ACC)
        sw = tl.load(sw_ptr + planes[:, None] * W + q2, mask=q_ok, other=0.0).to(ACC)
        gzw = tl.load(gzw_ptr + planes[:, None] * W + q2, mask=q_ok, other=0.0).to(ACC)

    # Delay lines (see the forward): x's horizontal maxima of the rows a max window still needs
    # (mK_j: row t - j), the max gradients gathered per element row (uK_j: element row
    # t - (R - r) - j, born at zero when the first window that can pick it scatters, finished at
    # j = R + r, row t - 2R), and each output row's avg gradient (aK_j: output row t - R - j).
    zero = tl.zeros([PB, BLOCK], ACC)  # a line's first values only meet rows that are never stored
    m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6 = zero, zero, zero, zero, zero, zero, zero
    m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6 = zero, zero, zero, zero, zero, zero, zero
    m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6 = zero, zero, zero, zero, zero, zero, zero
    u3_0, u3_1, u3_2, u3_3, u3_4, u3_5, u3_6 = zero, zero, zero, zero, zero, zero, zero
    u5_0, u5_1, u5_2, u5_3, u5_4, u5_5, u5_6 = zero, zero, zero, zero, zero, zero, zero
    u7_0, u7_1, u7_2, u7_3, u7_4, u7_5, u7_6 = zero, zero, zero, zero, zero, zero, zero
    a3_0, a3_1, a3_2, a3_3, a3_4, a3_5, a3_6 = zero, zero, zero, zero, zero, zero, zero
    a5_0, a5_1, a5_2, a5_3, a5_4, a5_5, a5_6 = zero, zero, zero, zero, zero, zero, zero
    a7_0, a7_1, a7_2, a7_3, a7_4, a7_5, a7_6 = zero, zero, zero, zero, zero, zero, zero
    alpha_skip = tl.zeros([PB, BLOCK], ACC)
    alpha_a3 = tl.zeros([PB, BLOCK], ACC)
    alpha_a5 = tl.zeros([PB, BLOCK], ACC)
    alpha_a7 = tl.zeros([PB, BLOCK], ACC)
    alpha_m3 = tl.zeros([PB, BLOCK], ACC)
    alpha_m5 = tl.zeros([PB, BLOCK], ACC)
    alpha_m7 = tl.zeros([PB, BLOCK], ACC)

    # Three stages per step, named as in the C++ backward (csrc/cpu/meta_pool_kernel.cpp):
    # arrive, row t of x enters the lines; scatter, output row p = t - R scatters its gradient into
    # the element rows [p - r, p + r]; finish, element row i = t - 2R has received everything.
    for step in range(0, r1 - r0 + 4 * R):
        t = r0 - 2 * R + step
        if MAX3 >= 0 or MAX5 >= 0 or MAX7 >= 0:
            t_ok = q_ok & (t >= 0) & (t < H)
            _s3, _s5, _s7, m3, m5, m7 = _row_partials(x_cols + t * sxh, q2, sxw, t_ok, W, R, ACC)
        if MAX3 >= 0:
            m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6 = _shift(m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6, m3, R + 2)
            u3_0, u3_1, u3_2, u3_3, u3_4, u3_5, u3_6 = _shift(u3_0, u3_1, u3_2, u3_3, u3_4, u3_5, u3_6, zero, R + 2)
        if MAX5 >= 0:
            m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6 = _shift(m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6, m5, R + 3)
            u5_0, u5_1, u5_2, u5_3, u5_4, u5_5, u5_6 = _shift(u5_0, u5_1, u5_2, u5_3, u5_4, u5_5, u5_6, zero, R + 3)
        if MAX7 >= 0:
            m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6 = _shift(m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6, m7, R + 4)
            u7_0, u7_1, u7_2, u7_3, u7_4, u7_5, u7_6 = _shift(u7_0, u7_1, u7_2, u7_3, u7_4, u7_5, u7_6, zero, R + 4)

        p = t - R
        p_in = plane_ok & (p >= 0) & (p < H)
        gp = tl.load(g_cols + p * sgh, mask=p_in & q_ok, other=0.0).to(ACC)
        p_mask = out_ok & (p >= r0) & (p < r1)  # the outputs whose α terms this program sums
        if AVG3 >= 0 or AVG5 >= 0 or AVG7 >= 0:
            h3, h5, h7 = _grad_row_partials(
                g_cols + p * sgh, q2, sgw, p_in & q_ok, W,
                c1_0, c1_1, c1_2, c2_0, c2_1, c2_2, c2_3, c2_4, c3_0, c3_1, c3_2, c3_3, c3_4, c3_5, c3_6, R, ACC)
        # Max: the row holding each column's window argmax takes the gradient; the horizontal
        # half of the argmax is resolved when that row finishes.
        if MAX3 >= 0:
            va, top = _argmax_position(m3_0, m3_1, m3_2, m3_3, m3_4, m3_5, m3_6,
                                       t, H, R - 1, R + 1)
            alpha_m3 += tl.where(p_mask, gp * top, 0.0)
            u3_0, u3_1, u3_2, u3_3, u3_4, u3_5, u3_6 = _scatter(u3_0, u3_1, u3_2, u3_3, u3_4, u3_5, u3_6, va, gp, R - 1, 3)
        if MAX5 >= 0:
            va, top = _argmax_position(m5_0, m5_1, m5_2, m5_3, m5_4, m5_5, m5_6,
                                       t, H, R - 2, R + 2)
            alpha_m5 += tl.where(p_mask, gp * top, 0.0)
            u5_0, u5_1, u5_2, u5_3, u5_4, u5_5, u5_6 = _scatter(u5_0, u5_1, u5_2, u5_3, u5_4, u5_5, u5_6, va, gp, R - 2, 5)
        if MAX7 >= 0:
            va, top = _argmax_position(m7_0, m7_1, m7_2, m7_3, m7_4, m7_5, m7_6,
                                       t, H, R - 3, R + 3)
            alpha_m7 += tl.where(p_mask, gp * top, 0.0)
            u7_0, u7_1, u7_2, u7_3, u7_4, u7_5, u7_6 = _scatter(u7_0, u7_1, u7_2, u7_3, u7_4, u7_5, u7_6, va, gp, R - 3, 7)
        # Avg: grad / window count, box-summed: horizontally by shifted loads of this grad row,
        # vertically over the lines of the output rows whose windows hold row i.
        if AVG3 >= 0:
            h3 = h3 / _window_count(p, 1, H, ACC)
            a3_0, a3_1, a3_2, a3_3, a3_4, a3_5, a3_6 = _shift(a3_0, a3_1, a3_2, a3_3, a3_4, a3_5, a3_6, h3, R + 2)
        if AVG5 >= 0:
            h5 = h5 / _window_count(p, 2, H, ACC)
            a5_0, a5_1, a5_2, a5_3, a5_4, a5_5, a5_6 = _shift(a5_0, a5_1, a5_2, a5_3, a5_4, a5_5, a5_6, h5, R + 3)
        if AVG7 >= 0:
            h7 = h7 / _window_count(p, 3, H, ACC)
            a7_0, a7_1, a7_2, a7_3, a7_4, a7_5, a7_6 = _shift(a7_0, a7_1, a7_2, a7_3, a7_4, a7_5, a7_6, h7, R + 4)

        i = t - 2 * R
        mask = out_ok & (i >= r0) & (i < r1)
        i_in = plane_ok & (i >= 0) & (i < H)
        gi = tl.load(g_cols + i * sgh, mask=mask, other=0.0).to(ACC)
        x_row = x_cols + i * sxh
        xi = tl.load(x_row, mask=mask, other=0.0).to(ACC)
        gx = tl.zeros([PB, BLOCK], ACC)
        if SKIP >= 0:
            gx += w_skip * gi
            alpha_skip += xi * gi
        if AVG3 >= 0:
            adj = _line_sum(a3_0, a3_1, a3_2, a3_3, a3_4, a3_5, a3_6, R - 1, R + 1)
            gx += w_avg3 * adj
            alpha_a3 += tl.where(mask, xi * adj, 0.0)
        if AVG5 >= 0:
            adj = _line_sum(a5_0, a5_1, a5_2, a5_3, a5_4, a5_5, a5_6, R - 2, R + 2)
            gx += w_avg5 * adj
            alpha_a5 += tl.where(mask, xi * adj, 0.0)
        if AVG7 >= 0:
            adj = _line_sum(a7_0, a7_1, a7_2, a7_3, a7_4, a7_5, a7_6, R - 3, R + 3)
            gx += w_avg7 * adj
            alpha_a7 += tl.where(mask, xi * adj, 0.0)
        if MAX3 >= 0 or MAX5 >= 0 or MAX7 >= 0:
            # Max: element row i's gathered gradients U(i, q) go to the argmax column of window
            # (i, q). Each lane sends, for every shift d, what its windows give the lane d columns
            # away (Σ π_k · U_k where argmax offset_k = -d), so one exchange per shift serves every
            # max candidate; their α terms were summed at the outputs (Σ grad · window max).
            if MAX3 >= 0:
                u3 = _pick(u3_0, u3_1, u3_2, u3_3, u3_4, u3_5, u3_6, R + 1)
                o3 = _argmax_offset(x_row, q2, sxw, W, i_in, 1, ACC)
            if MAX5 >= 0:
                u5 = _pick(u5_0, u5_1, u5_2, u5_3, u5_4, u5_5, u5_6, R + 2)
                o5 = _argmax_offset(x_row, q2, sxw, W, i_in, 2, ACC)
            if MAX7 >= 0:
                u7 = _pick(u7_0, u7_1, u7_2, u7_3, u7_4, u7_5, u7_6, R + 3)
                o7 = _argmax_offset(x_row, q2, sxw, W, i_in, 3, ACC)
            RM: tl.constexpr = 3 if MAX7 >= 0 else (2 if MAX5 >= 0 else 1)
            for dd in tl.static_range(0, 2 * RM + 1):
                sent = tl.zeros([PB, BLOCK], ACC)
                if MAX3 >= 0 and (dd - RM) * (dd - RM) <= 1:
                    sent += w_max3 * tl.where(o3 == RM - dd, u3, 0.0)
                if MAX5 >= 0 and (dd - RM) * (dd - RM) <= 4:
                    sent += w_max5 * tl.where(o5 == RM - dd, u5, 0.0)
                if MAX7 >= 0:
                    sent += w_max7 * tl.where(o7 == RM - dd, u7, 0.0)
                if dd == RM:
                    gx += sent
                else:
                    gx += _from_lane(sent, dd - RM)
        if STRIP >= 0:
            i_safe = tl.minimum(tl.maximum(i, 0), H - 1)  # per-row values are used only under mask
            sh = tl.load(sh_ptr + planes[:, None] * H + i_safe, mask=plane_ok, other=0.0).to(ACC)
            gzh = tl.load(gzh_ptr + planes[:, None] * H + i_safe, mask=plane_ok, other=0.0).to(ACC)
            gx += w_strip * gi * sh * sw + gzh + gzw
        tl.store(o_cols + i * soh, gx.to(gx_ptr.dtype.element_ty), mask=mask)

    if not FIXED:
        out = alpha_part_ptr + pid * n_pi
        if SKIP >= 0:
            tl.store(out + SKIP, tl.sum(tl.sum(alpha_skip, axis=1), axis=0))
        if AVG3 >= 0:
            tl.store(out + AVG3, tl.sum(tl.sum(alpha_a3, axis=1), axis=0))
        if AVG5 >= 0:
            tl.store(out + AVG5, tl.sum(tl.sum(alpha_a5, axis=1), axis=0))
        if AVG7 >= 0:
            tl.store(out + AVG7, tl.sum(tl.sum(alpha_a7, axis=1), axis=0))
        if MAX3 >= 0:
            tl.store(out + MAX3, tl.sum(tl.sum(alpha_m3, axis=1), axis=0))
        if MAX5 >= 0:
            tl.store(out + MAX5, tl.sum(tl.sum(alpha_m5, axis=1), axis=0))
        if MAX7 >= 0:
            tl.store(out + MAX7, tl.sum(tl.sum(alpha_m7, axis=1), axis=0))
        if STRIP >= 0:
            tl.store(out + STRIP, tl.sum(tl.sum(tl.zeros([PB, BLOCK], ACC), axis=1), axis=0))


# =============================================================================================
# Launch layout
# =============================================================================================
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _radius(names: Sequence[str]) -> int:
    return max([int(n[3:]) // 2 for n in names if n[:3] in ("avg", "max")], default=0)


def _slots(names: Sequence[str]) -> Dict[str, int]:
    """Each candidate's position in π as the kernels' constexpr arguments (-1: absent)."""
    return {name.upper(): (names.index(name) if name in names else -1) for name in LOCAL_CANDIDATES + ("strip",)}


def _acc(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


class _Grid:
    """How a launch splits N samples × C channels × W columns × H rows into programs.

    A program takes PB channels of one sample: in NHWC they are the contiguous axis (up to
    GPU_MAX_PLANES of them, the column tile narrowing to keep its lanes); in NCHW they fill the
    lanes that narrow planes (7×7, 14×14) leave. Rows are split into chunks only when there are
    too few programs to fill the GPU (``sms`` streaming multiprocessors), since each chunk re-reads
    its halo rows. ``sms=None`` is the interpreter's layout: whole planes per program.

    A GPU thread holds ``per_thread`` lanes: 1 where delay lines of per-row partials fill the
    registers (search mode keeps up to nine lines), 4 for the light kernels, whose loads then become vectors of
    ``vec`` elements along the contiguous axis wherever the strides allow (see _vector_width).
    """

    def __init__(self, N: int, C: int, H: int, W: int, halo: int, max_block: int, sms: Optional[int] = None,
                 channels_last: bool = False, per_thread: int = 1, vec: int = 1):
        on_gpu = sms is not None
        if halo and vec > 1 and not channels_last:  # NCHW column tiles start on a vector boundary
            halo = -(-halo // vec) * vec
        self.halo, self.vec, self.channels_last = halo, vec, channels_last
        lanes = (GPU_LANES * per_thread) if on_gpu else INTERPRETER_LANES
        min_block = _next_pow2(2 * halo + 2)
        chans = _next_pow2(C)
        if channels_last and on_gpu:
            self.pb = min(chans, GPU_MAX_PLANES)
            self.block = max(min(_next_pow2(W + 2 * halo), max_block, lanes // self.pb), min_block)
        else:
            self.block = max(min(_next_pow2(W + 2 * halo), max_block), min_block)
            self.pb = max(1, min(chans, lanes // self.block, GPU_MAX_PLANES if on_gpu else chans))
        self.c_blocks = triton.cdiv(C, self.pb)
        self.tiles = triton.cdiv(W, self.block - 2 * halo)
        rows = H
        if on_gpu:
            chunks = min(max(1, math.ceil(4 * sms / (N * self.c_blocks * self.tiles))), max(1, H // 16))
            rows = math.ceil(H / chunks)
        self.rows = max(1, rows)
        self.chunks = triton.cdiv(H, self.rows) if H > 0 else 1
        self.grid = (N * self.c_blocks, self.tiles, self.chunks)
        self.num_warps = max(1, min(8, self.pb * self.block // (32 * per_thread)))

    @classmethod
    def for_tensors(cls, tensors: Sequence[torch.Tensor], halo: int, max_block: int, per_thread: int = 1) -> "_Grid":
        """The layout for a launch over ``tensors`` (all of x's shape; the first one is x)."""
        x = tensors[0]
        N, C, H, W = x.shape
        channels_last = output_format(x) == torch.channels_last
        return cls(N, C, H, W, halo, max_block, _sm_count(x.device), channels_last, per_thread,
                   _vector_width(tensors, channels_last))

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def constexprs(self) -> Dict[str, object]:
        return dict(PB=self.pb, BLOCK=self.block, VEC=self.vec, CL=self.channels_last)


def _vector_width(tensors: Sequence[torch.Tensor], channels_last: bool) -> int:
    """The largest of 4 and 2 that divides every stride but the unit one of every tensor, all
    dense in the same layout (NCHW, or NHWC with channels_last), and the extent of the contiguous
    axis; else 1. The kernels rewrite those as multiples of it, so the compiler can prove aligned
    vector accesses; a wrong answer here would change the numbers, which the interpreter tests
    would see."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not all(t.is_contiguous(memory_format=fmt) for t in tensors):
        return 1
    unit = 1 if channels_last else 3
    strides = [st for t in tensors for d, st in enumerate(t.stride()) if d != unit]
    strides.append(tensors[0].shape[unit])  # the contiguous axis's extent too: the masks' vectors
    return next((v for v in (4, 2) if all(st % v == 0 for st in strides)), 1)


# Lanes per GPU thread: the search-mode kernels hold delay lines for several candidates,
# a fixed 5- or 7-wide window keeps that many shifted rows in flight; the rest is light.
LIGHT_PER_THREAD = 4


def _backward_registers(names: Sequence[str]) -> Optional[int]:
    """The register cap of a backward launch: search mode holds nine delay lines, and left to its
    own heuristic ptxas caps some of those configurations at 128 registers and spills; the
    whole register file is cheaper than local memory there."""
    return 255 if len(names) > 1 else None


def _per_thread(names: Sequence[str]) -> int:
    if len(names) > 1:
        return 1
    return 2 if _radius(names) >= 2 else LIGHT_PER_THREAD


_layout_sms: Optional[int] = None  # set by gpu_layout(): lay launches out as on such a GPU


@functools.lru_cache(maxsize=None)
def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sm_count(device: torch.device) -> Optional[int]:
    if _layout_sms is not None:
        return _layout_sms
    return _device_sms(device) if device.type == "cuda" else None


@contextlib.contextmanager
def gpu_layout(sms: int):
    """Lay every launch out as on a GPU with ``sms`` multiprocessors (row chunks, plane caps,
    column tiles), whatever the device: how the interpreter tests the GPU layouts."""
    global _layout_sms
    previous, _layout_sms = _layout_sms, int(sms)
    try:
        yield
    finally:
        _layout_sms = previous


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(t.stride())



# =============================================================================================
# The strip gates (tiny pointwise convs on the strip means; the adjoints are cuBLAS GEMMs)
# =============================================================================================
GATE_BLOCK = 16  # input channels per GEMM step (tl.dot's smallest tile)
GATE_MAX_OUTPUTS = 64  # output channels per program: each re-reads z, so wide, but 16 × 4 warps


def _gates(z_h_parts: torch.Tensor, z_w_parts: torch.Tensor, weights: Sequence[torch.Tensor], divisors: Tuple[int, int],
           shape: Tuple[int, int, int, int], z_out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """(σ_h, σ_w), (N, C, H) and (N, C, W): both strip gates in one launch, from the strip sums'
    partials (divided by ``divisors`` into means); with ``z_out``, the means are written there."""
    N, C, H, W = shape
    acc = z_h_parts.dtype
    sh = torch.empty((N, C, H), dtype=acc, device=z_h_parts.device)
    sw = torch.empty((N, C, W), dtype=acc, device=z_h_parts.device)
    wh, bh, ww, bw = (t.contiguous() for t in weights)
    zh, zw = z_out if z_out is not None else (sh, sw)
    # maxnreg: left to its own heuristic, ptxas caps the widest configuration at 80 registers and spills.
    outputs = max(GATE_BLOCK, min(GATE_MAX_OUTPUTS, _next_pow2(C)))
    _strip_gate_kernel[(N, 2, triton.cdiv(C, outputs))](
        z_h_parts, z_w_parts, wh, bh, ww, bw, zh, zw, sh, sw,
        C, H, W, z_h_parts.shape[0], z_w_parts.shape[0], divisors[0], divisors[1],
        WRITE_Z=z_out is not None, BO=outputs, BC=GATE_BLOCK, BS=max(16, _next_pow2(max(H, W))),
        ACC=_acc(acc), num_warps=4, maxnreg=128)
    return sh, sw


def _gate_backward(grad_g: torch.Tensor, z: torch.Tensor, weight: torch.Tensor):
    """(grad W, grad b, grad z) of g = W z + b: the weight gradient is one GEMM over K = N·S (not N
    products summed), grad z one batched GEMM with the broadcast transposed weight."""
    N, C, _ = z.shape
    w = weight.reshape(weight.shape[0], -1).to(grad_g.dtype)
    grad_w = torch.mm(grad_g.transpose(0, 1).reshape(w.shape[0], -1), z.transpose(0, 1).reshape(C, -1).t())
    grad_b = grad_g.sum((0, 2))
    grad_z = torch.bmm(w.t().expand(N, -1, -1), grad_g)
    return grad_w.reshape(weight.shape).to(weight.dtype), grad_b.to(weight.dtype), grad_z


def _strip_partials(a: torch.Tensor, b: Optional[torch.Tensor] = None, sh: Optional[torch.Tensor] = None,
                    sw: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partials of (Σ_w q·sw, Σ_h q·sh), (tiles, N·C, H) and (chunks, N·C, W) in the accumulation
    dtype, q = a·b; without b: of the plain row and column sums of a."""
    N, C, H, W = a.shape
    acc = compute_dtype(a.dtype)
    weighted = b is not None
    b = b if weighted else a
    grid = _Grid.for_tensors((a, b), 0, FORWARD_MAX_BLOCK, LIGHT_PER_THREAD)
    rows = torch.empty((grid.tiles, N * C, H), dtype=acc, device=a.device)
    cols = torch.empty((grid.chunks, N * C, W), dtype=acc, device=a.device)
    _strip_reduce_kernel[grid.grid](
        a, b, sh if weighted else rows, sw if weighted else rows, rows, cols,
        C, H, W, *_strides(a), *_strides(b), grid.rows, grid.c_blocks,
        WEIGHTED=weighted, ACC=_acc(a.dtype), **grid.constexprs(), num_warps=grid.num_warps)
    return rows, cols


def _strip_reduce(a: torch.Tensor, b: torch.Tensor, sh: torch.Tensor,
                  sw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ_w q·sw, Σ_h q·sh) as (N, C, H), (N, C, W), q = a·b; one tile (or chunk) writes the sums
    themselves, so no reduction launch for it."""
    N, C, H, W = a.shape
    rows, cols = _strip_partials(a, b, sh, sw)
    rows = rows[0] if rows.shape[0] == 1 else rows.sum(0)
    cols = cols[0] if cols.shape[0] == 1 else cols.sum(0)
    return rows.view(N, C, H), cols.view(N, C, W)


# =============================================================================================
# The op's kernels (same signatures as the schemas in csrc/metapool.cpp)
# =============================================================================================
def _names(candidates: str) -> Tuple[str, ...]:
    return tuple(candidates.split(","))


def forward(
    x: torch.Tensor, pi: Optional[torch.Tensor],
    gate_h_weight: Optional[torch.Tensor], gate_h_bias: Optional[torch.Tensor],
    gate_w_weight: Optional[torch.Tensor], gate_w_bias: Optional[torch.Tensor],
    candidates: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, z_h, z_w): z are the strip means, returned so the backward need not recompute them."""
    names = _names(candidates)
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    has_strip = "strip" in names
    out = torch.empty_like(x, memory_format=output_format(x))
    if x.numel() == 0:
        return out, x.new_zeros((N, C, H if has_strip else 0), dtype=acc), x.new_zeros((N, C, W if has_strip else 0), dtype=acc)
    with _on_device(x):
        if has_strip:
            z_h = torch.empty((N, C, H), dtype=acc, device=x.device)
            z_w = torch.empty((N, C, W), dtype=acc, device=x.device)
            sh, sw = _gates(*_strip_partials(x), (gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias), (W, H),
                            (N, C, H, W), (z_h, z_w))
        else:
            z_h, z_w = x.new_empty((N, C, 0), dtype=acc), x.new_empty((N, C, 0), dtype=acc)
            sh = sw = out  # never read
        R = _radius(names)
        grid = _Grid.for_tensors((x, out), 0, FORWARD_MAX_BLOCK, _per_thread(names))
        _meta_pool_forward_kernel[grid.grid](
            x, x if pi is None else pi, sh, sw, out,
            C, H, W, *_strides(x), *_strides(out), grid.rows, grid.c_blocks,
            **_slots(names), FIXED=pi is None, R=R, ACC=_acc(x.dtype), **grid.constexprs(),
            num_warps=grid.num_warps,
        )
    return out, z_h, z_w


def backward(
    grad: torch.Tensor, x: torch.Tensor, pi: Optional[torch.Tensor],
    gate_h_weight: Optional[torch.Tensor], gate_h_bias: Optional[torch.Tensor],
    gate_w_weight: Optional[torch.Tensor], gate_w_bias: Optional[torch.Tensor],
    z_h: torch.Tensor, z_w: torch.Tensor, candidates: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_pi, grad_gate_h_weight, grad_gate_h_bias, grad_gate_w_weight, grad_gate_w_bias).

    Gate gradients are empty tensors when 'strip' is not a candidate; grad_pi is empty when pi is
    None (a fixed layer).
    """
    names = _names(candidates)
    grad = grad.to(x.dtype)
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    fixed = pi is None
    has_strip = "strip" in names
    grad_x = torch.empty_like(x, memory_format=output_format(x))
    if x.numel() == 0:
        grad_pi = x.new_zeros(0 if fixed else len(names), dtype=acc if fixed else pi.dtype)
        gate_grads = [torch.zeros_like(t) if has_strip else x.new_empty(0)
                      for t in (gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias)]
        return grad_x.zero_(), grad_pi, *gate_grads

    with _on_device(x):
        sh = sw = gzh = gzw = grad_x  # never read without 'strip'
        gate_grads = [x.new_empty(0)] * 4
        if has_strip:
            si = names.index("strip")
            strip_w = None if fixed else pi[si].to(acc)
            sh, sw = _gates(z_h.view(1, N * C, H), z_w.view(1, N * C, W),
                            (gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias), (1, 1), (N, C, H, W))
            row_sum, col_sum = _strip_reduce(grad, x, sh, sw)  # Σ_w grad·x·σ(g_w), Σ_h grad·x·σ(g_h)
            grad_gh = torch.addcmul(sh, sh, sh, value=-1).mul_(row_sum)  # σ'(g) = σ - σ²
            grad_gw = torch.addcmul(sw, sw, sw, value=-1).mul_(col_sum)
            if not fixed:
                grad_gh.mul_(strip_w)
                grad_gw.mul_(strip_w)
            gh_w, gh_b, grad_zh = _gate_backward(grad_gh, z_h, gate_h_weight)
            gw_w, gw_b, grad_zw = _gate_backward(grad_gw, z_w, gate_w_weight)
            gate_grads = [gh_w, gh_b, gw_w, gw_b]
            gzh, gzw = grad_zh.div_(W), grad_zw.div_(H)

        R = _radius(names)
        grid = _Grid.for_tensors((x, grad, grad_x), R, BACKWARD_MAX_BLOCK, _per_thread(names))
        alpha_part = grad_x if fixed else torch.empty((grid.programs, len(names)), dtype=acc, device=x.device)
        _meta_pool_backward_kernel[grid.grid](
            grad, x, x if fixed else pi, grad_x, alpha_part, sh, sw, gzh, gzw,
            C, H, W, *_strides(grad), *_strides(x), *_strides(grad_x),
            grid.rows, grid.c_blocks, grid.tiles, grid.chunks, len(names),
            **_slots(names), FIXED=fixed, R=R, HALO=grid.halo, ACC=_acc(x.dtype),
            **grid.constexprs(), num_warps=grid.num_warps, maxnreg=_backward_registers(names),
        )
        if fixed:
            grad_pi = x.new_empty(0, dtype=acc)
        else:
            grad_pi = alpha_part.sum(0)
            if has_strip:
                grad_pi[si] += torch.dot(row_sum.reshape(-1), sh.reshape(-1))
            grad_pi = grad_pi.to(pi.dtype)
    return grad_x, grad_pi, *gate_grads
