"""The fused Triton Meta-Pooling kernels (metapool_kernels/ops/meta_pool.py) against the
independent float64 implementation of docs/DESIGN.md: forward, every gradient, every candidate subset,
search and fixed modes, tiling edge cases, dtypes, layouts, NaN, ties, determinism, gradcheck,
opcheck and torch.compile.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py when
there is no GPU); on CUDA compiled. The interpreter pays per operation, so shapes stay small
except for the few cases that exist to stress tiling.
"""
from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch
import torch.nn.functional as F

import independent
from helpers import PARAM_GRAD_MULT, TOL, X_GRAD_MULT, assert_rel_close, randn, to_layout
from metapool_kernels import PAPER_CANDIDATES, FusedMetaPooling, MetaPooling
from metapool_kernels.ops.layout import output_format

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def triton_kernels(device):
    """The op's Triton kernels on ``device``: compiled on CUDA, the interpreter's on CPU tensors."""
    from metapool_kernels.ops.meta_pool import triton_on_cpu
    return triton_on_cpu() if device == "cpu" else contextlib.nullcontext()


def make_layer(channels, candidates, device, seed, fixed=None):
    layer = FusedMetaPooling(channels, candidates, backend="triton")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.alpha.copy_(torch.randn(len(candidates), generator=g))
        for p in layer.parameters():
            if p is not layer.alpha:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if fixed is not None:
        layer.fix(fixed)
    return layer.to(device)


def run_and_check(shape, candidates, device, dtype=torch.float32, fixed=None, seed=0, layout="contiguous"):
    """Forward + backward through the Triton path vs the independent float64 reference."""
    layer = make_layer(shape[1], candidates, device, seed, fixed)
    if dtype == torch.float64:  # float64 parameters too, so every gradient can be held to 1e-12
        layer.double()
    x = randn(shape, seed + 1, dtype, device)
    grad_out = randn(shape, seed + 2, dtype, device)
    xin = to_layout(x, layout).requires_grad_()
    out = layer(xin)
    out.backward(grad_out)

    params = {k: v.detach().cpu().double().requires_grad_() for k, v in layer.named_parameters()}
    x64 = x.detach().cpu().double().requires_grad_()
    ref = independent.meta_pooling(x64, params, candidates, fixed)
    ref.backward(grad_out.cpu().double())

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    assert_rel_close(out, ref, tol, "out")
    assert_rel_close(xin.grad, x64.grad, X_GRAD_MULT * tol, "grad x")
    # On tiny planes several candidates coincide and α's gradient cancels to ~0: hold it to the
    # size of the terms that cancelled.
    scale = 1e-3 * grad_out.double().norm().item() * x.double().norm().item()
    if fixed is None and len(candidates) > 1:
        assert_rel_close(layer.alpha.grad, params["alpha"].grad, PARAM_GRAD_MULT * tol, "grad alpha", scale=scale)
    if "strip" in candidates and fixed in (None, "strip"):
        for name in ("gate_h.weight", "gate_h.bias", "gate_w.weight", "gate_w.bias"):
            got = dict(layer.named_parameters())[name].grad
            assert_rel_close(got, params[name].grad, PARAM_GRAD_MULT * tol, f"grad {name}", scale=scale)
    return layer, out, xin.grad


# --------------------------------------------------------------------------------------------
# Shapes, subsets and modes
# --------------------------------------------------------------------------------------------
SHAPES = [
    (2, 3, 9, 11),  # general
    (1, 2, 1, 1),  # 1×1 plane: every window is the element itself
    (1, 2, 2, 3),
    (1, 2, 5, 4),  # H and W smaller than 7
    (1, 1, 3, 13),  # non-square, wide
    (1, 1, 13, 2),  # non-square, tall
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_search_all_candidates(device, shape):
    run_and_check(shape, PAPER_CANDIDATES, device)


# Column tiles: the backward covers BLOCK - 6 = 122 output columns per program at most, the
# forward 256; rows are visited in one sweep per program. These shapes cross those boundaries.
TILING = [
    ((1, 1, 4, 123), ("max7", "avg7", "strip", "skip")),
    ((1, 1, 2, 257), ("avg3", "max5", "strip")),
    ((1, 1, 56, 56), ("max3", "avg5", "strip")),
    ((1, 1, 112, 112), ("max7", "avg3")),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape,candidates", TILING, ids=lambda v: "x".join(map(str, v)) if isinstance(v[0], int) else "-".join(v))
def test_tiling_edges(device, shape, candidates):
    run_and_check(shape, candidates, device)


def _subsets(n, seed=7):
    rng = random.Random(seed)
    out = []
    for size in (2, 3, 5, 6):
        names = rng.sample(PAPER_CANDIDATES, size)  # random order too: the kernels must not assume it
        out.append(tuple(names))
    return out


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("candidates", _subsets(4), ids="-".join)
def test_candidate_subsets(device, candidates):
    run_and_check((1, 2, 6, 7), candidates, device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", PAPER_CANDIDATES)
def test_single_candidate(device, name):
    run_and_check((1, 2, 5, 6), (name,), device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fixed", PAPER_CANDIDATES)
def test_fixed_layer(device, fixed):
    run_and_check((2, 2, 6, 5), PAPER_CANDIDATES, device, fixed=fixed)


@pytest.mark.parametrize("fixed", PAPER_CANDIDATES)
def test_fixed_layer_launches_only_its_op(monkeypatch, fixed):
    """A fixed layer runs a kernel specialised to its op alone (nothing at all for skip)."""
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs the interpreter or a GPU")
    from metapool_kernels.ops import meta_pool_triton as mpt
    seen = []
    real = mpt._slots
    monkeypatch.setattr(mpt, "_slots", lambda names: seen.append(tuple(names)) or real(names))
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    layer = make_layer(2, PAPER_CANDIDATES, device, 0, fixed)
    x = randn((1, 2, 4, 5), 1, device=device).requires_grad_()
    out = layer(x)
    out.sum().backward()
    if fixed == "skip":
        assert seen == [] and out is x
    else:
        assert seen and all(names == (fixed,) for names in seen)


# --------------------------------------------------------------------------------------------
# Dtypes and layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fixed", [None, "max5", "strip"])
def test_float16(device, fixed):
    run_and_check((1, 2, 6, 7), PAPER_CANDIDATES, device, dtype=torch.float16, fixed=fixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter has no bfloat16; checked by the AOT compile test")
@pytest.mark.parametrize("fixed", [None, "avg7", "max7", "strip"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (2, 24, 56, 56)])
def test_bfloat16_cuda(fixed, shape):
    run_and_check(shape, PAPER_CANDIDATES, "cuda", dtype=torch.bfloat16, fixed=fixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 24, 56, 56), (2, 96, 14, 14), (2, 320, 7, 7), (1, 16, 112, 112)])
def test_mobilenet_shapes_cuda(dtype, shape):
    run_and_check(shape, PAPER_CANDIDATES, "cuda", dtype=dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_layouts_match_contiguous(device, layout):
    """Every layout agrees with the contiguous one: bitwise in the interpreter, which reduces in
    the same order whatever the strides; on a GPU, channels_last compiles another tile (another
    order of the strip sums), so there within docs/DESIGN.md's tolerance."""
    _, out, gx = run_and_check((1, 2, 5, 6), PAPER_CANDIDATES, device, layout=layout)
    _, out_c, gx_c = run_and_check((1, 2, 5, 6), PAPER_CANDIDATES, device)
    if device == "cpu":
        torch.testing.assert_close(out, out_c, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_c, rtol=0, atol=0)
    else:
        assert_rel_close(out, out_c, TOL[torch.float32], f"{layout} out")
        assert_rel_close(gx, gx_c, TOL[torch.float32] * X_GRAD_MULT, f"{layout} grad x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixed", [None, "avg5", "max7", "strip"])
@pytest.mark.parametrize("shape", [(2, 24, 56, 56), (2, 32, 28, 28), (1, 96, 14, 14), (2, 160, 7, 7)])
def test_channels_last_vectorised_cuda(dtype, fixed, shape):
    """channels_last with C a multiple of 4: the NHWC launches with 4-wide vector accesses
    (VEC = 4), against the reference, in every tile class a real GPU picks for these planes."""
    from metapool_kernels.ops import meta_pool_triton as mpt
    x = torch.empty(shape, device="cuda").contiguous(memory_format=torch.channels_last)
    assert mpt._Grid.for_tensors((x, x), 0, mpt.FORWARD_MAX_BLOCK).vec == 4
    run_and_check(shape, PAPER_CANDIDATES, "cuda", dtype=dtype, fixed=fixed, layout="channels_last")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_inputs_not_written(device):
    layer = make_layer(2, PAPER_CANDIDATES, device, 0)
    x = randn((1, 2, 5, 6), 3, device=device)
    before = x.clone()
    layer(x.requires_grad_()).sum().backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fixed", [None, "max3", "strip"])
def test_empty_batch(device, fixed):
    layer = make_layer(2, PAPER_CANDIDATES, device, 0, fixed)
    x = torch.empty(0, 2, 5, 5, device=device, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 2, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    if fixed is None:
        assert torch.equal(layer.alpha.grad, torch.zeros_like(layer.alpha))


# --------------------------------------------------------------------------------------------
# NaN, ties, determinism
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["max3", "max5", "max7", "avg5"])
def test_nan_propagates(device, name):
    x = randn((1, 2, 7, 9), 5, device=device)
    x[0, 0, 3, 4] = float("nan")
    x[0, 1, 0, 8] = float("nan")
    out = FusedMetaPooling(2, (name,), backend="triton").to(device)(x)
    ref = independent.local_op(name, x.cpu().double())
    assert out.isnan().any()
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    assert_rel_close(out, ref, TOL[torch.float32], name)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["max3", "max5", "max7"])
def test_max_ties_follow_pytorch(device, name):
    """ReLU features are full of equal values: a tie's gradient goes to the first maximum in
    row-major window order, exactly as max_pool2d's backward sends it."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-2, 3, (2, 2, 8, 9), generator=g).float().relu().to(device)
    grad_out = torch.randn(x.shape, generator=g).to(device)
    xf = x.clone().requires_grad_()
    FusedMetaPooling(2, (name,), backend="triton").to(device)(xf).backward(grad_out)
    xr = x.clone().requires_grad_()
    k = int(name[3:])
    F.max_pool2d(xr, k, stride=1, padding=k // 2).backward(grad_out)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic(device):
    outs = []
    for _ in range(2):
        layer = make_layer(3, PAPER_CANDIDATES, device, 4)
        x = randn((2, 3, 9, 10), 6, device=device).requires_grad_()
        out = layer(x)
        out.backward(randn(out.shape, 7, device=device))
        outs.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Autograd, custom-op registration, torch.compile
# --------------------------------------------------------------------------------------------
def _gradcheck_inputs(shape, candidates, device):
    from metapool_kernels.ops.meta_pool import meta_pool
    g = torch.Generator().manual_seed(3)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    alpha = torch.randn(len(candidates), generator=g, dtype=torch.float64).to(device).requires_grad_()
    gates = [torch.randn(s, generator=g, dtype=torch.float64).mul(0.5).to(device).requires_grad_()
             for s in ((C, C, 1), (C,), (C, C, 1), (C,))]
    return meta_pool, x, alpha, gates


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_gradcheck_search(device):
    meta_pool, x, alpha, gates = _gradcheck_inputs((1, 2, 4, 5), PAPER_CANDIDATES, device)
    with triton_kernels(device):
        assert torch.autograd.gradcheck(lambda x, a, *g: meta_pool(x, a, PAPER_CANDIDATES, g),
                                        (x, alpha, *gates), fast_mode=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fixed", ["avg5", "max7", "strip"])
def test_gradcheck_fixed(device, fixed):
    meta_pool, x, _, gates = _gradcheck_inputs((1, 2, 5, 6), (fixed,), device)
    if fixed == "strip":
        fn, inputs = (lambda x, *g: meta_pool(x, None, (fixed,), g)), (x, *gates)
    else:
        fn, inputs = (lambda x: meta_pool(x, None, (fixed,))), (x,)
    with triton_kernels(device):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_opcheck(device):
    import metapool_kernels.ops.meta_pool  # noqa: F401  (registers the ops)
    C = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, C, 3, 4, generator=g).to(device).requires_grad_()
    pi = torch.softmax(torch.randn(3, generator=g), 0).to(device).requires_grad_()
    gates = [torch.randn(s, generator=g).to(device).requires_grad_() for s in ((C, C, 1), (C,), (C, C, 1), (C,))]
    with triton_kernels(device):
        for xin in (x, x.detach().to(memory_format=torch.channels_last).requires_grad_()):
            torch.library.opcheck(torch.ops.metapool.meta_pool.default, (xin, pi, *gates, "skip,max3,strip"))
            out, z_h, z_w = torch.ops.metapool.meta_pool(xin, pi, *gates, "skip,max3,strip")
            torch.library.opcheck(torch.ops.metapool.meta_pool_backward.default,
                                  (torch.randn_like(out), xin.detach(), pi.detach(), *[t.detach() for t in gates],
                                   z_h, z_w, "skip,max3,strip"))
        torch.library.opcheck(torch.ops.metapool.meta_pool.default, (x, None, None, None, None, None, "max5"))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_torch_compile_fullgraph(device):
    """A model using the layer compiles without graph breaks and gives the eager numbers. The
    layer calls the op (backend "auto"); on CPU tensors triton_on_cpu() makes the op's kernels
    the Triton ones, so the Triton path is what is compiled and run."""
    torch._dynamo.reset()
    layer = make_layer(3, PAPER_CANDIDATES, device, 2)
    layer.backend = "auto"
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), layer).to(device)
    x = randn((1, 2, 5, 6), 8, device=device)
    backend = "inductor" if device == "cuda" else "aot_eager"
    with triton_kernels(device):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = compiled(x)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
        out.sum().backward()
    assert model[1].alpha.grad is not None and model[0].weight.grad is not None


def test_bad_arguments():
    from metapool_kernels.ops.meta_pool import meta_pool
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="alpha must have shape"):
        meta_pool(x, torch.zeros(3), PAPER_CANDIDATES)
    with pytest.raises(ValueError, match="alpha is required"):
        meta_pool(x, None, ("avg3", "max3"))
    with pytest.raises(ValueError, match="needs gates"):
        meta_pool(x, torch.zeros(1), ("strip",))
    with pytest.raises(ValueError, match="gate_h.weight must have shape"):
        meta_pool(x, torch.zeros(1), ("strip",), (torch.zeros(3, 3, 1), torch.zeros(2), torch.zeros(2, 2, 1), torch.zeros(2)))
    with pytest.raises(ValueError, match="unknown candidate"):
        meta_pool(x, torch.zeros(1), ("avg9",))
    with pytest.raises(TypeError, match="floating-point"):
        meta_pool(torch.ones(1, 2, 4, 4, dtype=torch.int32), None, ("avg3",))
    with pytest.raises(ValueError, match="4-D"):
        meta_pool(torch.randn(2, 4, 4), None, ("avg3",))


def test_state_dict_interchangeable_with_reference():
    ref = MetaPooling(3)
    fused = FusedMetaPooling(3, backend="triton")
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict())


# --------------------------------------------------------------------------------------------
# float64: exact on the Triton path too
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fixed,layout", [(None, "contiguous"), (None, "channels_last"), ("avg7", "contiguous"),
                                          ("max5", "noncontiguous"), ("strip", "contiguous")])
def test_float64_exact(device, fixed, layout):
    """float64 in, float64 accumulation: held to 1e-12 (window counts, weights and the strip term
    all in float64)."""
    run_and_check((1, 2, 6, 7), PAPER_CANDIDATES, device, dtype=torch.float64, fixed=fixed, layout=layout)


# --------------------------------------------------------------------------------------------
# NaN in the max backward: max_pool2d's order
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["max3", "max5", "max7"])
def test_max_backward_nan_and_inf_follow_pytorch(device, name):
    """max_pool2d scans a window row by row and lets a value take over when it is larger or NaN:
    a window holding NaNs sends its gradient to the last NaN in row-major order, an all -inf
    window to its first element. Several NaNs per window, in one row, one column, and apart."""
    x = randn((1, 2, 9, 10), 21)
    nan = float("nan")
    x[0, 0, 2, 3] = x[0, 0, 2, 5] = nan  # same row
    x[0, 0, 5, 3] = x[0, 0, 7, 3] = nan  # same column
    x[0, 1, 1, 1] = x[0, 1, 3, 4] = x[0, 1, 8, 9] = nan  # apart
    x[0, 1, 5:9, 0:4] = float("-inf")
    x = x.to(device)
    grad_out = randn(x.shape, 22, device=device)
    xf = x.clone().requires_grad_()
    out = FusedMetaPooling(2, (name,), backend="triton").to(device)(xf)
    out.backward(grad_out)
    xr = x.cpu().clone().requires_grad_()
    k = int(name[3:])
    ref = F.max_pool2d(xr, k, stride=1, padding=k // 2)
    ref.backward(grad_out.cpu())
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(xf.grad.cpu(), xr.grad, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The GPU launch layouts, run through the interpreter
# --------------------------------------------------------------------------------------------
GPU_LAYOUTS = [
    # (SMs, shape, layout, candidates, what the layout must exercise)
    (132, (1, 3, 33, 12), "contiguous", ("avg5", "max3", "strip", "skip"), {"chunks", "vec"}),
    (8, (1, 16, 7, 7), "contiguous", ("max7", "avg3", "strip"), {"c_blocks"}),
    (8, (1, 10, 32, 40), "channels_last", ("max7", "avg3", "strip", "skip"), {"chunks", "c_blocks", "tiles", "vec"}),
    (8, (1, 8, 32, 24), "contiguous", ("max7",), {"chunks", "vec"}),  # a fixed layer: 4 lanes per thread
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("sms,shape,layout,candidates,splits", GPU_LAYOUTS,
                         ids=[f"sm{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}-{len(c[3])}" for c in GPU_LAYOUTS])
def test_gpu_launch_layouts(device, sms, shape, layout, candidates, splits):
    """Row chunks, channel blocks (the 8-plane cap), column tiles and vector widths as the
    launchers lay them out for a GPU with ``sms`` multiprocessors, forward and backward, against
    the reference."""
    from metapool_kernels.ops import meta_pool_triton as mpt
    x = to_layout(torch.empty(shape), layout)
    R = mpt._radius(candidates)
    per_thread = mpt._per_thread(candidates)
    with mpt.gpu_layout(sms):
        grids = [mpt._Grid.for_tensors((x,), 0, mpt.FORWARD_MAX_BLOCK, per_thread),
                 mpt._Grid.for_tensors((x,), R, mpt.BACKWARD_MAX_BLOCK, per_thread)]
    for grid in grids:
        assert grid.pb <= mpt.GPU_MAX_PLANES and grid.pb * grid.block <= mpt.GPU_LANES * per_thread
        assert grid.num_warps * 32 * per_thread == grid.pb * grid.block or grid.num_warps in (1, 8)
    backward_grid = grids[1]
    assert backward_grid.halo >= R and (backward_grid.channels_last or backward_grid.halo % backward_grid.vec == 0)
    for split in splits:  # the case exists to exercise these: fail if it no longer does
        assert getattr(backward_grid, split) > 1, f"{split} = 1: the case no longer tests it"
    with mpt.gpu_layout(sms):
        run_and_check(shape, candidates, device, layout=layout)


# --------------------------------------------------------------------------------------------
# CUDA hot paths without a GPU: no host sync, copy or data-dependent shape; every launch under
# its tensors' device; no copy of x in either layout. The launchers run on fake CUDA tensors
# (FakeTensorMode) with the kernels replaced by recorders.
# --------------------------------------------------------------------------------------------
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

aten = torch.ops.aten
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.unique_consecutive.default, aten._unique2.default, aten.item.default}
FACTORY_OPS = {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
               "full_like", "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided", "clone"}


class HostTraffic(TorchDispatchMode):
    """Flags every op that would copy between host and device or read a device value on the
    host, and records the sizes of the tensors the ops allocate."""

    def __init__(self):
        super().__init__()
        self.problems, self.allocations = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in SYNCING_OPS:
            self.problems.append(f"{func}: reads a device value on the host")
        if name in ("lift_fresh", "lift_fresh_copy"):
            self.problems.append(f"{func}: a tensor built from host data")
        if any(t.is_cuda for t in ins) and any(t.device.type == "cpu" and t.dim() > 0 for t in ins):
            self.problems.append(f"{func}: mixes host and device tensors {[str(t.device) for t in ins]}")
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in ("_to_copy", "copy_", "to") and {t.device for t in ins + outs} != {outs[0].device}:
            self.problems.append(f"{func}: copies between devices")
        if name in FACTORY_OPS or name == "_to_copy":
            self.allocations += [(name, t.numel()) for t in outs]
        return out


class LaunchRecorder:
    """Stands in for a Triton kernel: records each launch and the guarded device it ran under."""

    def __init__(self, name, launches, guard):
        self.name, self.launches, self.guard = name, launches, guard

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.launches.append((self.name, self.guard[-1] if self.guard else None, {t.device for t in tensors}))
        return launch


@pytest.fixture
def fake_cuda_launches(monkeypatch):
    from metapool_kernels.ops import meta_pool_triton as mpt
    launches, guard = [], []

    @contextlib.contextmanager
    def on_device(t):
        guard.append(t.device)
        try:
            yield
        finally:
            guard.pop()

    monkeypatch.setattr(mpt, "_on_device", on_device)
    for kernel in ("_meta_pool_forward_kernel", "_meta_pool_backward_kernel", "_strip_reduce_kernel", "_strip_gate_kernel"):
        monkeypatch.setattr(mpt, kernel, LaunchRecorder(kernel, launches, guard))
    return mpt, launches


def _fake_args(mode, shape, names, device, channels_last=False):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    pi = torch.softmax(torch.randn(len(names), generator=g), 0)
    gates = [torch.randn(s, generator=g) for s in ((C, C, 1), (C,), (C, C, 1), (C,))]
    with mode:  # leave FakeTensorMode's conversions out of the recorded ops
        return [mode.from_tensor(t).to(device) for t in (x, pi, *gates)]


@pytest.mark.parametrize("names,fixed,channels_last", [
    (PAPER_CANDIDATES, False, False), (PAPER_CANDIDATES, False, True), (("max5",), True, False), (("strip",), True, True),
])
def test_cuda_hot_path_has_no_host_traffic(fake_cuda_launches, names, fixed, channels_last):
    """forward and backward on CUDA tensors of a second device: no host↔device copy, sync or
    data-dependent shape; every launch under its tensors' device; the only tensors of x's size
    allocated are the outputs (no copy of x, channels_last or not)."""
    mpt, launches = fake_cuda_launches
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    shape = (2, 8, 14, 14)
    x, pi, *gates = _fake_args(mode, shape, names, "cuda:1", channels_last)
    candidates = ",".join(names)
    traffic = HostTraffic()
    with mode, traffic, mpt.gpu_layout(132):
        out, z_h, z_w = mpt.forward(x, None if fixed else pi, *gates, candidates)
        grads = mpt.backward(torch.ones_like(out), x, None if fixed else pi, *gates, z_h, z_w, candidates)
    assert traffic.problems == []
    assert launches and all(dev == torch.device("cuda:1") and devs == {dev} for _, dev, devs in launches), launches
    assert {name for name, _, _ in launches} >= {"_meta_pool_forward_kernel", "_meta_pool_backward_kernel"}
    x_sized = [a for a in traffic.allocations if a[1] == x.numel()]
    assert len(x_sized) == 3, x_sized  # out, the backward's ones_like, grad_x
    expected_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format) and grads[0].is_contiguous(memory_format=expected_format)


def test_host_traffic_check_can_fail(fake_cuda_launches):
    """The check above catches the pattern it exists for: π scattered with a host index list."""
    mode = FakeTensorMode()
    _, pi, *_ = _fake_args(mode, (1, 2, 4, 4), ("avg3", "max3"), "cuda:1")
    traffic = HostTraffic()
    with mode, traffic:
        w = torch.zeros(8, dtype=pi.dtype, device=pi.device)
        w[[1, 4]] = pi[[0, 1]]
    assert traffic.problems


def test_layer_forward_has_no_host_traffic():
    """A whole searchable layer's forward on CUDA tensors (the op's fake kernel stands in for the
    device's): the softmax of α, the gate parameters and the op call add no host traffic. (Its
    backward is the backward op alone; the autograd engine needs a real GPU to run on CUDA tensors.)"""
    mode = FakeTensorMode()
    with mode, torch.device("cuda:1"):
        layer = FusedMetaPooling(4)
        x = torch.empty(2, 4, 8, 8).requires_grad_()
    traffic = HostTraffic()
    with mode, traffic:
        out = layer(x)
    assert traffic.problems == []
    assert out.device == torch.device("cuda:1") and out.requires_grad


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("fixed", [None, "max7"])
def test_cuda_step_syncs_never(fixed):
    """A layer step with torch's sync debug mode set to error: any synchronising call raises."""
    layer = make_layer(16, PAPER_CANDIDATES, "cuda", 0, fixed)
    x = randn((4, 16, 28, 28), 1, device="cuda").requires_grad_()
    layer(x).sum().backward()  # warm-up: compiles the kernels, caches the SM count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_capture(channels_last):
    """Forward and backward of a searchable layer replay from a captured CUDA graph with the
    eager numbers."""
    layer = make_layer(8, PAPER_CANDIDATES, "cuda", 0)
    x = randn((2, 8, 14, 14), 1, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = randn(x.shape, 2, device="cuda")

    def step():
        layer.zero_grad(set_to_none=False)
        x.grad = None
        out = layer(x)
        out.backward(grad_out)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            eager = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    eager_alpha = layer.alpha.grad.clone()
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        out = layer(x)
        out.backward(grad_out)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(layer.alpha.grad, eager_alpha)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    """Tensors on cuda:1 while cuda:0 is current: every launch runs on cuda:1."""
    torch.cuda.set_device(0)
    run_and_check((2, 8, 14, 14), PAPER_CANDIDATES, "cuda:1")
    run_and_check((2, 8, 14, 14), PAPER_CANDIDATES, "cuda:1", fixed="max5", layout="channels_last")


# --------------------------------------------------------------------------------------------
# The Triton kernels and the C++ CPU kernels agree
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 for the Triton kernels")
@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("metapool::meta_pool", "CPU"),
                    reason="no C++ CPU kernel for metapool::meta_pool in this build")
@pytest.mark.parametrize("dtype,fixed,layout", [(torch.float32, None, "contiguous"), (torch.float64, None, "channels_last"),
                                                (torch.float32, "max7", "channels_last"), (torch.float64, "avg5", "contiguous")])
def test_triton_and_cpp_kernels_agree(dtype, fixed, layout):
    """The same op call on CPU tensors through the C++ kernels and through the Triton ones: same
    outputs and gradients (NaN placement, max ties and memory format included)."""
    x = torch.randint(-2, 3, (2, 3, 7, 9), generator=torch.Generator().manual_seed(5)).to(dtype).relu()
    x = x + 0.25 * randn(x.shape, 6, dtype)
    x[0, 1, 3, 4] = float("nan")
    x = to_layout(x, layout)
    grad_out = randn(x.shape, 7, dtype)
    results = []
    for kernels in (contextlib.nullcontext, triton_kernels_cpu):
        layer = make_layer(3, PAPER_CANDIDATES, "cpu", 0, fixed).to(dtype)
        layer.backend = "auto"
        xin = x.clone().requires_grad_()
        with kernels():
            out = layer(xin)
            out.backward(grad_out)
        results.append((out.detach(), xin.grad, [p.grad for p in layer.parameters()]))
    (out_c, gx_c, gp_c), (out_t, gx_t, gp_t) = results
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out_t, out_c, equal_nan=True, **tol)
    assert out_t.is_contiguous(memory_format=output_format(x)) and out_c.is_contiguous(memory_format=output_format(x))
    torch.testing.assert_close(gx_t, gx_c, equal_nan=True, **tol)
    for a, b in zip(gp_t, gp_c):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, equal_nan=True, **tol)


def triton_kernels_cpu():
    return triton_kernels("cpu")
