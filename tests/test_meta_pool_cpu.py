"""The C++ CPU kernels of ``metapool::meta_pool`` (csrc/cpu/meta_pool_kernel.cpp) against the
independent float64 implementation of docs/DESIGN.md and the pure-PyTorch reference.

The kernels cut the work into items (channel groups × row chunks) over packed rows: NCHW rows
narrower than 32 pack several channels per row, channels_last rows hold blocks of channels, and
rows are split into chunks when there are few groups. The shapes below sit on either side of those
edges and of the vector widths. Covered: every candidate subset, search and fixed modes, dtypes,
layouts and strided views, N = 0, NaN/±inf and ties through max with PyTorch's semantics, bitwise
determinism across thread counts, gradcheck, opcheck, torch.compile and the argument checks.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import independent as ind
from helpers import PARAM_GRAD_MULT, TOL, X_GRAD_MULT, assert_rel_close, randn, to_layout
from metapool_kernels import PAPER_CANDIDATES, FusedMetaPooling, MetaPooling

GATE_KEYS = ("gate_h.weight", "gate_h.bias", "gate_w.weight", "gate_w.bias")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ("contiguous", "channels_last")
VIEWS = ("noncontiguous", "transposed", "channel_slice")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs at one thread unless it sets its own count."""


def shape_id(shape):
    return "x".join(map(str, shape))


def view_of(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x's values in a layout or strided view (a new tensor or view, detached from x's graph).

    "transposed": NCHW values in (N, C, W, H) storage, transposed back (strides (CHW, HW, 1, H));
    "channel_slice": channels 1..C of a channels_last tensor with one channel more (a view whose
    channel stride is 1 but which is not channels_last-contiguous).
    """
    x = x.detach()
    if kind in ("contiguous", "channels_last", "noncontiguous"):
        return to_layout(x, kind)
    if kind == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "channel_slice":
        n, c, h, w = x.shape
        buf = torch.full((n, c + 1, h, w), float("nan"), dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        view = buf[:, 1:]
        view.copy_(x)
        return view
    raise ValueError(f"unknown view {kind!r}")


def make_params(channels, candidates, seed, dtype):
    """α and the strip gates, float32 as a layer's parameters are (float64 for float64 x).
    Gate weights scale as 1/√C so the gates stay out of saturation at any channel count."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = {"alpha": randn((len(candidates),), seed, pdtype)}
    if "strip" in candidates:
        for i, key in enumerate(GATE_KEYS):
            shape = (channels, channels, 1) if key.endswith("weight") else (channels,)
            params[key] = randn(shape, seed + 1 + i, pdtype, scale=channels ** -0.5 if len(shape) == 3 else 0.5)
    return {k: v.requires_grad_() for k, v in params.items()}


def call_op(x, params, candidates, fixed=None):
    """The op on x: search mode weights the candidates by softmax(α); a fixed op runs alone (pi None)."""
    names = (fixed,) if fixed is not None else tuple(candidates)
    pi = None if fixed is not None else torch.softmax(params["alpha"], 0)
    gates = [params[k] for k in GATE_KEYS] if "strip" in names else [None] * 4
    out, _, _ = torch.ops.metapool.meta_pool(x, pi, *gates, ",".join(names))
    return out


def reference_layer(channels, candidates, params, fixed, dtype):
    """MetaPooling (the pure-PyTorch reference) holding the same parameters."""
    layer = MetaPooling(channels, candidates)
    if dtype == torch.float64:
        layer.double()
    with torch.no_grad():
        for k, p in layer.named_parameters():
            p.copy_(params[k])
    if fixed is not None:
        layer.fix(fixed)
    return layer


def grads_of(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def grad_multiplier(name, dtype):
    """docs/DESIGN.md: grads of x 5×, of α and the gates 20× the output tolerance; float64 is exact
    (1e-12) for every gradient."""
    if dtype == torch.float64:
        return 1
    return X_GRAD_MULT if name == "x" else PARAM_GRAD_MULT


def check(shape, candidates=PAPER_CANDIDATES, fixed=None, dtype=torch.float32, layout="contiguous",
          seed=0, grad_layout=None, against_reference=True):
    """Forward and every gradient of the op on x in ``layout`` against the independent float64
    implementation (at docs/DESIGN.md's tolerances) and MetaPooling in the same dtype (twice those);
    the output and grad x keep x's memory format; x and the incoming grad are left unchanged."""
    C = shape[1]
    x = randn(shape, seed, dtype)
    go = randn(shape, seed + 1, dtype)
    params = make_params(C, candidates, seed + 2, dtype)
    xin = view_of(x, layout).requires_grad_()
    goin = view_of(go, grad_layout or layout)
    keep_x, keep_go = xin.detach().clone(), goin.clone()

    names = list(params)
    out = call_op(xin, params, candidates, fixed)
    got = dict(zip(["x"] + names, grads_of(out, [xin] + [params[k] for k in names], goin)))
    what = f"{shape_id(shape)} {','.join(candidates)} {fixed or 'search'} {dtype} {layout}"

    assert out.dtype == dtype and out.shape == x.shape, what
    cl = layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{what}: output strides {out.stride()}"
    assert got["x"].is_contiguous(memory_format=fmt), f"{what}: grad x strides {got['x'].stride()}"
    assert got["x"].dtype == dtype
    assert torch.equal(xin.detach(), keep_x) and torch.equal(goin, keep_go), f"{what}: an input was written"

    x64 = x.double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ref = ind.meta_pooling(x64, p64, candidates, fixed)
    expected = dict(zip(["x"] + names, grads_of(ref, [x64] + [p64[k] for k in names], go.double())))

    tol = TOL[dtype]
    # α's gradient cancels to ~0 when candidates coincide (tiny planes): hold it to the size of
    # the terms that cancelled.
    scale = 1e-3 * go.double().norm().item() * x.double().norm().item()
    assert_rel_close(out, ref, tol, f"{what}: output")
    for k, g in got.items():
        if expected[k] is None:
            assert g is None or not g.any(), f"{what}: {k} gets a gradient it must not get"
            continue
        assert g is not None, f"{what}: no gradient for {k}"
        mult = grad_multiplier(k, dtype)
        assert_rel_close(g, expected[k], tol * mult, f"{what}: grad {k}", scale if k != "x" else 0.0)

    if against_reference:
        layer = reference_layer(C, candidates, params, fixed, dtype)
        xr = x.clone().requires_grad_()
        r_out = layer(xr)
        r_names = [k for k, p in layer.named_parameters() if p.requires_grad]
        r_grads = dict(zip(["x"] + r_names, grads_of(r_out, [xr] + [dict(layer.named_parameters())[k] for k in r_names],
                                                     go)))
        assert_rel_close(out, r_out, 2 * tol, f"{what}: output vs MetaPooling")
        for k, g in r_grads.items():
            if g is None:
                continue
            mult = grad_multiplier(k, dtype)
            assert_rel_close(got[k], g, 2 * tol * mult, f"{what}: grad {k} vs MetaPooling", scale if k != "x" else 0.0)
    return out, got


# --------------------------------------------------------------------------------------------
# Candidate subsets and modes
# --------------------------------------------------------------------------------------------
def all_subsets():
    """Every non-empty subset of the candidates, each in a shuffled order (the kernels must not
    assume the paper's order)."""
    rng = random.Random(0)
    subsets = []
    for r in range(1, len(PAPER_CANDIDATES) + 1):
        for combo in itertools.combinations(PAPER_CANDIDATES, r):
            combo = list(combo)
            rng.shuffle(combo)
            subsets.append(tuple(combo))
    return subsets


ALL_SUBSETS = all_subsets()
assert len(ALL_SUBSETS) == 255
SAMPLED_SUBSETS = random.Random(1).sample(ALL_SUBSETS, 6)


@pytest.mark.parametrize("candidates", ALL_SUBSETS, ids=",".join)
def test_every_subset(candidates):
    check((1, 2, 5, 6), candidates, seed=ALL_SUBSETS.index(candidates), against_reference=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("candidates", SAMPLED_SUBSETS, ids=",".join)
@pytest.mark.parametrize("shape", [(2, 9, 17, 33), (1, 3, 70, 20)], ids=shape_id)
def test_sampled_subsets(shape, candidates, layout):
    check(shape, candidates, layout=layout, seed=SAMPLED_SUBSETS.index(candidates))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fixed", PAPER_CANDIDATES)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 10, 33, 65)], ids=shape_id)
def test_every_op_fixed(shape, fixed, layout):
    check(shape, PAPER_CANDIDATES, fixed=fixed, layout=layout, seed=3)


WINDOW_OPS = ("avg3", "avg5", "avg7", "max3", "max5", "max7")
FIXED_SHAPES = [
    (1, 3, 1, 1), (2, 2, 2, 3), (1, 2, 5, 6), (1, 3, 9, 7),  # maps narrower than the windows
    (2, 3, 5, 17), (1, 2, 70, 33), (1, 2, 112, 112),  # unit-stride NCHW rows, row chunks
    (2, 9, 6, 11), (2, 33, 4, 40),  # packed NCHW rows; whole channels_last rows
    (1, 300, 7, 7), (1, 20, 5, 112),  # channels_last blocks narrower than C: rows read with stride C
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", FIXED_SHAPES, ids=shape_id)
def test_fixed_window_kernel(shape, layout, dtype):
    """A fixed window layer's own kernel (op and radius compiled in, rows in place, borders apart)
    against ATen's pooling: max bitwise, avg within the dtype's tolerance."""
    x = to_layout(randn(shape, dtype=dtype, seed=sum(shape)), layout)
    for name in WINDOW_OPS:
        k = int(name[-1])
        out = torch.ops.metapool.meta_pool(x, None, None, None, None, None, name)[0]
        if name.startswith("max"):
            assert torch.equal(out, F.max_pool2d(x, k, 1, k // 2)), name
        else:
            ref = F.avg_pool2d(x.double(), k, 1, k // 2, count_include_pad=False)
            assert_rel_close(out.double(), ref, TOL[dtype], name)
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", FIXED_SHAPES + [
    (1, 1, 64, 9), (3, 4, 96, 3),  # row chunks of one plane, chunks across images
    (2, 1030, 2, 1),  # W = 1
], ids=shape_id)
def test_fixed_strip_kernel(shape, layout, dtype):
    """A fixed 'strip' layer's own path (strip sums and the strip term on rows in place, NCHW
    unpacked at every width), forward and every gradient against the reference, on each item
    layout it takes."""
    check(shape, fixed="strip", dtype=dtype, layout=layout, seed=sum(shape))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ("max3", "max5", "max7"))
def test_fixed_max_redoes_rows_with_nan_exactly(name, layout):
    """The fast vector max drops a NaN operand; rows and windows holding NaN or ±inf are redone
    with the NaN-propagating max, so the result is ATen's, NaN positions included."""
    k = int(name[-1])
    x = randn((2, 16, 13, 40), seed=k)
    x[0, 3, 0, 0] = float("nan")  # a corner: border row and column
    x[0, 5, 6, 20] = float("nan")  # the interior
    x[1, 7, 12, 39] = float("nan")
    x[1, 2, 4, :] = float("-inf")
    x[1, 9, 8, 10] = float("inf")
    x = to_layout(x, layout)
    out = torch.ops.metapool.meta_pool(x, None, None, None, None, None, name)[0]
    ref = F.max_pool2d(x, k, 1, k // 2)
    assert ref.isnan().sum() > 0 and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Shapes around vector widths, packing, channel blocks and row chunks
# --------------------------------------------------------------------------------------------
WIDTHS = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]
HEIGHTS = [1, 2, 7, 8, 9, 31, 33, 63, 64, 65]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", WIDTHS)
def test_widths(width, layout):
    check((2, 3, 5, width), layout=layout, seed=width)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("height", HEIGHTS)
def test_heights(height, layout):
    # N = 1 and few channels: from H = 64 on, the rows of a group are split into chunks.
    check((1, 2, height, 6), layout=layout, seed=height)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [
    (2, 1, 6, 11), (2, 7, 6, 11), (2, 8, 6, 11), (2, 9, 6, 11), (2, 33, 6, 11),  # packed NCHW rows
    (2, 7, 4, 40), (2, 9, 4, 40), (2, 33, 4, 40),  # wide rows: 25 channels per channels_last block
    (1, 300, 7, 7),  # 146 channels per block: three blocks, the last partial, in both layouts
    (1, 20, 5, 112),  # 9 channels per channels_last block
    (2, 1030, 2, 1),  # W = 1: 1024 channels per block
], ids=shape_id)
def test_channel_counts(shape, layout):
    check(shape, layout=layout, seed=shape[1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [
    (1, 3, 1, 1), (1, 2, 2, 3),  # planes smaller than every window
    (1, 2, 112, 112),  # three row chunks of 38
    (1, 1, 64, 9),  # packed NCHW, two chunks of 32
    (1, 3, 65, 33),  # two chunks of 33
    (1, 5, 100, 17),  # three chunks of 34
    (3, 4, 96, 3),  # chunks across several images
], ids=shape_id)
def test_plane_sizes_and_row_chunks(shape, layout):
    check(shape, layout=layout, seed=sum(shape))


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 4, 66, 35)], ids=shape_id)
def test_strided_views(shape, view):
    """Views that are neither NCHW- nor channels_last-contiguous (the NaN in a buffer's gaps make a
    kernel that ignores strides fail): the output is contiguous and the numbers the same."""
    check(shape, layout=view, seed=5)


@pytest.mark.parametrize("x_layout,grad_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                                  ("channels_last", "noncontiguous")])
def test_grad_in_another_layout(x_layout, grad_layout):
    check((2, 5, 9, 10), layout=x_layout, grad_layout=grad_layout, seed=6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_op_keeps_format(layout):
    """The backward op's grad x comes in x's memory format (not only after autograd's restriding)."""
    C = 5
    x = view_of(randn((2, C, 6, 7), 1), layout)
    params = make_params(C, PAPER_CANDIDATES, 2, torch.float32)
    pi = torch.softmax(params["alpha"].detach(), 0)
    gates = [params[k].detach() for k in GATE_KEYS]
    cands = ",".join(PAPER_CANDIDATES)
    out, z_h, z_w = torch.ops.metapool.meta_pool(x, pi, *gates, cands)
    gx, *_ = torch.ops.metapool.meta_pool_backward(view_of(randn(x.shape, 3), layout), x, pi, *gates, z_h, z_w, cands)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt), (out.stride(), gx.stride())


# --------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fixed", [None, "skip", "avg7", "max5", "strip"], ids=lambda m: m or "search")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype, fixed, layout):
    check((2, 5, 12, 13), fixed=fixed, dtype=dtype, layout=layout, seed=7)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 70, 40), (1, 150, 5, 9)], ids=shape_id)
def test_dtypes_chunks_and_blocks(shape, dtype, layout):
    check(shape, dtype=dtype, layout=layout, seed=8)


# --------------------------------------------------------------------------------------------
# Empty batch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fixed", [None, "max3", "strip"], ids=lambda m: m or "search")
def test_empty_batch(fixed, layout):
    x = view_of(torch.empty(0, 3, 5, 6), layout).requires_grad_()
    params = make_params(3, PAPER_CANDIDATES, 0, torch.float32)
    out = call_op(x, params, PAPER_CANDIDATES, fixed)
    assert out.shape == x.shape and out.dtype == x.dtype
    names = list(params)
    grads = grads_of(out, [x] + [params[k] for k in names], torch.empty_like(out))
    assert grads[0].shape == x.shape
    for k, g in zip(names, grads[1:]):
        assert g is None or (g.shape == params[k].shape and not g.any()), k


# --------------------------------------------------------------------------------------------
# NaN, ±inf and ties through max: PyTorch's semantics
# --------------------------------------------------------------------------------------------
def integer_grad(shape, seed):
    """Integer-valued gradients: sums of them are exact in any order, so grads compare bitwise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).float()


def max_pool_torch(x, grad_out, names, pi=None):
    """Σ π_k max_pool2d_k(x) and its grad x, by PyTorch's own max_pool2d."""
    xr = x.detach().clone().requires_grad_()
    weights = pi if pi is not None else [1.0] * len(names)
    out = sum(w * F.max_pool2d(xr, int(n[3:]), stride=1, padding=int(n[3:]) // 2) for w, n in zip(weights, names))
    out.backward(grad_out)
    return out.detach(), xr.grad


def max_pool_op(x, grad_out, names, pi=None):
    xk = x.detach().clone().requires_grad_()
    out, _, _ = torch.ops.metapool.meta_pool(xk, pi, None, None, None, None, ",".join(names))
    out.backward(grad_out)
    return out.detach(), xk.grad


def special_values(shape, seed):
    """Random values with a NaN plane, scattered NaN, +inf and -inf, and a -inf block wider than
    a 7×7 window (so some windows hold nothing but -inf)."""
    x = randn(shape, seed)
    n, c, h, w = shape
    x[0, 0] = float("nan")
    x[-1, -1, 1, 2] = float("nan")
    x[-1, -1, h - 1, w - 1] = float("nan")
    x[-1, 1, 1:10, 1:10] = float("-inf")
    x[0, 2, 2, 3] = float("inf")
    x[0, 2, h - 2, 0] = float("-inf")
    x[-1, 2, 3, 4] = float("inf")
    x[-1, 2, 3, 5] = float("-inf")
    return x


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("names", [("max3",), ("max5",), ("max7",), ("max7", "max3", "max5")], ids=",".join)
@pytest.mark.parametrize("shape", [(2, 3, 12, 13), (1, 3, 70, 40)], ids=shape_id)
def test_nan_and_inf_through_max(shape, names, layout):
    x = special_values(shape, 11)
    go = integer_grad(shape, 12)
    pi = torch.tensor([0.5, 0.25, 0.25]) if len(names) > 1 else None
    out, gx = max_pool_op(view_of(x, layout), view_of(go, layout), names, pi)
    r_out, r_gx = max_pool_torch(x, go, names, pi)
    assert out.isnan().any() and out.isneginf().any() and out.isposinf().any()
    torch.testing.assert_close(out, r_out, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(gx, r_gx, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("names", [("max3",), ("max5",), ("max7",), ("max5", "max7")], ids=",".join)
@pytest.mark.parametrize("shape", [(2, 3, 8, 9), (2, 2, 9, 17), (1, 2, 66, 33)], ids=shape_id)
def test_max_ties_follow_pytorch(shape, names, layout):
    """ReLU features are full of equal values: a tie's gradient goes to the first maximum in
    row-major window order, exactly where max_pool2d's backward sends it."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-2, 3, shape, generator=g).float().relu()
    go = integer_grad(shape, 13)
    pi = torch.tensor([0.5, 0.5]) if len(names) > 1 else None
    out, gx = max_pool_op(view_of(x, layout), view_of(go, layout), names, pi)
    r_out, r_gx = max_pool_torch(x, go, names, pi)
    torch.testing.assert_close(out, r_out, rtol=0, atol=0)
    torch.testing.assert_close(gx, r_gx, rtol=0, atol=0)


def test_nan_in_search_mode():
    """A NaN in x reaches every output its windows (and, through the strip means, its row and
    column) touch, as in the reference."""
    x = randn((1, 3, 9, 10), 14)
    x[0, 1, 4, 5] = float("nan")
    params = make_params(3, PAPER_CANDIDATES, 15, torch.float32)
    out = call_op(x, params, PAPER_CANDIDATES)
    ref = ind.meta_pooling(x, {k: v.detach().double() for k, v in params.items()}, PAPER_CANDIDATES)
    assert out.isnan().any() and not out.isnan().all()
    assert_rel_close(out, ref, TOL[torch.float32], "search with NaN")


# --------------------------------------------------------------------------------------------
# Determinism across thread counts
# --------------------------------------------------------------------------------------------
def run_with_threads(threads, shape, layout, candidates, fixed=None):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = view_of(randn(shape, 20), layout).requires_grad_()
        params = make_params(shape[1], candidates, 21, torch.float32)
        out = call_op(x, params, candidates, fixed)
        used = [x] + [p for k, p in params.items() if fixed is None or (fixed == "strip" and k != "alpha")]
        grads = grads_of(out, used, view_of(randn(shape, 22), layout))
        return [out.detach()] + list(grads)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 4])
def test_extension_runs_parallel_for_on_several_threads(threads):
    # at::parallel_for is inlined into the extension: without OpenMP in its build it runs every
    # task on the calling thread, whatever torch.get_num_threads() says.
    from metapool_kernels._extension import C
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert C.parallel_threads(1) == 1
        assert C.parallel_threads(64) == threads
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("fixed", [None, "max7", "avg3", "strip"], ids=lambda m: m or "search")
@pytest.mark.parametrize("layout,shape", [
    ("contiguous", (2, 24, 36, 33)),  # one item per plane: 48 items
    ("contiguous", (3, 40, 20, 12)),  # packed rows, several channel blocks
    ("contiguous", (1, 2, 112, 112)),  # row chunks
    ("contiguous", (8, 16, 28, 28)),  # a batch of 8: the gate GEMMs split over N·S rows
    ("channels_last", (1, 64, 70, 40)),  # channel blocks × row chunks
    ("channels_last", (4, 20, 9, 56)),
    ("channels_last", (8, 24, 14, 14)),
    ("channels_last", (1, 320, 7, 7)),  # a derived network's last layer at batch 1
], ids=lambda v: v if isinstance(v, str) else shape_id(v))
def test_bitwise_deterministic_across_threads(layout, shape, fixed):
    """Work is cut into items by shape alone and every sum runs in a fixed order inside an item,
    so 1, 2 and 4 threads give the same bits, forward and backward."""
    one = run_with_threads(1, shape, layout, PAPER_CANDIDATES, fixed)
    names = ["out", "grad x"] + ([] if fixed not in (None, "strip") else
                                 (["grad alpha"] if fixed is None else []) + [f"grad {k}" for k in GATE_KEYS])
    for threads in (2, 4):
        other = run_with_threads(threads, shape, layout, PAPER_CANDIDATES, fixed)
        assert len(other) == len(one) == len(names)
        for name, a, b in zip(names, one, other):
            assert torch.equal(a, b), (f"{name} differs between 1 and {threads} threads "
                                       f"(max |diff| {(a - b).abs().max().item():.3e})")


# --------------------------------------------------------------------------------------------
# Autograd, registration, torch.compile
# --------------------------------------------------------------------------------------------
def fused_layer(C, candidates, seed, dtype, fixed=None):
    """A FusedMetaPooling layer with make_params' values, fixed to ``fixed`` if given."""
    layer = FusedMetaPooling(C, candidates, backend="auto").to(dtype)
    params = make_params(C, candidates, seed, dtype)
    with torch.no_grad():
        for k, p in layer.named_parameters():
            p.copy_(params[k])
    if fixed is not None:
        layer.fix(fixed)
    return layer


def gradcheck_layer(shape, candidates, fixed, layout):
    layer = fused_layer(shape[1], candidates, 30, torch.float64, fixed)
    names = [k for k, p in layer.named_parameters() if p.requires_grad and (k != "alpha" or fixed is None)
             and (not k.startswith("gate") or fixed in (None, "strip"))]
    x = view_of(randn(shape, 31, torch.float64), layout).requires_grad_()
    inputs = (x, *[dict(layer.named_parameters())[k].detach().clone().requires_grad_() for k in names])

    def fn(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fixed", [None, "avg5", "max7", "strip"], ids=lambda m: m or "search")
def test_gradcheck_through_layer(fixed, layout):
    gradcheck_layer((2, 3, 5, 6), PAPER_CANDIDATES, fixed, layout)


@pytest.mark.parametrize("fixed", [None, "max3", "strip"], ids=lambda m: m or "search")
def test_autograd_is_one_cpp_node(fixed):
    """The op's autograd is the C++ node of csrc/autograd/ (no Python autograd.Function per call),
    and it gives each input that wants one its gradient, equal to the backward op's."""
    C = 3
    layer = fused_layer(C, PAPER_CANDIDATES, 60, torch.float32, fixed)
    x = randn((2, C, 5, 6), 61).requires_grad_()
    out = layer(x)
    assert "MetaPoolFunction" in out.grad_fn.name()
    go = randn(x.shape, 62)
    wanted = [x] + [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, wanted, go, allow_unused=True)
    # The same gradients from the backward op called directly.
    names = (fixed,) if fixed is not None else PAPER_CANDIDATES
    pi = None if fixed is not None else torch.softmax(layer.alpha.detach(), 0)
    gate_params = list(layer._gates() or ())
    gates = [t.detach() for t in gate_params] if "strip" in names else [None] * 4
    _, z_h, z_w = torch.ops.metapool.meta_pool(x.detach(), pi, *gates, ",".join(names))
    gx, gpi, *g_gates = torch.ops.metapool.meta_pool_backward(go, x.detach(), pi, *gates, z_h, z_w,
                                                              ",".join(names))
    assert torch.equal(got[0], gx)
    by_param = dict(zip(wanted[1:], got[1:]))
    if fixed is None:
        jac = torch.diag(pi) - torch.outer(pi, pi)  # d softmax / d alpha
        assert_rel_close(by_param[layer.alpha], jac @ gpi, 1e-6, "alpha")
    for param, g in zip(gate_params, g_gates):
        if param in by_param:
            expected = g.reshape(param.shape) if "strip" in names else None
            assert (by_param[param] is None) == (expected is None)
            if expected is not None:
                assert torch.equal(by_param[param], expected)
    # Parameters alone (a frozen input): the input gets nothing, the rest the same gradients.
    used = [(p, g) for p, g in by_param.items() if g is not None]
    if used:
        again = torch.autograd.grad(layer(x.detach()), [p for p, _ in used], go)
        for a, (_, b) in zip(again, used):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("candidates,fixed", [(PAPER_CANDIDATES, None), (("avg3", "max5", "strip"), "strip"),
                                              (("max7",), "max7")], ids=["search", "strip", "max7"])
def test_opcheck(candidates, fixed, layout):
    C = 3
    names = (fixed,) if fixed is not None else candidates
    x = view_of(randn((2, C, 5, 6), 40), layout).requires_grad_()
    params = make_params(C, candidates, 41, torch.float32)
    pi = None if fixed is not None else torch.softmax(params["alpha"].detach(), 0).requires_grad_()
    gates = [params[k] for k in GATE_KEYS] if "strip" in names else [None] * 4
    args = (x, pi, *gates, ",".join(names))
    torch.library.opcheck(torch.ops.metapool.meta_pool.default, args)
    out, z_h, z_w = torch.ops.metapool.meta_pool(*args)
    detached = [t.detach() if t is not None else None for t in (x, pi, *gates)]
    torch.library.opcheck(torch.ops.metapool.meta_pool_backward.default,
                          (view_of(randn(x.shape, 42), layout), *detached, z_h.detach(), z_w.detach(), ",".join(names)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph(layout):
    """A model using the layer compiles without graph breaks and gives the eager numbers and grads."""
    torch._dynamo.reset()
    layer = FusedMetaPooling(4, backend="auto")
    params = make_params(4, PAPER_CANDIDATES, 50, torch.float32)
    with torch.no_grad():
        for k, p in layer.named_parameters():
            p.copy_(params[k])
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), layer)
    x = view_of(randn((2, 2, 7, 9), 51), layout)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input at the op level
# --------------------------------------------------------------------------------------------
def _gates(C):
    return [torch.zeros(C, C, 1), torch.zeros(C), torch.zeros(C, C, 1), torch.zeros(C)]


@pytest.mark.parametrize("args,match", [
    (lambda x: (x, torch.ones(1), None, None, None, None, "avg9"), r"unknown candidate op 'avg9'"),
    (lambda x: (x, torch.ones(2) / 2, None, None, None, None, "max3,avg3,max3"), r"'max3' appears twice"),
    (lambda x: (x, torch.ones(2) / 2, None, None, None, None, ""), r"candidates must name at least one op"),
    (lambda x: (x, torch.ones(3), None, None, None, None, "avg3,max3"), r"pi must have shape \(2,\)"),
    (lambda x: (x, torch.ones(1, 2), None, None, None, None, "avg3,max3"), r"pi must have shape \(2,\)"),
    (lambda x: (x, None, None, None, None, None, "avg3,max3"), r"pi is required with several candidates"),
    (lambda x: (x, None, None, None, None, None, "strip"), r"'strip' candidate needs gate_h_weight"),
    (lambda x: (x, None, *_gates(2)[:3], None, "strip"), r"'strip' candidate needs gate_w_bias"),
    (lambda x: (x, None, torch.zeros(2, 3, 1), *_gates(2)[1:], "strip"), r"gate_h_weight must have shape \[2, 2, 1\]"),
    (lambda x: (x, None, *_gates(2)[:3], torch.zeros(3), "strip"), r"gate_w_bias must have shape \[2\]"),
    (lambda x: (x.int(), None, None, None, None, None, "avg3"), r"x must be a real floating-point tensor"),
    (lambda x: (x, torch.ones(1, dtype=torch.int64), None, None, None, None, "avg3"), r"pi must be a real floating"),
    (lambda x: (x[0], None, None, None, None, None, "avg3"), r"x must be 4-D"),
], ids=["unknown", "duplicate", "empty", "pi-length", "pi-2d", "pi-missing", "gates-missing", "gate-missing",
        "gate-shape", "bias-shape", "int-x", "int-pi", "3d-x"])
def test_bad_arguments(args, match):
    x = randn((1, 2, 4, 5), 60)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.metapool.meta_pool(*args(x))


def test_bad_backward_grad():
    x = randn((1, 2, 4, 5), 61)
    out, z_h, z_w = torch.ops.metapool.meta_pool(x, None, None, None, None, None, "avg3")
    with pytest.raises(RuntimeError, match=r"grad must be a floating-point tensor of x.s shape"):
        torch.ops.metapool.meta_pool_backward(torch.zeros(1, 2, 4, 4), x, None, None, None, None, None, z_h, z_w, "avg3")

