"""The pure-PyTorch reference (metapool_kernels.reference) against the independent float64
implementation of docs/DESIGN.md: candidate ops, the strip enhancer, MetaPooling in search and fixed
modes, its API, and every bad input the design lists."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

import independent as ind
from helpers import (LAYOUTS, PARAM_GRAD_MULT, TOL, X_GRAD_MULT, assert_rel_close, make_generator, randn,
                     to_layout)
from metapool_kernels import reference
from metapool_kernels.reference import PAPER_CANDIDATES, MetaPooling

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 1×1 and 2×3 planes, planes smaller than every window, non-square ones, and one larger than 7.
SHAPES = [(2, 3, 1, 1), (1, 2, 2, 3), (2, 3, 5, 4), (1, 2, 6, 9), (3, 2, 3, 11), (2, 4, 8, 8)]
LOCAL = [c for c in PAPER_CANDIDATES if c != "strip"]


def _random_subsets(count: int, seed: int):
    rng = random.Random(seed)
    out = set()
    while len(out) < count:
        size = rng.randint(2, len(PAPER_CANDIDATES) - 1)
        out.add(tuple(sorted(rng.sample(PAPER_CANDIDATES, size), key=PAPER_CANDIDATES.index)))
    return sorted(out)


# Every singleton, the full paper set, and a few random (ordered as in the paper) subsets;
# one subset in a non-paper order so a code path that assumes the paper order fails.
SUBSETS = ([(c,) for c in PAPER_CANDIDATES] + [PAPER_CANDIDATES] + _random_subsets(5, seed=7)
           + [("strip", "max7", "skip", "avg3")])


def _ids(subset):
    return "+".join(subset)


def make_layer(channels: int, candidates=PAPER_CANDIDATES, seed: int = 0, cls=MetaPooling, **kw):
    """A layer with random alpha and gate convs (alpha's zero init would hide weighting bugs)."""
    layer = cls(channels, candidates, **kw)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(layer.named_parameters())):
            scale = 1.0 if name == "alpha" else 0.5
            p.copy_(randn(p.shape, seed=1000 + 17 * seed + i, scale=scale))
    return layer


def run_layer(layer, x, grad_out):
    """Forward and backward; returns (out, grads by name: 'x' and every parameter)."""
    x = x.detach().requires_grad_(True)  # detach keeps x's strides; clone might not
    for p in layer.parameters():
        p.grad = None
    out = layer(x)
    out.backward(grad_out)
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out, grads


def run_independent(layer, x, grad_out):
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    params = ind.module_params(layer)
    out = ind.meta_pooling(x64, params, layer.candidates, layer.fixed)
    out.backward(grad_out.to(torch.float64))
    grads = {"x": x64.grad}
    grads.update({name: p.grad for name, p in params.items()})
    return out.detach(), grads


def check_layer_against_independent(layer, x, grad_out, tol, what=""):
    out, grads = run_layer(layer, x, grad_out)
    assert out.dtype == x.dtype and out.shape == x.shape
    ref_out, ref_grads = run_independent(layer, x, grad_out)
    assert_rel_close(out, ref_out, tol, f"{what} output")
    assert grads["x"].dtype == x.dtype
    assert_rel_close(grads["x"], ref_grads["x"], tol * X_GRAD_MULT, f"{what} grad x")
    for name, p in layer.named_parameters():
        if not p.requires_grad:
            assert grads[name] is None, f"{what} {name} is frozen but received a gradient"
            continue
        uses = layer.fixed is None or (name.startswith("gate") and layer.fixed == "strip")
        if not uses:
            assert grads[name] is None or not grads[name].any(), f"{what} {name} should get no gradient"
            continue
        assert grads[name] is not None, f"{what} {name} got no gradient"
        assert grads[name].dtype == p.dtype
        # grad alpha_k = π_k (g·op_k − g·out): when candidates coincide (every local op on a 1×1
        # plane is x) the terms cancel, and only their size bounds the rounding.
        scale = 1e-3 * grad_out.double().norm().item() * x.double().norm().item() if name == "alpha" else 0.0
        assert_rel_close(grads[name], ref_grads[name], tol * PARAM_GRAD_MULT, f"{what} grad {name}", scale)


def _inputs(shape, dtype, seed):
    return randn(shape, seed, dtype), randn(shape, seed + 1, dtype)


def _layer_for(dtype, channels, candidates, seed):
    layer = make_layer(channels, candidates, seed)
    # float64 inputs are compared at 1e-12, which needs float64 parameters (softmax in float32
    # alone is off by ~1e-8); lower precisions run with the float32 parameters they ship with.
    return layer.double() if dtype == torch.float64 else layer


# --------------------------------------------------------------------------------------------
# Candidate ops.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LOCAL)
def test_local_op(name, shape, dtype):
    x = randn(shape, seed=100 * LOCAL.index(name) + SHAPES.index(shape), dtype=dtype)
    out = reference.local_op(name, x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_rel_close(out, ind.local_op(name, x), TOL[dtype], name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_local_op_grads(shape):
    for name in LOCAL[1:]:
        x = randn(shape, seed=3, dtype=torch.float64).requires_grad_(True)
        go = randn(shape, seed=4, dtype=torch.float64)
        (gx,) = torch.autograd.grad(reference.local_op(name, x), x, go)
        x2 = x.detach().requires_grad_(True)
        (rx,) = torch.autograd.grad(ind.local_op(name, x2), x2, go)
        assert_rel_close(gx, rx, TOL[torch.float64], f"{name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_max_tie_gradient_goes_to_first_maximum(k, dtype):
    # Three distinct values on a 9×10 plane: nearly every window has tied maxima.
    g = make_generator(11)
    x = torch.randint(0, 3, (2, 3, 9, 10), generator=g).to(dtype).requires_grad_(True)
    go = randn(x.shape, seed=12, dtype=dtype)
    (gx,) = torch.autograd.grad(reference.max_pool(x, k), x, go)
    x64 = x.detach().double().requires_grad_(True)
    (rx,) = torch.autograd.grad(ind.max_pool(x64, k), x64, go.double())
    assert_rel_close(gx, rx, TOL[dtype], f"max{k} tie gradient")


@pytest.mark.parametrize("name", LOCAL[1:])
def test_nan_propagates(name):
    x = randn((1, 2, 6, 7), seed=5)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 0, 6] = float("nan")
    out = reference.local_op(name, x)
    ref = ind.local_op(name, x)
    assert ref.isnan().sum() > 2  # the NaN spreads over its windows
    assert_rel_close(out, ref, TOL[torch.float32], name)


@pytest.mark.parametrize("name", ["max3", "avg5", "strip"])
def test_nan_in_layer_output(name):
    layer = make_layer(2, (name, "skip"), seed=1)
    x = randn((1, 2, 5, 6), seed=9)
    x[0, 1, 2, 2] = float("nan")
    for fixed in (None, name):
        layer.fixed = fixed
        out = layer(x)
        ref = ind.meta_pooling(x, ind.module_params(layer, False), layer.candidates, fixed)
        assert out.isnan().any()
        assert_rel_close(out, ref, TOL[torch.float32], f"{name} fixed={fixed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_strip_gate(shape, dtype):
    n, c, h, w = shape
    x, g_h, g_w = randn(shape, 1, dtype), randn((n, c, h), 2, dtype), randn((n, c, w), 3, dtype)
    out = reference.strip_gate(x, g_h, g_w)
    assert out.dtype == dtype
    assert_rel_close(out, ind.strip_gate(x, g_h, g_w), TOL[dtype], "strip_gate")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_strip_means_and_op(shape):
    x = randn(shape, 21, torch.float64)
    z_h, z_w = reference.strip_means(x)
    r_h, r_w = ind.strip_means(x)
    assert z_h.shape == shape[:3] and z_w.shape == shape[:2] + shape[3:]
    assert_rel_close(z_h, r_h, TOL[torch.float64], "z_h")
    assert_rel_close(z_w, r_w, TOL[torch.float64], "z_w")
    layer = make_layer(shape[1], ("strip",), seed=2).double()
    out = reference.strip_op(x, layer.gate_h, layer.gate_w)
    assert_rel_close(out, ind.strip_op(x, ind.module_params(layer, False)), TOL[torch.float64], "strip")


# --------------------------------------------------------------------------------------------
# MetaPooling: search and fixed modes.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("candidates", SUBSETS, ids=_ids)
def test_search_mode_subsets(candidates, shape):
    seed = SUBSETS.index(candidates) * 31 + SHAPES.index(shape)
    layer = make_layer(shape[1], candidates, seed)
    x, go = _inputs(shape, torch.float32, seed)
    check_layer_against_independent(layer, x, go, TOL[torch.float32], _ids(candidates))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_search_mode_dtypes(dtype, shape):
    seed = 100 + SHAPES.index(shape)
    layer = _layer_for(dtype, shape[1], PAPER_CANDIDATES, seed)
    x, go = _inputs(shape, dtype, seed)
    check_layer_against_independent(layer, x, go, TOL[dtype], str(dtype))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 1, 8)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PAPER_CANDIDATES)
def test_fixed_mode(name, dtype, shape):
    seed = 200 + PAPER_CANDIDATES.index(name)
    layer = _layer_for(dtype, shape[1], PAPER_CANDIDATES, seed)
    layer.fix(name)
    x, go = _inputs(shape, dtype, seed)
    check_layer_against_independent(layer, x, go, TOL[dtype], f"fixed {name}")


@pytest.mark.parametrize("name", PAPER_CANDIDATES)
def test_fixed_mode_computes_only_that_op(name, monkeypatch):
    calls = []
    real = reference.candidate_op

    def counting(op, *args, **kw):
        calls.append(op)
        return real(op, *args, **kw)

    monkeypatch.setattr(reference, "candidate_op", counting)
    layer = make_layer(3, PAPER_CANDIDATES, seed=4)
    layer.fix(name)
    layer(randn((1, 3, 4, 5), 8))
    assert calls == [name]
    calls.clear()
    layer.fixed = None
    layer(randn((1, 3, 4, 5), 8))
    assert calls == list(PAPER_CANDIDATES)


def test_fixed_output_has_no_weight():
    # alpha strongly against avg3: a fixed layer must still return avg3(x) itself, not π·avg3(x).
    layer = make_layer(2, ("skip", "avg3"), seed=3)
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([4.0, -4.0]))
    layer.fix("avg3")
    x = randn((2, 2, 5, 5), 6)
    assert_rel_close(layer(x), ind.avg_pool(x, 3), TOL[torch.float32], "fixed avg3")


# --------------------------------------------------------------------------------------------
# MetaPooling API.
# --------------------------------------------------------------------------------------------
def test_api_defaults():
    layer = MetaPooling(5)
    assert layer.candidates == PAPER_CANDIDATES
    assert isinstance(layer.alpha, torch.nn.Parameter)
    assert layer.alpha.shape == (len(PAPER_CANDIDATES),) and layer.alpha.dtype == torch.float32
    assert torch.equal(layer.alpha.detach(), torch.zeros(len(PAPER_CANDIDATES)))
    assert layer.fixed is None
    assert_rel_close(layer.probs(), torch.full((8,), 1 / 8, dtype=torch.float64), 1e-7, "uniform probs")
    for conv in (layer.gate_h, layer.gate_w):
        assert isinstance(conv, torch.nn.Conv1d)
        assert conv.in_channels == conv.out_channels == 5 and conv.kernel_size == (1,)
        assert conv.bias is not None
    assert "MetaPooling" in repr(layer) and "strip" in repr(layer)


@pytest.mark.parametrize("candidates", [("skip",), ("avg3", "max5"), LOCAL], ids=_ids)
def test_no_gates_without_strip(candidates):
    layer = MetaPooling(4, candidates)
    assert layer.candidates == tuple(candidates)
    assert layer.alpha.shape == (len(candidates),)
    assert layer.gate_h is None and layer.gate_w is None
    assert not any(k.startswith("gate") for k in layer.state_dict())


def test_candidates_accepts_a_list():
    layer = MetaPooling(2, ["strip", "skip"])
    assert layer.candidates == ("strip", "skip")
    assert layer.gate_h is not None and layer.gate_w is not None


def test_probs_and_fix():
    layer = make_layer(3, PAPER_CANDIDATES, seed=5)
    assert_rel_close(layer.probs(), ind.softmax(layer.alpha), 1e-6, "probs")
    assert layer.probs().requires_grad
    layer.fix("max5")
    assert layer.fixed == "max5"
    assert not layer.alpha.requires_grad
    assert "max5" in repr(layer)


def test_state_dict_round_trip_restores_fixed():
    src = make_layer(3, PAPER_CANDIDATES, seed=6)
    src.fix("avg7")
    state = src.state_dict()
    dst = MetaPooling(3)
    assert dst.fixed is None
    dst.load_state_dict(state)
    assert dst.fixed == "avg7"
    assert not dst.alpha.requires_grad
    for k, v in src.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, dst.state_dict()[k]), k
    x = randn((1, 3, 4, 4), 1)
    assert torch.equal(src(x), dst(x))
    # An unfixed checkpoint loaded into a fixed layer unfixes it.
    dst.load_state_dict(MetaPooling(3).state_dict())
    assert dst.fixed is None and dst.alpha.requires_grad


# --------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4, 4), (1, 1, 3, 4, 4), (3,)], ids=str)
def test_not_4d(shape):
    with pytest.raises(ValueError, match="4-D"):
        MetaPooling(3)(torch.randn(shape))


def test_wrong_channels():
    with pytest.raises(ValueError, match="channels"):
        MetaPooling(3)(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool], ids=str)
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        MetaPooling(3)(torch.zeros(1, 3, 4, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_dtype(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        MetaPooling(3)(torch.randn(1, 3, 4, 4, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        MetaPooling(3)([[1.0]])


def test_different_devices():
    # The 'meta' device stands in for a second device on machines without a GPU.
    with pytest.raises(ValueError, match="same device"):
        MetaPooling(3)(torch.randn(1, 3, 4, 4, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            MetaPooling(3)(torch.randn(1, 3, 4, 4, device="cuda"))


@pytest.mark.parametrize("candidates,exc,match", [
    (("skip", "avg4"), ValueError, "unknown candidate"),
    (("conv3",), ValueError, "unknown candidate"),
    ((), ValueError, "at least one"),
    ([], ValueError, "at least one"),
    (("skip", "max3", "skip"), ValueError, "repeat"),
    ("strip", TypeError, "single string"),
], ids=["avg4", "conv3", "empty-tuple", "empty-list", "duplicate", "string"])
def test_bad_candidates(candidates, exc, match):
    with pytest.raises(exc, match=match):
        MetaPooling(3, candidates)


@pytest.mark.parametrize("channels", [0, -1, 2.0, True, "3"], ids=repr)
def test_bad_channels(channels):
    with pytest.raises(ValueError, match="channels"):
        MetaPooling(channels)


@pytest.mark.parametrize("name", ["avg9", "strip", "Skip"])
def test_fix_unknown_name(name):
    layer = MetaPooling(3, ("skip", "avg3", "max3"))
    with pytest.raises(ValueError, match="not among"):
        layer.fix(name)
    assert layer.fixed is None and layer.alpha.requires_grad


# --------------------------------------------------------------------------------------------
# Empty batches, layouts, and the caller's tensors.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixed", [None, "max7", "strip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_batch(dtype, fixed):
    layer = make_layer(3, PAPER_CANDIDATES, seed=1)
    if fixed:
        layer.fix(fixed)
    x = torch.randn(0, 3, 5, 4).to(dtype).requires_grad_(True)
    out = layer(x)
    assert out.shape == (0, 3, 5, 4) and out.dtype == dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fixed", [None, "avg5", "max3", "strip"])
def test_layouts_give_same_numbers(fixed, dtype, layout):
    layer = make_layer(4, PAPER_CANDIDATES, seed=8)
    if fixed:
        layer.fix(fixed)
    x, go = _inputs((2, 4, 6, 5), dtype, 8)
    out, grads = run_layer(layer, x, go)
    xl, gol = to_layout(x, layout), to_layout(go, layout)
    assert not xl.is_contiguous()
    out_l, grads_l = run_layer(layer, xl, gol)
    assert_rel_close(out_l, out, TOL[dtype], f"{layout} output")
    for k, g in grads.items():
        if g is not None:
            assert_rel_close(grads_l[k], g, TOL[dtype] * X_GRAD_MULT, f"{layout} grad {k}")
    # And against the independent implementation, so both cannot be wrong together.
    ref = ind.meta_pooling(x, ind.module_params(layer, False), layer.candidates, layer.fixed)
    assert_rel_close(out_l, ref, TOL[dtype], f"{layout} output vs independent")


@pytest.mark.parametrize("fixed", [None, "strip", "skip"])
def test_inputs_not_written(fixed):
    layer = make_layer(3, PAPER_CANDIDATES, seed=9)
    if fixed:
        layer.fix(fixed)
    x, go = _inputs((2, 3, 5, 5), torch.float32, 9)
    x_keep, go_keep = x.clone(), go.clone()
    params_keep = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    xr = x.requires_grad_(True)
    out = layer(xr)
    out.backward(go)
    assert torch.equal(x.detach(), x_keep)
    assert torch.equal(go, go_keep)
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, params_keep[k]), k


def test_all_subsets_accepted():
    # Every non-empty subset builds and runs; numbers are held to the independent implementation
    # on the sampled subsets above.
    x = randn((1, 2, 3, 4), 1)
    for r in range(1, len(PAPER_CANDIDATES) + 1):
        for subset in itertools.combinations(PAPER_CANDIDATES, r):
            out = MetaPooling(2, subset)(x)
            assert out.shape == x.shape and out.isfinite().all(), subset


# --------------------------------------------------------------------------------------------
# The comparison helpers every kernel test relies on.
# --------------------------------------------------------------------------------------------
def test_assert_rel_close_fails_when_it_should():
    ref = randn((3, 4), 1, torch.float64)
    assert_rel_close(ref.float(), ref, TOL[torch.float32])
    with pytest.raises(AssertionError, match=r"exceeds tolerance.*\n.*worst.*\n.*at \(1, 2\)"):
        bad = ref.clone()
        bad[1, 2] += 1.0
        assert_rel_close(bad, ref, 1e-3, "bumped")
    with pytest.raises(AssertionError, match="NaN/Inf mismatch"):
        bad = ref.clone()
        bad[0, 0] = float("nan")
        assert_rel_close(bad, ref, 1.0)
    with pytest.raises(AssertionError, match="NaN/Inf mismatch"):
        assert_rel_close(torch.full((3, 4), float("nan")), ref, float("inf"))
    with pytest.raises(AssertionError, match="NaN/Inf mismatch"):
        assert_rel_close(ref, torch.where(ref > 0, float("nan"), ref), 1.0)
    with pytest.raises(AssertionError, match="NaN/Inf mismatch"):
        inf = torch.tensor([1.0, float("inf")])
        assert_rel_close(-inf, inf, 10.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close(ref[:, :3], ref, 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close(torch.empty(0, 3), torch.empty(0, 4), 1.0)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_rel_close(torch.tensor([1e-3]), torch.zeros(1), 1e-6)


def test_assert_rel_close_passes_when_it_should():
    ref = torch.tensor([[1.0, float("nan")], [float("-inf"), 2.0]], dtype=torch.float64)
    assert_rel_close(ref.float(), ref, 0.0)
    assert_rel_close(torch.empty(0, 3, 2), torch.empty(0, 3, 2, dtype=torch.float64), 0.0)
    assert_rel_close(torch.zeros(4), torch.zeros(4, dtype=torch.float64), 0.0)
    assert_rel_close(torch.tensor([1e-9, -1e-9]), torch.zeros(2), 1e-6, scale=1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_layout(layout):
    x = randn((2, 3, 4, 5), 2)
    y = to_layout(x, layout)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert y.is_contiguous() == (layout == "contiguous")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = to_layout(randn((2, 3, 4), 3), "noncontiguous")
    assert not g.is_contiguous() and not g.isnan().any()


# --------------------------------------------------------------------------------------------
# α that does not fit the layer; extra state; fix() on a fixed layer.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [10, 3, 0, 1])
@pytest.mark.parametrize("fixed", [None, "avg3"])
def test_alpha_of_the_wrong_shape_is_refused_in_forward(size, fixed):
    layer = MetaPooling(3)
    if fixed:
        layer.fix(fixed)
    layer.alpha = torch.nn.Parameter(torch.zeros(size))
    with pytest.raises(ValueError, match=f"alpha has shape \\({size},\\) but this layer has 8 candidates"):
        layer(randn((1, 3, 4, 4), 2))
    layer.alpha = torch.nn.Parameter(torch.zeros(2, 4))  # right count, wrong shape
    with pytest.raises(ValueError, match="alpha has shape \\(2, 4\\)"):
        layer(randn((1, 3, 4, 4), 2))


def test_alpha_of_the_wrong_shape_is_refused_on_load():
    state = MetaPooling(3).state_dict()
    state["alpha"] = torch.zeros(10)
    state["_extra_state"] = {"fixed": None}  # an old-format state: only α's size can catch it
    with pytest.raises(RuntimeError, match="size mismatch for alpha"):
        MetaPooling(3).load_state_dict(state)


def test_extra_state_keeps_the_candidates():
    layer = MetaPooling(3, ("max3", "skip"))
    assert layer.state_dict()["_extra_state"] == {"fixed": None, "candidates": ["max3", "skip"]}


def test_state_from_other_candidates_or_order_is_refused():
    src = make_layer(3, ("skip", "avg3", "max3"), seed=8)
    src.fix("max3")
    for candidates in [("skip", "max3", "avg3"), ("max3", "avg3", "skip")]:  # same ops, same α size
        dst = MetaPooling(3, candidates)
        with pytest.raises(ValueError, match="_extra_state: the state was saved from a layer with candidates"):
            dst.load_state_dict(src.state_dict())
        assert dst.fixed is None  # nothing half-applied to the choice
    MetaPooling(3, ("skip", "avg3", "max3")).load_state_dict(src.state_dict())  # the same order loads


def test_old_extra_state_without_candidates_still_loads():
    src = make_layer(3, seed=9)
    state = src.state_dict()
    state["_extra_state"] = {"fixed": "avg5"}
    dst = MetaPooling(3)
    dst.load_state_dict(state)
    assert dst.fixed == "avg5" and not dst.alpha.requires_grad
    state["_extra_state"] = {"fixed": None}
    dst.load_state_dict(state)
    assert dst.fixed is None and dst.alpha.requires_grad


@pytest.mark.parametrize("extra, match", [
    (42, "expected \\{'fixed'"),
    (None, "expected \\{'fixed'"),
    ("avg3", "expected \\{'fixed'"),
    ({"fixed": "avg3", "other": 1}, "expected \\{'fixed'"),
    ({"fixed": "conv9"}, "fixed to 'conv9', not among"),
    ({"fixed": 3}, "fixed to 3, not among"),
    ({"fixed": None, "candidates": "skip"}, "saved from a layer with candidates 'skip'"),
    ({"fixed": None, "candidates": list(PAPER_CANDIDATES[:-1])}, "saved from a layer with candidates"),
], ids=["int", "none", "str", "extra-key", "unknown-op", "int-op", "str-candidates", "fewer-candidates"])
def test_bad_extra_state_is_refused(extra, match):
    state = MetaPooling(3).state_dict()
    state["_extra_state"] = extra
    layer = MetaPooling(3)
    layer.fix("max3")
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    assert layer.fixed == "max3"  # a refused state leaves the choice as it was


def test_fix_twice():
    layer = MetaPooling(3)
    layer.fix("avg3")
    layer.fix("avg3")  # the same op again: nothing changes
    assert layer.fixed == "avg3"
    with pytest.raises(ValueError, match="already fixed to 'avg3'; it cannot be fixed again to 'max3'"):
        layer.fix("max3")
    assert layer.fixed == "avg3" and not layer.alpha.requires_grad
