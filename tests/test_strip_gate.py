"""The C++/CUDA strip-gate op (torch.ops.metapool.strip_gate, through metapool_kernels.ops) against
the independent float64 implementation: forward, every gradient, gradcheck, layouts, empty
input, mixed gate dtypes, determinism, opcheck, torch.compile, bad input and input immutability."""
from __future__ import annotations

import pytest
import torch

import independent as ind
from helpers import DEVICES, PARAM_GRAD_MULT, TOL, X_GRAD_MULT, assert_rel_close, randn, to_layout
from metapool_kernels import ops
from metapool_kernels.ops import strip_gate

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (2, 2, 1, 6), (1, 3, 4, 1), (3, 4, 9, 8)]
# plain: x·σ(g_h)·σ(g_w); base_weight: the mixture's form; the two halves of it on their own.
FORMS = ["plain", "base_weight", "base", "weight"]
X_LIKE = ("x", "base")  # held to the x-gradient tolerance; the gates and weight to the parameter one


def make_args(shape, dtype=torch.float32, form="plain", device="cpu", seed=0, gate_dtype=None,
              weight_shape=()):
    n, c, h, w = shape
    gate_dtype = gate_dtype or dtype
    args = {
        "x": randn(shape, seed, dtype, device),
        "g_h": randn((n, c, h), seed + 1, gate_dtype, device),
        "g_w": randn((n, c, w), seed + 2, gate_dtype, device),
    }
    if form in ("base_weight", "base"):
        args["base"] = randn(shape, seed + 3, dtype, device)
    if form in ("base_weight", "weight"):
        # Parameters (softmax(alpha)) stay float32 whatever x's dtype; float64 for float64.
        wdtype = torch.float64 if dtype == torch.float64 else torch.float32
        args["weight"] = (randn((), seed + 4, wdtype, device).abs() + 0.1).reshape(weight_shape)
    return args


def call(args):
    return strip_gate(args["x"], args["g_h"], args["g_w"], args.get("base"), args.get("weight"))


def independent(args):
    return ind.strip_gate(args["x"], args["g_h"], args["g_w"], args.get("base"), args.get("weight"))


def grads_of(fn, args, grad_out):
    leaves = {k: v.detach().requires_grad_(True) for k, v in args.items()}
    out = fn(leaves)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def grad_tol(name, dtype):
    return TOL[dtype] * (X_GRAD_MULT if name in X_LIKE else PARAM_GRAD_MULT)


# --------------------------------------------------------------------------------------------
# Forward and backward against the independent implementation.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_forward(device, dtype, form, shape):
    args = make_args(shape, dtype, form, device, seed=SHAPES.index(shape))
    out = call(args)
    assert out.dtype == dtype and out.shape == shape and out.device.type == device
    assert out.is_contiguous()
    assert_rel_close(out, independent(args), TOL[dtype], f"strip_gate {form}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_backward(device, dtype, form, shape):
    seed = 10 + SHAPES.index(shape)
    args = make_args(shape, dtype, form, device, seed=seed)
    go = randn(shape, seed + 7, dtype, device)
    out, grads = grads_of(call, args, go)
    ref_args = {k: v.double() for k, v in args.items()}
    ref_out, ref_grads = grads_of(independent, ref_args, go.double())
    assert_rel_close(out, ref_out, TOL[dtype], "output")
    for name, g in grads.items():
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == args[name].dtype and g.shape == args[name].shape, name
        assert_rel_close(g, ref_grads[name], grad_tol(name, dtype), f"grad {name} ({form})")


@pytest.mark.parametrize("weight_shape", [(), (1,), (1, 1)], ids=str)
def test_weight_shapes(weight_shape):
    args = make_args((2, 3, 4, 5), torch.float32, "base_weight", seed=3, weight_shape=weight_shape)
    go = randn((2, 3, 4, 5), 9)
    out, grads = grads_of(call, args, go)
    ref_out, ref_grads = grads_of(independent, {k: v.double() for k, v in args.items()}, go.double())
    assert_rel_close(out, ref_out, TOL[torch.float32], "output")
    assert grads["weight"].shape == weight_shape
    assert_rel_close(grads["weight"], ref_grads["weight"], grad_tol("weight", torch.float32), "grad weight")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_float32_gates_with_low_precision_x(device, dtype):
    shape = (2, 3, 6, 5)
    args = make_args(shape, dtype, "base_weight", device, seed=4, gate_dtype=torch.float32)
    go = randn(shape, 40, dtype, device)
    out, grads = grads_of(call, args, go)
    assert out.dtype == dtype
    ref_out, ref_grads = grads_of(independent, {k: v.double() for k, v in args.items()}, go.double())
    assert_rel_close(out, ref_out, TOL[dtype], "output")
    assert grads["g_h"].dtype == grads["g_w"].dtype == torch.float32
    for name, g in grads.items():
        assert g.dtype == args[name].dtype
        assert_rel_close(g, ref_grads[name], grad_tol(name, dtype), f"grad {name}")


def test_only_requested_grads():
    args = make_args((2, 3, 4, 5), torch.float32, "base_weight", seed=5)
    x = args["x"].requires_grad_(True)
    out = strip_gate(x, args["g_h"], args["g_w"], args["base"], args["weight"])
    (gx,) = torch.autograd.grad(out, x, randn(x.shape, 6))
    assert gx.shape == x.shape
    base = args["base"].detach().requires_grad_(True)
    out = strip_gate(args["x"].detach(), args["g_h"], args["g_w"], base, args["weight"])
    go = randn(x.shape, 7)
    (gb,) = torch.autograd.grad(out, base, go)
    assert torch.equal(gb, go)
    assert "StripGateFunction" in out.grad_fn.name()  # the C++ node of csrc/autograd/


# --------------------------------------------------------------------------------------------
# gradcheck (float64).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 1, 4), (2, 1, 3, 1), (2, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("form", ["plain", "base_weight"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(seed, form, shape):
    args = make_args(shape, torch.float64, form, seed=50 + seed)
    names = list(args)
    inputs = tuple(args[k].requires_grad_(True) for k in names)

    def fn(*tensors):
        return call(dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Layouts, empty input, determinism.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_layouts(device, dtype, layout):
    shape = (2, 4, 5, 6)
    args = make_args(shape, dtype, "base_weight", device, seed=60)
    go = randn(shape, 61, dtype, device)
    out, grads = grads_of(call, args, go)

    def relayout(t):
        return to_layout(t, layout if t.dim() == 4 else "noncontiguous")

    args_l = {k: relayout(v) if v.dim() >= 3 else v for k, v in args.items()}
    assert not args_l["x"].is_contiguous() and not args_l["g_h"].is_contiguous()
    out_l, grads_l = grads_of(call, args_l, relayout(go))
    assert_rel_close(out_l, out, TOL[dtype], f"{layout} output")
    for k in grads:
        assert grads_l[k].shape == grads[k].shape and grads_l[k].dtype == grads[k].dtype, k
        assert_rel_close(grads_l[k], grads[k], grad_tol(k, dtype), f"{layout} grad {k}")
    assert_rel_close(out_l, independent({k: v.double() for k, v in args.items()}), TOL[dtype], "output")


@pytest.mark.parametrize("form", ["plain", "base_weight"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, form):
    args = make_args((0, 3, 4, 5), torch.float32, form, device)
    go = torch.ones((0, 3, 4, 5), device=device)
    out, grads = grads_of(call, args, go)
    assert out.shape == (0, 3, 4, 5)
    for k, g in grads.items():
        assert g.shape == args[k].shape, k
    if "weight" in grads:
        assert grads["weight"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, dtype):
    # 256 planes of 16×16: the CPU kernel's grain is 32768 elements, so this runs on two threads.
    shape = (2, 128, 16, 16)
    args = make_args(shape, dtype, "base_weight", device, seed=70)
    go = randn(shape, 71, dtype, device)
    first = grads_of(call, args, go)
    second = grads_of(call, args, go)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = grads_of(call, args, go)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first[0], single[0])
        for k in first[1]:
            assert torch.equal(first[1][k], single[1][k]), f"{k} depends on the thread count"


# --------------------------------------------------------------------------------------------
# opcheck and torch.compile.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    op = torch.ops.metapool.strip_gate.default
    plain = make_args((2, 3, 4, 5), torch.float32, "plain", device, seed=80)
    full = make_args((2, 3, 4, 5), torch.float32, "base_weight", device, seed=81)
    torch.library.opcheck(op, (plain["x"], plain["g_h"], plain["g_w"]))
    torch.library.opcheck(op, tuple(v.requires_grad_(True) for v in full.values()))
    half = make_args((1, 2, 3, 3), torch.float16, "base_weight", device, seed=82, gate_dtype=torch.float32)
    torch.library.opcheck(op, tuple(half.values()), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    op = torch.ops.metapool.strip_gate_backward.default
    a = make_args((2, 3, 4, 5), torch.float32, "weight", device, seed=83)
    go = randn((2, 3, 4, 5), 84, torch.float32, device)
    torch.library.opcheck(op, (go, a["x"], a["g_h"], a["g_w"], a["weight"]))
    torch.library.opcheck(op, (go, a["x"], a["g_h"], a["g_w"]))


def _compiled_matches_eager(backend, device):
    def f(x, g_h, g_w, base, weight):
        return torch.tanh(strip_gate(x * 2, g_h, g_w, base, weight)).sum(dim=(2, 3))

    args = make_args((2, 3, 5, 6), torch.float32, "base_weight", device, seed=90)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    leaves = [v.detach().requires_grad_(True) for v in args.values()]
    out = compiled(*leaves)
    out.sum().backward()
    got = [t.grad for t in leaves]
    ref_leaves = [v.detach().double().requires_grad_(True) for v in args.values()]

    def f_ref(x, g_h, g_w, base, weight):
        return torch.tanh(ind.strip_gate(x * 2, g_h, g_w, base, weight)).sum(dim=(2, 3))

    ref = f_ref(*ref_leaves)
    ref.sum().backward()
    assert_rel_close(out, ref, TOL[torch.float32], f"{backend} output")
    for name, g, r in zip(args, got, ref_leaves):
        assert_rel_close(g, r.grad, grad_tol(name, torch.float32), f"{backend} grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager(device):
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager", device)


def test_compile_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("inductor", "cpu")


# --------------------------------------------------------------------------------------------
# Bad input, through the Python wrapper and straight into the C++ op.
# --------------------------------------------------------------------------------------------
def _bad(**overrides):
    args = make_args((2, 3, 4, 5), torch.float32, "base_weight", seed=95)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,exc,match", [
    ({"g_h": torch.randn(2, 3, 5)}, ValueError, r"g_h must have shape \(N, C, H\)"),
    ({"g_h": torch.randn(2, 3, 4, 1)}, ValueError, "g_h must have shape"),
    ({"g_w": torch.randn(2, 3, 4)}, ValueError, r"g_w must have shape \(N, C, W\)"),
    ({"g_w": torch.randn(1, 3, 5)}, ValueError, "g_w must have shape"),
    ({"x": torch.randn(3, 4, 5)}, ValueError, "4-D"),
    ({"x": torch.ones(2, 3, 4, 5, dtype=torch.int32)}, TypeError, "x must be a real floating-point"),
    ({"x": torch.randn(2, 3, 4, 5, dtype=torch.complex64)}, TypeError, "x must be a real floating-point"),
    ({"g_h": torch.randn(2, 3, 4, dtype=torch.complex64)}, TypeError, "g_h must be a real floating-point"),
    ({"g_w": torch.ones(2, 3, 5, dtype=torch.int64)}, TypeError, "g_w must be a real floating-point"),
    ({"base": torch.randn(2, 3, 4, 6)}, ValueError, "base must have the shape of x"),
    ({"base": torch.ones(2, 3, 4, 5, dtype=torch.int32)}, TypeError, "base must be a real floating-point"),
    ({"weight": torch.tensor([0.5, 0.5])}, ValueError, "weight must hold one element"),
    ({"weight": torch.tensor(1)}, TypeError, "weight must be a real floating-point"),
    ({"g_h": torch.randn(2, 3, 4, device="meta")}, ValueError, "same device"),
    ({"g_w": torch.randn(2, 3, 5, device="meta")}, ValueError, "same device"),
    ({"base": torch.randn(2, 3, 4, 5, device="meta")}, ValueError, "same device"),
    ({"weight": torch.randn((), device="meta")}, ValueError, "same device"),
], ids=["g_h-H", "g_h-4d", "g_w-W", "g_w-N", "x-3d", "x-int", "x-complex", "g_h-complex", "g_w-int",
        "base-shape", "base-int", "weight-2", "weight-int", "g_h-meta", "g_w-meta", "base-meta", "weight-meta"])
def test_bad_input(overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(_bad(**overrides))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_input_cpu_and_cuda():
    args = _bad()
    args["g_h"] = args["g_h"].cuda()
    with pytest.raises(ValueError, match="same device"):
        call(args)


@pytest.mark.parametrize("overrides,match", [
    ({"g_h": torch.randn(2, 3, 5)}, r"strip_gate: g_h must have shape \(N, C, H\)"),
    ({"g_w": torch.randn(2, 3, 4)}, r"strip_gate: g_w must have shape \(N, C, W\)"),
    ({"x": torch.randn(3, 4, 5)}, "x must be 4-D"),
    ({"x": torch.ones(2, 3, 4, 5, dtype=torch.int32)}, "x must be a real floating-point"),
    ({"g_h": torch.randn(2, 3, 4, dtype=torch.complex64)}, "g_h must be a real floating-point"),
    ({"base": torch.randn(2, 3, 4, 6)}, "base must have the shape of x"),
    ({"weight": torch.tensor([0.5, 0.5])}, "weight must hold one element"),
], ids=["g_h", "g_w", "x-3d", "x-int", "g_h-complex", "base", "weight"])
def test_bad_input_cpp(overrides, match):
    # The C++ op checks on its own too, for callers that bypass the Python wrapper.
    a = _bad(**overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.metapool.strip_gate(a["x"], a["g_h"], a["g_w"], a["base"], a["weight"])


def test_bad_grad_cpp():
    a = _bad()
    with pytest.raises(RuntimeError, match="grad must have the shape of x"):
        torch.ops.metapool.strip_gate_backward(torch.randn(2, 3, 4, 4), a["x"], a["g_h"], a["g_w"], a["weight"])


# --------------------------------------------------------------------------------------------
# The caller's tensors.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_inputs_not_written(device, dtype, layout):
    args = make_args((2, 3, 4, 5), dtype, "base_weight", device, seed=99)
    args = {k: to_layout(v, layout) if v.dim() else v for k, v in args.items()}
    keep = {k: v.clone() for k, v in args.items()}
    go = randn((2, 3, 4, 5), 98, dtype, device)
    go_keep = go.clone()
    leaves = {k: v.requires_grad_(True) for k, v in args.items()}
    out = call(leaves)
    out.backward(go)
    for k, v in leaves.items():
        assert torch.equal(v.detach(), keep[k]), f"{k} was written"
    assert torch.equal(go, go_keep)
    assert out.data_ptr() not in {v.data_ptr() for v in leaves.values()}


def test_ops_namespace():
    assert ops.strip_gate is strip_gate
    assert hasattr(torch.ops.metapool, "strip_gate") and hasattr(torch.ops.metapool, "strip_gate_backward")


# --------------------------------------------------------------------------------------------
# Memory format: a channels_last input keeps its layout (downstream convs and pooling run in it).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_is_kept(device, dtype):
    shape = (3, 5, 6, 7)  # several images: the channels_last backward reduces per image
    args = make_args(shape, dtype, "base_weight", device, seed=90)
    go = randn(shape, 91, dtype, device)
    cl = {k: to_layout(v, "channels_last") if v.dim() == 4 else v for k, v in args.items()}
    out_cl, grads_cl = grads_of(call, cl, to_layout(go, "channels_last"))
    out, grads = grads_of(call, args, go)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert grads_cl["x"].is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out_cl, out, TOL[dtype], "out")
    for k in grads:
        assert_rel_close(grads_cl[k], grads[k], X_GRAD_MULT * TOL[dtype], f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_channels_last(device):
    """The fake kernels must report the real kernels' strides for channels_last inputs too."""
    a = make_args((2, 3, 4, 5), torch.float32, "base_weight", device, seed=92)
    x = to_layout(a["x"], "channels_last")
    base = to_layout(a["base"], "channels_last")
    torch.library.opcheck(torch.ops.metapool.strip_gate.default, (x, a["g_h"], a["g_w"], base, a["weight"]))
    go = to_layout(randn((2, 3, 4, 5), 93, torch.float32, device), "channels_last")
    torch.library.opcheck(torch.ops.metapool.strip_gate_backward.default, (go, x, a["g_h"], a["g_w"], a["weight"]))
