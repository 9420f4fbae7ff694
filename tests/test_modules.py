"""FusedMetaPooling on its CPU backends ("auto": the op's C++ kernels; "torch": the reference)
against MetaPooling and the independent float64 implementation; state_dict compatibility; backend
selection and its errors."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import independent as ind
from helpers import (DEVICES, PARAM_GRAD_MULT, TOL, X_GRAD_MULT, assert_rel_close, randn, to_layout)
from metapool_kernels import FusedMetaPooling, MetaPooling, modules
from metapool_kernels.reference import PAPER_CANDIDATES

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CPU_BACKENDS = ["auto", "torch"]
SHAPES = [(2, 3, 5, 4), (1, 2, 1, 1), (2, 4, 8, 9)]
MODES = [None, "strip", "max7", "avg3", "skip"]
SUBSETS = [("strip",), ("skip", "strip"), ("avg5", "max3"), ("strip", "max5", "avg7"),
           ("max7", "skip", "strip", "avg3")]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A METAPOOL_BACKEND in the caller's environment would silently change what "auto" runs.
    monkeypatch.delenv("METAPOOL_BACKEND", raising=False)


def make_pair(channels, candidates=PAPER_CANDIDATES, backend="auto", seed=0, fixed=None, dtype=torch.float32):
    """A MetaPooling with random alpha and gates, and a FusedMetaPooling loaded from its state_dict."""
    ref = MetaPooling(channels, candidates)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(ref.named_parameters())):
            p.copy_(randn(p.shape, seed=500 + 13 * seed + i, scale=1.0 if name == "alpha" else 0.5))
    if fixed is not None:
        ref.fix(fixed)
    fused = FusedMetaPooling(channels, candidates, backend=backend)
    fused.load_state_dict(ref.state_dict())
    assert fused.fixed == ref.fixed
    if dtype == torch.float64:
        # 1e-12 against float64 needs float64 parameters (a float32 softmax alone is ~1e-8 off).
        ref.double()
        fused.double()
    return ref, fused


def forward_backward(layer, x, grad_out):
    x = x.detach().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    out = layer(x)
    out.backward(grad_out)
    grads = {"x": x.grad}
    grads.update({k: p.grad for k, p in layer.named_parameters()})
    return out.detach(), grads


def independent_forward_backward(layer, x, grad_out):
    x64 = x.detach().double().requires_grad_(True)
    params = ind.module_params(layer)
    out = ind.meta_pooling(x64, params, layer.candidates, layer.fixed)
    out.backward(grad_out.double())
    grads = {"x": x64.grad}
    grads.update({k: p.grad for k, p in params.items()})
    return out.detach(), grads


def compare(fused, ref, x, go, tol, what):
    out, grads = forward_backward(fused, x, go)
    assert out.dtype == x.dtype and out.shape == x.shape
    r_out, r_grads = forward_backward(ref, x, go)
    i_out, i_grads = independent_forward_backward(ref, x, go)
    # The contract is the float64 semantics; MetaPooling in the same dtype is the drop-in check.
    assert_rel_close(out, i_out, tol, f"{what} output vs independent")
    assert_rel_close(out, r_out, 2 * tol, f"{what} output vs MetaPooling")
    for k, g in grads.items():
        if r_grads[k] is None:
            assert g is None or not g.any(), f"{what}: {k} gets a gradient MetaPooling does not give"
            continue
        assert g is not None, f"{what}: no gradient for {k}"
        assert g.dtype == r_grads[k].dtype, k
        mult = X_GRAD_MULT if k == "x" else PARAM_GRAD_MULT
        scale = 1e-3 * go.double().norm().item() * x.double().norm().item() if k == "alpha" else 0.0
        assert_rel_close(g, i_grads[k], tol * mult, f"{what} grad {k} vs independent", scale)
        assert_rel_close(g, r_grads[k], 2 * tol * mult, f"{what} grad {k} vs MetaPooling", scale)


def _check_backend(backend, dtype, fixed, shape):
    seed = SHAPES.index(shape) * 7 + MODES.index(fixed)
    ref, fused = make_pair(shape[1], backend=backend, seed=seed, fixed=fixed, dtype=dtype)
    x, go = randn(shape, seed, dtype), randn(shape, seed + 1, dtype)
    compare(fused, ref, x, go, TOL[dtype], f"{backend}/{dtype}/{fixed or 'search'}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fixed", MODES, ids=lambda m: m or "search")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_backend(dtype, fixed, shape):
    _check_backend("auto", dtype, fixed, shape)


# "torch" is MetaPooling's own forward: a lighter sweep shows it is wired to the right numbers.
@pytest.mark.parametrize("fixed", [None, "strip"], ids=lambda m: m or "search")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend(dtype, fixed):
    _check_backend("torch", dtype, fixed, SHAPES[0])


@pytest.mark.parametrize("candidates", SUBSETS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_subsets_auto_backend(dtype, candidates):
    seed = SUBSETS.index(candidates)
    ref, fused = make_pair(3, candidates, backend="auto", seed=seed, dtype=dtype)
    x, go = randn((2, 3, 6, 7), seed, dtype), randn((2, 3, 6, 7), seed + 1, dtype)
    compare(fused, ref, x, go, TOL[dtype], "+".join(candidates))


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layouts(backend, layout):
    ref, fused = make_pair(4, backend=backend, seed=3)
    x, go = randn((2, 4, 6, 5), 30), randn((2, 4, 6, 5), 31)
    out, grads = forward_backward(fused, x, go)
    out_l, grads_l = forward_backward(fused, to_layout(x, layout), to_layout(go, layout))
    assert_rel_close(out_l, out, TOL[torch.float32], "output")
    for k in grads:
        assert_rel_close(grads_l[k], grads[k], TOL[torch.float32] * X_GRAD_MULT, f"grad {k}")
    i_out, _ = independent_forward_backward(ref, x, go)
    assert_rel_close(out_l, i_out, TOL[torch.float32], "output vs independent")


@pytest.mark.parametrize("fixed", [None, "strip", "avg7"], ids=lambda m: m or "search")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend, fixed):
    _, fused = make_pair(3, backend=backend, fixed=fixed)
    x = torch.randn(0, 3, 4, 5, dtype=torch.float16).requires_grad_(True)
    out = fused(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_not_written(backend):
    _, fused = make_pair(3, backend=backend, seed=4)
    x, go = randn((2, 3, 5, 5), 40), randn((2, 3, 5, 5), 41)
    keep_x, keep_go = x.clone(), go.clone()
    keep_state = {k: v.clone() for k, v in fused.state_dict().items() if isinstance(v, torch.Tensor)}
    x.requires_grad_(True)
    fused(x).backward(go)
    assert torch.equal(x.detach(), keep_x) and torch.equal(go, keep_go)
    for k, v in fused.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, keep_state[k]), k


# --------------------------------------------------------------------------------------------
# Which kernels run.
# --------------------------------------------------------------------------------------------
class MetapoolOpRecorder(TorchDispatchMode):
    """Records every metapool op that reaches the dispatcher, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metapool":
            self.calls.append((func._schema.name, args))
        return func(*args, **(kwargs or {}))

    def names(self):
        return [name for name, _ in self.calls]


def run_recorded(layer, x):
    """Forward and backward of ``layer`` on x, recording the metapool ops they dispatch."""
    x = x.detach().requires_grad_(True)
    with MetapoolOpRecorder() as rec:
        out = layer(x)
        out.sum().backward()
    return out.detach(), rec


@pytest.mark.parametrize("backend,uses_op", [("auto", True), ("torch", False)])
def test_backend_dispatch_on_cpu(backend, uses_op):
    """On CPU tensors "auto" runs metapool::meta_pool (its C++ kernels) forward and backward;
    "torch" runs the reference's ATen ops and no metapool op."""
    ref, fused = make_pair(3, backend=backend, seed=5)
    x = randn((1, 3, 4, 4), 50)
    out, rec = run_recorded(fused, x)
    expected = ["metapool::meta_pool", "metapool::meta_pool_backward"] if uses_op else []
    assert rec.names() == expected, f"backend {backend!r} dispatched {rec.names()}"
    assert_rel_close(out, ref(x), TOL[torch.float32], f"backend {backend!r}")


def test_env_selects_torch_backend(monkeypatch):
    monkeypatch.setenv("METAPOOL_BACKEND", " Torch ")
    ref, fused = make_pair(3, backend="auto", seed=6)
    x = randn((1, 3, 4, 4), 60)
    out, rec = run_recorded(fused, x)
    assert_rel_close(out, ref(x), TOL[torch.float32], "METAPOOL_BACKEND=torch")
    assert rec.calls == []


def test_env_is_read_when_built_not_per_call(monkeypatch):
    """The environment is read when the layer is built (no lookups on the per-call path): a
    METAPOOL_BACKEND set afterwards changes nothing until ``backend`` is assigned again."""
    _, fused = make_pair(3, backend="auto", seed=6)
    monkeypatch.setenv("METAPOOL_BACKEND", "torch")
    _, rec = run_recorded(fused, randn((1, 3, 4, 4), 62))
    assert rec.names() == ["metapool::meta_pool", "metapool::meta_pool_backward"], rec.names()
    fused.backend = "auto"
    _, rec = run_recorded(fused, randn((1, 3, 4, 4), 63))
    assert rec.calls == [], rec.names()


def test_validation_cache_still_rejects_new_inputs():
    """Validation runs once per (shape, dtype, device): a good call must not let a later bad one through."""
    fused = FusedMetaPooling(3)
    fused(randn((1, 3, 4, 4), 64))
    with pytest.raises(ValueError, match="channels"):
        fused(randn((1, 5, 4, 4), 65))
    with pytest.raises(TypeError, match="floating-point"):
        fused(torch.ones(1, 3, 4, 4, dtype=torch.int64))
    fused(randn((2, 3, 5, 5), 66))
    with pytest.raises(ValueError, match="4-D"):
        fused(randn((3, 4, 4), 67))


@pytest.mark.parametrize("env", ["auto", "triton"])
def test_env_does_not_override_explicit_backend(env, monkeypatch):
    """METAPOOL_BACKEND only resolves "auto": an explicit "torch" stays the reference."""
    _, fused = make_pair(3, backend="torch", seed=6)
    monkeypatch.setenv("METAPOOL_BACKEND", env)
    _, rec = run_recorded(fused, randn((1, 3, 4, 4), 61))
    assert rec.calls == [], f"backend 'torch' with METAPOOL_BACKEND={env} dispatched {rec.names()}"


@pytest.mark.parametrize("fixed", PAPER_CANDIDATES)
def test_fixed_computes_only_that_op(fixed):
    """A fixed layer calls the op with its one candidate and no weights (nothing at all for skip)."""
    _, fused = make_pair(3, backend="auto", seed=7, fixed=fixed)
    x = randn((1, 3, 4, 4), 70)
    _, rec = run_recorded(fused, x)
    if fixed == "skip":
        assert rec.calls == []
        return
    assert rec.names() == ["metapool::meta_pool", "metapool::meta_pool_backward"]
    forward_args = rec.calls[0][1]
    assert forward_args[-1] == fixed and forward_args[1] is None  # candidates, pi
    gates = forward_args[2:6]
    assert all(g is not None for g in gates) if fixed == "strip" else all(g is None for g in gates)


# --------------------------------------------------------------------------------------------
# state_dict, repr.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("candidates", [PAPER_CANDIDATES, ("avg3", "max3")], ids=["paper", "local"])
def test_state_dict_keys_and_cross_loading(candidates):
    ref, fused = make_pair(4, candidates, backend="auto", seed=8)
    assert list(ref.state_dict()) == list(fused.state_dict())
    # Fused -> reference, with a fixed choice travelling along.
    fused.fix(candidates[-1])
    back = MetaPooling(4, candidates)
    back.load_state_dict(fused.state_dict())
    assert back.fixed == candidates[-1] and not back.alpha.requires_grad
    for k, v in fused.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, back.state_dict()[k]), k
    x = randn((2, 4, 5, 5), 80)
    assert_rel_close(fused(x), back(x), TOL[torch.float32], "cross-loaded fixed layer")
    # A layer with other candidates refuses the checkpoint (alpha's size, or the fixed op).
    with pytest.raises((RuntimeError, ValueError)):
        other = ("skip",) if "strip" in candidates else PAPER_CANDIDATES
        MetaPooling(4, other).load_state_dict(fused.state_dict())


@pytest.mark.parametrize("backend", modules.BACKENDS)
def test_repr(backend):
    layer = FusedMetaPooling(6, ("skip", "strip"), backend=backend)
    text = repr(layer)
    assert "FusedMetaPooling" in text and repr(backend) in text and "strip" in text
    layer.fix("skip")
    assert "fixed='skip'" in repr(layer)
    assert "avg3" in repr(FusedMetaPooling(2, ("avg3",)))


def test_same_attributes_as_reference():
    fused = FusedMetaPooling(5)
    assert fused.candidates == PAPER_CANDIDATES and fused.fixed is None and fused.backend == "auto"
    assert fused.alpha.shape == (8,) and not fused.alpha.any()
    assert isinstance(fused, MetaPooling)
    assert FusedMetaPooling(5, ("avg3",)).gate_h is None


# --------------------------------------------------------------------------------------------
# Bad backends and bad input.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "cuda", "Triton", "", None, "inductor"])
def test_bad_backend_name(backend):
    with pytest.raises(ValueError, match="backend"):
        FusedMetaPooling(3, backend=backend)


@pytest.mark.parametrize("value", ["bogus", "gpu", "cuda", "cpu"])
def test_bad_env_backend(value, monkeypatch):
    monkeypatch.setenv("METAPOOL_BACKEND", value)
    with pytest.raises(ValueError, match="METAPOOL_BACKEND"):
        FusedMetaPooling(3)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused = FusedMetaPooling(3, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused(randn((1, 3, 4, 4), 91))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused(randn((1, 3, 4, 4), 91))


def test_env_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("METAPOOL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        FusedMetaPooling(3)(randn((1, 3, 4, 4), 92))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("x,exc,match", [
    (torch.randn(3, 4, 4), ValueError, "4-D"),
    (torch.randn(1, 5, 4, 4), ValueError, "channels"),
    (torch.ones(1, 3, 4, 4, dtype=torch.int64), TypeError, "floating-point"),
    (torch.randn(1, 3, 4, 4, dtype=torch.complex64), TypeError, "floating-point"),
    (torch.randn(1, 3, 4, 4, device="meta"), ValueError, "same device"),
], ids=["3d", "channels", "int", "complex", "device"])
def test_bad_input(backend, x, exc, match):
    # Validation runs before backend selection, so even the triton backend reports the input.
    with pytest.raises(exc, match=match):
        FusedMetaPooling(3, backend=backend)(x)


@pytest.mark.parametrize("device", DEVICES)
def test_module_moves_with_device(device):
    _, fused = make_pair(3, backend="auto", seed=9)
    fused = fused.to(device)
    x = randn((1, 3, 5, 5), 93, device=device)
    if device == "cuda":
        pytest.importorskip("metapool_kernels.ops.meta_pool")
    assert_rel_close(fused(x), ind.meta_pooling(x, ind.module_params(fused, False), fused.candidates),
                     TOL[torch.float32], f"auto on {device}")
