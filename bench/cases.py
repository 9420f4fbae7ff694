"""What the suites measure: the cases per device and scope, how each variant is built, and the
rows each case produces. The pytest suites and tests/test_bench_smoke.py both call these.

Row fields shared by every suite: ``suite``, ``device`` ("cuda"/"cpu"), ``device_name``, ``median_ms``,
``p20_ms``, ``p80_ms``, ``reps``, ``method``; a row whose variant failed carries ``error`` instead of
timings.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from metapool_kernels import PAPER_CANDIDATES, FusedMetaPooling, MetaPooling, ops, reference
from metapool_kernels.modules import resolve_backend

from .common import (DTYPES, MBV2_FEATURE_SHAPES, TimingConfig, device_name, first_call_seconds,
                     floor_factor, gbps, l2_cache_bytes, measure)

FIXED_OPS: Tuple[str, ...] = PAPER_CANDIDATES
OP_MODES = ("fwd", "fwd+bwd")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# The CPU op matrix: one MobileNetV2-1.0 feature map per resolution (112² to 7²), the widest where a
# resolution has two, so every resolution is covered at a quarter less compilation than all seven.
CPU_FEATURE_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (16, 112, 112), (24, 56, 56), (32, 28, 28), (96, 14, 14), (320, 7, 7),
)


def _error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"[:400]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# =============================================================================================
# Op suite
# =============================================================================================
@dataclass(frozen=True)
class OpCase:
    op: str                           # "search" (all 8 candidates) or one candidate, fixed
    mode: str                         # "fwd" (under no_grad) or "fwd+bwd"
    dtype: str                        # key of common.DTYPES
    shape: Tuple[int, int, int, int]  # (N, C, H, W)
    compile: bool = False             # also time torch.compile(reference)
    memory_format: str = "contiguous"  # or "channels_last": the layout of x (and grad_out)

    @property
    def id(self) -> str:
        n, c, h, w = self.shape
        layout = "-cl" if self.memory_format == "channels_last" else ""
        return f"{self.op}-{self.mode}-{self.dtype}-b{n}-{c}x{h}x{w}{layout}"


def op_cases(device: str, scope: str) -> List[OpCase]:
    """The op matrix. On CUDA: every MobileNetV2-1.0 feature shape at batch 1, 32 and 128, float32 and
    bfloat16, search mode and every fixed op, forward and forward+backward. torch.compile costs a
    compilation per case, so it runs on search mode at the largest batch unless the scope is full.
    On the CPU (see CPU_FEATURE_SHAPES): search mode forward and forward+backward, every fixed op
    forward, at batch 1 and 8, contiguous and channels_last, float32, each beside torch.compile."""
    ops_all = ("search",) + FIXED_OPS
    cases: List[OpCase] = []

    def add(shapes, batches, dtypes, op_list, compile_if, modes=OP_MODES, formats=("contiguous",)):
        for op, dtype, (c, h, w), n, mode, fmt in itertools.product(op_list, dtypes, shapes, batches, modes, formats):
            case = OpCase(op, mode, dtype, (n, c, h, w), memory_format=fmt)
            cases.append(OpCase(op, mode, dtype, (n, c, h, w), compile=compile_if(case), memory_format=fmt))

    if scope == "smoke":
        add([(8, 9, 10)], [1], ["float32"], ("search", "max7", "strip"), lambda c: False)
        return cases
    if device == "cuda":
        if scope == "quick":
            big = sorted(MBV2_FEATURE_SHAPES, key=lambda s: -s[0] * s[1] * s[2])[:2]
            add(MBV2_FEATURE_SHAPES, [128], ["float32", "bfloat16"], ops_all,
                lambda c: c.op == "search" and tuple(c.shape[1:]) in big)
        else:
            full = scope == "full"
            add(MBV2_FEATURE_SHAPES, [1, 32, 128], ["float32", "bfloat16"], ops_all,
                lambda c: full or (c.op == "search" and c.shape[0] == 128))
        return cases
    formats = ("contiguous", "channels_last")
    always = lambda c: True  # noqa: E731  (every CPU case is timed beside torch.compile)
    if scope == "quick":
        shapes = [(24, 56, 56), (320, 7, 7)]
        add(shapes, [1, 8], ["float32"], ("search",), always, formats=formats)
        add(shapes, [8], ["float32"], FIXED_OPS, always, modes=("fwd",), formats=formats)
    elif scope == "full":
        add(MBV2_FEATURE_SHAPES, [1, 8], ["float32", "bfloat16"], ops_all, always, formats=formats)
    else:
        # Compiling search mode's forward+backward graph takes inductor one to two minutes on a 2-core
        # machine, per shape, layout and thread count; it is compiled in channels_last, the layout
        # the search trainer uses on the CPU (the full scope compiles both layouts).
        add(CPU_FEATURE_SHAPES, [1, 8], ["float32"], ("search",),
            lambda c: c.mode == "fwd" or c.memory_format == "channels_last", formats=formats)
        # Largest maps first and every op per map, so a run cut short by --bench-deadline keeps the
        # rows the bandwidth goal needs (batch 8 of the largest maps) for every op.
        for (c, h, w), n, fmt, op in itertools.product(CPU_FEATURE_SHAPES, (8, 1), formats, FIXED_OPS):
            cases.append(OpCase(op, "fwd", "float32", (n, c, h, w), compile=True, memory_format=fmt))
    return cases


def make_layers(op: str, channels: int, device: str, fused_backend: str = "auto", seed: int = 0):
    """(reference MetaPooling, FusedMetaPooling) holding the same state, parameters in float32.

    A fixed op is built with that op as its only candidate, as the derived networks build it."""
    candidates = PAPER_CANDIDATES if op == "search" else (op,)
    g = torch.Generator().manual_seed(seed)
    ref = MetaPooling(channels, candidates)
    with torch.no_grad():
        for p in ref.parameters():
            # Random α so the mixture weights differ; never zeros, which can run faster than real data.
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if op != "search":
        ref.fix(op)
    fused = FusedMetaPooling(channels, candidates, backend=fused_backend)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device), fused.to(device)


def rotation_count(set_bytes: int, device: str) -> int:
    """Input sets to cycle through so that a call rarely finds its inputs in cache."""
    if device == "cuda":
        n = math.ceil(3 * max(l2_cache_bytes(device), 1) / max(set_bytes, 1))
        n = min(n, max(1, (1 << 30) // max(set_bytes, 1)))  # at most ~1 GiB of inputs
        return int(min(32, max(2, n)))
    return int(min(8, max(2, math.ceil((64 << 20) / max(set_bytes, 1)))))


def _op_runner(layer, xs, grads_out, mode: str) -> Callable[[], Any]:
    params = [p for p in layer.parameters() if p.requires_grad]
    order = itertools.cycle(range(len(xs)))
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return layer(xs[next(order)])
        return fwd

    def fwd_bwd():
        i = next(order)
        out = layer(xs[i])
        return torch.autograd.grad(out, [xs[i], *params], grads_out[i], allow_unused=True)
    return fwd_bwd


def op_inputs(case: OpCase, device: str, sets: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``sets`` inputs x in the case's layout (requiring grad for fwd+bwd) and as many grad_out."""
    gen = torch.Generator(device=device).manual_seed(1234)
    fmt = MEMORY_FORMATS[case.memory_format]

    def tensor():
        return torch.randn(case.shape, device=device, dtype=DTYPES[case.dtype], generator=gen
                           ).contiguous(memory_format=fmt)
    xs = [tensor() for _ in range(sets)]
    grads_out = []
    if case.mode == "fwd+bwd":
        xs = [x.requires_grad_(True) for x in xs]
        grads_out = [tensor() for _ in range(sets)]
    return xs, grads_out


def op_variant_fn(case: OpCase, provider: str, device: str, *, sets: int = 2, compile_backend: str = "inductor",
                  fused_backend: str = "auto") -> Callable[[], Any]:
    """One call of one variant ("fused", "eager" or "compile") of a case, as the op suite times it."""
    xs, grads_out = op_inputs(case, device, sets)
    ref, fused = make_layers(case.op, case.shape[1], device, fused_backend)
    if provider == "compile":
        torch._dynamo.reset()
        layer = torch.compile(ref, dynamic=False, backend=compile_backend)
    else:
        layer = {"fused": fused, "eager": ref}[provider]
    return _op_runner(layer, xs, grads_out, case.mode)


def run_op_case(case: OpCase, device: str, timing: TimingConfig, copy_gbps: Optional[float], *,
                fused_backend: str = "auto", compile_backend: str = "inductor",
                buffers: Optional[int] = None, repeat: bool = True) -> List[Dict[str, Any]]:
    """Rows for one case: fused, eager reference, torch.compile(reference) when the case asks for it,
    and fused again (its spread against the first fused timing is the noise of the run)."""
    dtype = DTYPES[case.dtype]
    n, c, h, w = case.shape
    x_bytes = n * c * h * w * torch.empty((), dtype=dtype).element_size()
    k, floor_label = floor_factor(case.op, case.mode)
    set_bytes = x_bytes * (2 if case.mode == "fwd+bwd" else 1)
    nbuf = buffers or rotation_count(set_bytes, device)
    xs, grads_out = op_inputs(case, device, nbuf)
    ref, fused = make_layers(case.op, c, device, fused_backend)
    base = {
        "suite": "ops", "device": device, "device_name": device_name(device), "op": case.op, "mode": case.mode,
        "dtype": case.dtype, "shape": list(case.shape), "batch": n, "chw": [c, h, w], "x_bytes": x_bytes,
        "memory_format": case.memory_format,
        "floor_factor": k, "floor": floor_label, "floor_bytes": k * x_bytes, "buffers": nbuf,
        "case": case.id,
    }
    with torch.no_grad():
        expected = ref(xs[0])

    variants: List[Tuple[str, str, Any]] = [
        ("fused", f"FusedMetaPooling(backend={fused_backend!r} -> {resolve_backend(fused_backend)!r})", fused),
        ("eager", "MetaPooling (pure-PyTorch reference)", ref),
    ]
    if case.compile:
        variants.append(("compile", f"torch.compile(MetaPooling, dynamic=False, backend={compile_backend!r})", None))
    if repeat:
        variants.append(("fused", variants[0][1], fused))

    rows, errors, seen = [], [], set()
    for provider, impl, layer in variants:
        row = dict(base, provider=provider, impl=impl, repeat=int(provider in seen))
        seen.add(provider)
        try:
            if provider == "compile":
                # A fresh compilation per case: dynamo's caches would otherwise hit their recompile
                # limit across shapes and fall back to eager without saying so.
                torch._dynamo.reset()
                layer = torch.compile(ref, dynamic=False, backend=compile_backend)
            fn = _op_runner(layer, xs, grads_out, case.mode)
            if provider == "compile":
                row["compile_s"] = first_call_seconds(fn, device)
            if provider != "eager" and row["repeat"] == 0:
                # In the grad mode the timed calls use, so a compiled variant is not compiled twice.
                with torch.set_grad_enabled(case.mode == "fwd+bwd"):
                    row["rel_err"] = _rel_err(layer(xs[0]), expected)
            t = measure(fn, device, timing)
            row.update(t.as_row())
            row["gbps"] = gbps(row["floor_bytes"], t.median_ms) if k else None
            row["pct_copy"] = (100.0 * row["gbps"] / copy_gbps) if (k and copy_gbps) else None
        except Exception as e:  # one failing variant must not cost the others their rows
            row["error"] = _error_text(e)
            errors.append(f"{provider}: {row['error']}")
        rows.append(row)
    if case.compile:
        torch._dynamo.reset()
    if errors:
        raise BenchError(rows, errors)
    return rows


class BenchError(RuntimeError):
    """Some variants failed; ``rows`` still holds every row (failed ones with ``error``)."""

    def __init__(self, rows: List[Dict[str, Any]], errors: Sequence[str]):
        super().__init__("; ".join(errors))
        self.rows = rows


# =============================================================================================
# Gate weights: a fixed strip layer's forward with trainable weights, frozen ones, inference_mode
# =============================================================================================
GATE_WEIGHT_SETTINGS = ("trainable, no_grad", "frozen, no_grad", "frozen, inference_mode")


def gate_weight_cases(scope: str) -> List[Tuple[int, int, int, int]]:
    # The layer's last strip shapes in a derived network at batch 1, and the batch-16 training map.
    return [(1, 8, 9, 10)] if scope == "smoke" else [(1, 320, 7, 7), (16, 320, 4, 4)]


def run_gate_weight_case(shape, device: str, timing: TimingConfig) -> List[Dict[str, Any]]:
    """One fixed `strip` layer timed with its gate weights trainable, frozen (requires_grad False),
    and frozen under inference_mode: a deployment freezes them, so its speed must not depend on it."""
    torch.manual_seed(5)
    layer = FusedMetaPooling(shape[1], ("strip",)).to(device)
    layer.fix("strip")
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    base = {"suite": "gate_weights", "device": device, "device_name": device_name(device), "op": "strip",
            "mode": "fwd", "dtype": "float32", "shape": list(shape), "batch": shape[0],
            "memory_format": "channels_last"}
    rows = []
    for setting in GATE_WEIGHT_SETTINGS:
        layer.requires_grad_(setting.startswith("trainable"))
        grad_mode = torch.inference_mode if setting.endswith("inference_mode") else torch.no_grad

        def fn():
            with grad_mode():
                return layer(x)
        row = dict(base, variant=setting)
        row.update(measure(fn, device, timing).as_row())
        rows.append(row)
    return rows


# =============================================================================================
# Strip gate: the C++ op against eager PyTorch
# =============================================================================================
def strip_gate_cases(scope: str) -> List[Tuple[Tuple[int, int, int, int], str, str]]:
    if scope == "smoke":
        return [((1, 8, 9, 10), "float32", m) for m in OP_MODES]
    # The op suite's `strip` rows time the same kernel inside the layer; this suite keeps the op alone
    # at the largest and the smallest feature map (every shape in the full scope).
    shapes = {"quick": ((32, 28, 28), (320, 7, 7)), "full": MBV2_FEATURE_SHAPES}.get(
        scope, (CPU_FEATURE_SHAPES[0], CPU_FEATURE_SHAPES[-1]))
    dtypes = ("float32", "bfloat16") if scope == "full" else ("float32",)
    return [((1,) + s, d, m) for s in shapes for d in dtypes for m in OP_MODES]


def run_strip_gate_case(shape, dtype_key: str, mode: str, device: str, timing: TimingConfig,
                        copy_gbps: Optional[float]) -> List[Dict[str, Any]]:
    dtype = DTYPES[dtype_key]
    n, c, h, w = shape
    x_bytes = n * c * h * w * torch.empty((), dtype=dtype).element_size()
    k, floor_label = floor_factor("strip_gate", mode)
    gen = torch.Generator(device=device).manual_seed(7)
    nbuf = rotation_count(x_bytes * (2 if mode == "fwd+bwd" else 1), device)
    # Gate logits are float32, as the module computes them from float32 strip means.
    sets = []
    for _ in range(nbuf):
        x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        g_h = torch.randn((n, c, h), device=device, generator=gen)
        g_w = torch.randn((n, c, w), device=device, generator=gen)
        go = torch.randn(shape, device=device, dtype=dtype, generator=gen) if mode == "fwd+bwd" else None
        if mode == "fwd+bwd":
            for t in (x, g_h, g_w):
                t.requires_grad_(True)
        sets.append((x, g_h, g_w, go))

    impls = {
        "C++ op": ("metapool_kernels.ops.strip_gate", ops.strip_gate),
        # The eager formula promotes to float32 with float32 gates; the cast back gives the op's output dtype.
        "eager": ("metapool_kernels.reference.strip_gate (+ cast to x's dtype)",
                  lambda x, gh, gw: reference.strip_gate(x, gh, gw).to(x.dtype)),
    }
    base = {"suite": "strip_gate", "device": device, "device_name": device_name(device), "op": "strip_gate",
            "mode": mode, "dtype": dtype_key, "shape": list(shape), "batch": n, "chw": [c, h, w],
            "x_bytes": x_bytes, "floor_factor": k, "floor": floor_label, "floor_bytes": k * x_bytes,
            "buffers": nbuf}
    with torch.no_grad():
        expected = impls["eager"][1](*sets[0][:3])
    rows, errors = [], []
    for provider, repeat in (("C++ op", 0), ("eager", 0), ("C++ op", 1)):
        impl, f = impls[provider]
        row = dict(base, provider=provider, impl=impl, repeat=repeat)
        order = itertools.cycle(sets)
        try:
            if mode == "fwd":
                def fn():
                    x, gh, gw, _ = next(order)
                    with torch.no_grad():
                        return f(x, gh, gw)
            else:
                def fn():
                    x, gh, gw, go = next(order)
                    return torch.autograd.grad(f(x, gh, gw), [x, gh, gw], go)
            if provider == "C++ op" and not repeat:
                with torch.no_grad():
                    row["rel_err"] = _rel_err(f(*sets[0][:3]), expected)
            t = measure(fn, device, timing)
            row.update(t.as_row())
            row["gbps"] = gbps(row["floor_bytes"], t.median_ms)
            row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps if copy_gbps else None
        except Exception as e:
            row["error"] = _error_text(e)
            errors.append(f"{provider}: {row['error']}")
        rows.append(row)
    if errors:
        raise BenchError(rows, errors)
    return rows


# =============================================================================================
# Model suite: the paper's Table 1 (pooling enhancers) and Table 4 (attention baselines)
# =============================================================================================
# An illustrative derived network, not a search result: local ops in the early blocks, 'strip' in
# three 64/96-channel blocks, some 'skip', every op kind present. Its strip layers add 45,568
# parameters (3,550,457 in all, with each fixed layer's one-element α): the paper's 3.55M for its
# derived MobileNetV2 (Table 1, "Ours").
# --bench-genotype replaces it with a genotype file written by a PMPL search.
DERIVED_GENOTYPE: Tuple[str, ...] = (
    "avg3", "max3", "avg3", "max5", "skip", "avg5", "strip", "avg7", "skip",
    "max7", "strip", "avg3", "strip", "max3", "skip", "avg5", "skip",
)


@dataclass(frozen=True)
class ModelVariant:
    key: str
    label: str
    enhancer: Any          # an enhancer name or a genotype (tuple of op names)
    fused: bool
    table: int             # 1: the paper's Table 1 (pooling); 4: Table 4 (attention baselines)
    compiled: bool = False  # run under torch.compile (a fresh compilation per setting)

    @property
    def baseline(self) -> str:
        """The plain-network variant this one's overhead is measured against."""
        return "skip-compiled" if self.compiled else "skip"


def model_variants(genotype: Optional[Sequence[str]] = None) -> List[ModelVariant]:
    g = tuple(genotype) if genotype is not None else DERIVED_GENOTYPE
    return [
        ModelVariant("skip", "Skip (plain MobileNetV2)", "none", True, 1),
        ModelVariant("maxpool-eager", "MaxPool, eager", "maxpool", False, 1),
        ModelVariant("maxpool-fused", "MaxPool, fused", "maxpool", True, 1),
        ModelVariant("avgpool-eager", "AvgPool, eager", "avgpool", False, 1),
        ModelVariant("avgpool-fused", "AvgPool, fused", "avgpool", True, 1),
        ModelVariant("meta-search-eager", "Meta-Pooling search (8 candidates), eager", "meta", False, 1),
        ModelVariant("meta-search-fused", "Meta-Pooling search (8 candidates), fused", "meta", True, 1),
        ModelVariant("derived-eager", "Meta-Pooling derived, eager", g, False, 1),
        ModelVariant("derived-fused", "Meta-Pooling derived, fused", g, True, 1),
        ModelVariant("se", "+SE", "se", True, 4),
        ModelVariant("cbam", "+CBAM", "cbam", True, 4),
        ModelVariant("coordatt", "+CoordAttention", "coordatt", True, 4),
        ModelVariant("sk", "+SK", "sk", True, 4),
        # The baseline once more, after everything else: its distance from the first Skip row is the
        # run's noise at model level, which every "vs Skip" overhead has to clear.
        ModelVariant("skip-again", "Skip, timed again last", "none", True, 1),
    ]


def cpu_model_variants(genotype: Optional[Sequence[str]] = None) -> List[ModelVariant]:
    """The CPU's model rows below the full scope: plain and derived MobileNetV2, eager and under
    torch.compile, each family bracketed by its plain network timed first and again last."""
    g = tuple(genotype) if genotype is not None else DERIVED_GENOTYPE
    return [
        ModelVariant("skip", "Skip (plain MobileNetV2)", "none", True, 1),
        ModelVariant("derived-eager", "Meta-Pooling derived, eager", g, False, 1),
        ModelVariant("derived-fused", "Meta-Pooling derived, fused", g, True, 1),
        ModelVariant("skip-compiled", "Skip (plain MobileNetV2), torch.compile", "none", True, 1, compiled=True),
        ModelVariant("derived-fused-compiled", "Meta-Pooling derived, fused, torch.compile", g, True, 1, compiled=True),
        ModelVariant("skip-compiled-again", "Skip, torch.compile, timed again last", "none", True, 1, compiled=True),
        ModelVariant("skip-again", "Skip, timed again last", "none", True, 1),
    ]


@dataclass(frozen=True)
class ModelSetting:
    batch: int
    dtype: str
    resolution: int
    memory_format: str     # "contiguous" or "channels_last"


def model_settings(device: str, scope: str) -> List[ModelSetting]:
    if scope == "smoke":
        return [ModelSetting(1, "float32", 32, "contiguous")]
    if device == "cuda":
        batches = (128,) if scope == "quick" else (1, 128)
        return [ModelSetting(b, d, 224, "contiguous") for d in ("float32", "bfloat16") for b in batches]
    # channels_last too: torch's CPU pooling kernels are much faster in it, and the trainer uses it on CPU.
    formats = ("channels_last",) if scope == "quick" else ("contiguous", "channels_last")
    return [ModelSetting(1, "float32", 224, f) for f in formats]


_MACS_CACHE: Dict[str, int] = {}


def architecture_macs(variant: ModelVariant, resolution: int = 224) -> int:
    """MACs of one image, counted on the eager build on the CPU: torch's flop counter sees the
    convs, linears and matmuls of the reference but not those inside the fused custom ops, and the
    architecture is the same either way."""
    from metapool_kernels.models import count_macs, mobilenet_v2
    key = f"{variant.enhancer!r}@{resolution}"
    if key not in _MACS_CACHE:
        enh = list(variant.enhancer) if isinstance(variant.enhancer, tuple) else variant.enhancer
        model = mobilenet_v2(enh, fused=False)
        _MACS_CACHE[key] = count_macs(model, (1, 3, resolution, resolution))
    return _MACS_CACHE[key]


def build_model(variant: ModelVariant, num_classes: int = 1000, small_input: bool = False, seed: int = 0):
    from metapool_kernels.models import mobilenet_v2
    torch.manual_seed(seed)
    enh = list(variant.enhancer) if isinstance(variant.enhancer, tuple) else variant.enhancer
    return mobilenet_v2(enh, fused=variant.fused, num_classes=num_classes, small_input=small_input)


def _fused_backend_of(device: str) -> str:
    # "auto" runs the C++ kernels on the CPU and Triton on CUDA (see FusedMetaPooling.forward).
    route = resolve_backend("auto")
    if route == "auto":
        return "triton" if torch.device(device).type == "cuda" else "cpp"
    return route


def model_inference_fn(model, variant: ModelVariant, s: ModelSetting, device: str,
                       compile_backend: str = "inductor") -> Callable[[], Any]:
    """One inference call (no_grad) of a copy of ``model`` in the setting's dtype and layout; a
    compiled variant is compiled afresh (on its first call), in this run's thread count."""
    fmt = MEMORY_FORMATS[s.memory_format]
    m = copy.deepcopy(model).to(device=device, dtype=DTYPES[s.dtype], memory_format=fmt)
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn((s.batch, 3, s.resolution, s.resolution), device=device, dtype=DTYPES[s.dtype],
                    generator=gen).contiguous(memory_format=fmt)
    if variant.compiled:
        torch._dynamo.reset()
        m = torch.compile(m, backend=compile_backend)

    def fn():
        with torch.no_grad():
            return m(x)
    return fn


def run_model_case(variant: ModelVariant, device: str, settings: Sequence[ModelSetting], timing: TimingConfig,
                   *, macs_resolution: Optional[int] = 224, compile_backend: str = "inductor") -> List[Dict[str, Any]]:
    """Inference latency (eval, no_grad) of one model at each setting, with params and MACs; a
    compiled variant is compiled afresh per setting and its first (compiling) call is timed apart."""
    from metapool_kernels.models import count_params
    model = build_model(variant).eval()
    params = count_params(model)
    macs = architecture_macs(variant, macs_resolution) if macs_resolution else None
    enhancer = "genotype" if isinstance(variant.enhancer, tuple) else variant.enhancer
    rows, errors = [], []
    for s in settings:
        row = {"suite": "model", "device": device, "device_name": device_name(device), "variant": variant.key,
               "label": variant.label, "table": variant.table, "enhancer": enhancer, "fused": variant.fused,
               "genotype": list(variant.enhancer) if enhancer == "genotype" else None,
               "impl": (f"FusedMetaPooling -> {_fused_backend_of(device)!r}" if variant.fused else "MetaPooling (eager)")
               if enhancer in ("maxpool", "avgpool", "meta", "genotype") else "timm / torchvision modules",
               "batch": s.batch, "dtype": s.dtype, "resolution": s.resolution, "memory_format": s.memory_format,
               "params": params, "macs": macs, "macs_resolution": macs_resolution, "compiled": variant.compiled,
               "baseline": variant.baseline}
        try:
            fn = model_inference_fn(model, variant, s, device, compile_backend)
            if variant.compiled:
                row["impl"] += f", torch.compile(backend={compile_backend!r})"
                row["compile_s"] = first_call_seconds(fn, device)
            t = measure(fn, device, timing)
            row.update(t.as_row())
            row["images_per_s"] = s.batch / (t.median_ms * 1e-3)
        except Exception as e:
            row["error"] = _error_text(e)
            errors.append(f"{variant.key} {s}: {row['error']}")
        rows.append(row)
    if errors:
        raise BenchError(rows, errors)
    return rows


# =============================================================================================
# Training steps: a PMPL search step against a plain SGD step
# =============================================================================================
TRAIN_VARIANTS: Tuple[Tuple[str, str], ...] = (
    ("plain", "Plain MobileNetV2: SGD step (forward, loss.backward, step)"),
    ("search-eager", "PMPL search step (bilevel_step), eager MetaPooling"),
    ("search-fused", "PMPL search step (bilevel_step), FusedMetaPooling"),
    ("supernet-sgd-fused", "Search supernet, fused: one SGD step on θ only (α frozen)"),
)


@dataclass(frozen=True)
class TrainSetting:
    batch: int
    resolution: int
    num_classes: int
    small_input: bool
    memory_format: str


def train_setting(device: str, scope: str) -> TrainSetting:
    # The search's own format choice: channels_last on the CPU, contiguous on CUDA.
    fmt = "contiguous" if device == "cuda" else "channels_last"
    if scope == "smoke":
        return TrainSetting(2, 32, 10, True, fmt)
    if device == "cuda":
        return TrainSetting(128, 224, 1000, False, fmt)  # the paper's ImageNet batch and size
    return TrainSetting(16, 64, 10, False, fmt)


def train_step_fn(key: str, device: str, setting: TrainSetting) -> Tuple[Callable[[], Any], torch.nn.Module]:
    """(one training step of the variant, its model), on fixed random batches."""
    from metapool_kernels.models import alpha_parameters, mobilenet_v2, weight_parameters
    from metapool_kernels.pmpl.search import SearchConfig, alphas_frozen, bilevel_step, meta_layers

    cfg = SearchConfig()  # the trainer's defaults: SGD and Adam settings of the paper's §3.1
    fmt = MEMORY_FORMATS[setting.memory_format]
    torch.manual_seed(0)
    enhancer = "none" if key == "plain" else "meta"
    model = mobilenet_v2(enhancer, fused=key != "search-eager", num_classes=setting.num_classes,
                         small_input=setting.small_input).to(device=device, memory_format=fmt).train()
    gen = torch.Generator(device=device).manual_seed(5)

    def batch():
        x = torch.randn((setting.batch, 3, setting.resolution, setting.resolution), device=device,
                        generator=gen).contiguous(memory_format=fmt)
        y = torch.randint(0, setting.num_classes, (setting.batch,), device=device, generator=gen)
        return x, y

    b_tr, b_mt = batch(), batch()
    layers = meta_layers(model)
    if key.startswith("search"):
        alphas, weights = alpha_parameters(model), weight_parameters(model)
        w_opt = torch.optim.SGD(weights, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        a_opt = torch.optim.Adam(alphas, lr=cfg.alpha_lr, betas=cfg.alpha_betas, weight_decay=cfg.alpha_weight_decay)

        def step():
            return bilevel_step(model, model, layers, weights, w_opt, a_opt, b_tr, b_mt, lr=cfg.lr)
        return step, model
    params = [p for p in model.parameters() if p.requires_grad]
    if key == "supernet-sgd-fused":
        params = weight_parameters(model)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x, y = b_tr

    def sgd_step():
        opt.zero_grad(set_to_none=True)
        with alphas_frozen(layers):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        return loss
    return sgd_step, model


def run_train_case(key: str, device: str, setting: TrainSetting, timing: TimingConfig) -> List[Dict[str, Any]]:
    from metapool_kernels.models import count_params

    label = dict(TRAIN_VARIANTS)[key]
    row = {"suite": "train", "device": device, "device_name": device_name(device), "variant": key, "label": label,
           "batch": setting.batch, "resolution": setting.resolution, "num_classes": setting.num_classes,
           "small_input": setting.small_input, "memory_format": setting.memory_format, "dtype": "float32"}
    try:
        step, model = train_step_fn(key, device, setting)
        row["params"] = count_params(model)
        t = measure(step, device, timing)
        row.update(t.as_row())
        row["images_per_s"] = setting.batch / (t.median_ms * 1e-3)
    except Exception as e:
        row["error"] = _error_text(e)
        raise BenchError([row], [row["error"]]) from e
    return [row]


# =============================================================================================
# Deployment: the derived network exported to ONNX and run by ONNX Runtime, against PyTorch
# =============================================================================================
DEPLOY_RUNTIMES: Tuple[Tuple[str, str], ...] = (
    ("eager", "PyTorch eager (FusedMetaPooling), channels_last"),
    ("compile", "torch.compile of the same model, channels_last"),
    ("onnxruntime", "ONNX Runtime (CPUExecutionProvider) on the exported ONNX file"),
)


@dataclass(frozen=True)
class DeploySetting:
    batches: Tuple[int, ...]
    resolution: int


def deploy_setting(scope: str) -> DeploySetting:
    return DeploySetting((1,), 32) if scope == "smoke" else DeploySetting((1, 32), 224)


DEPLOY_NETWORKS: Tuple[str, ...] = ("plain", "derived")


def run_deploy_case(runtime: str, genotype: Sequence[str], setting: DeploySetting, timing: TimingConfig,
                    work_dir, *, network: str = "derived", compile_backend: str = "inductor") -> List[Dict[str, Any]]:
    """Inference latency of MobileNetV2-1.0 (ImageNet head, float32), derived or plain, on the host
    CPU under one runtime, at each batch; ONNX Runtime gets torch's thread count. The plain network
    in the same runtime is what the derived one's overhead is read against. Each row records
    ‖logits − eager logits‖ / ‖eager logits‖, so a fast but wrong runtime shows."""
    from pathlib import Path

    from metapool_kernels.export import to_onnx
    from metapool_kernels.models import count_params

    if network not in DEPLOY_NETWORKS:
        raise ValueError(f"network must be one of {DEPLOY_NETWORKS}, got {network!r}")
    label = dict(DEPLOY_RUNTIMES)[runtime]
    variant = (ModelVariant("derived-fused", "Meta-Pooling derived, fused", tuple(genotype), True, 1)
               if network == "derived" else ModelVariant("skip", "Skip (plain MobileNetV2)", "none", True, 1))
    model = build_model(variant).eval()
    threads = torch.get_num_threads()
    base = {"suite": "deploy", "device": "cpu", "device_name": device_name("cpu"), "runtime": runtime, "label": label,
            "network": network, "genotype": list(genotype) if network == "derived" else [], "params": count_params(model), "dtype": "float32",
            "resolution": setting.resolution, "threads": threads}
    rows, errors = [], []
    try:
        gen = torch.Generator().manual_seed(3)
        xs = {b: torch.randn((b, 3, setting.resolution, setting.resolution), generator=gen) for b in setting.batches}
        eager = copy.deepcopy(model).to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = {b: eager(x.contiguous(memory_format=torch.channels_last)) for b, x in xs.items()}
        if runtime == "onnxruntime":
            import onnxruntime
            t0 = time.perf_counter()
            path = to_onnx(model, xs[setting.batches[0]], Path(work_dir) / f"{network}.onnx")
            base.update(export_s=time.perf_counter() - t0, onnxruntime=onnxruntime.__version__,
                        memory_format="contiguous (ONNX)")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name

            def runner(x):
                feed = {name: x.numpy()}
                return lambda: torch.from_numpy(session.run(None, feed)[0])
        else:
            net = eager if runtime == "eager" else torch.compile(eager, backend=compile_backend)
            base["memory_format"] = "channels_last"

            def runner(x):
                x = x.contiguous(memory_format=torch.channels_last)

                def fn():
                    with torch.no_grad():
                        return net(x)
                return fn
    except Exception as e:
        row = dict(base, error=_error_text(e))
        raise BenchError([row], [row["error"]]) from e
    for b in setting.batches:
        row = dict(base, batch=b)
        try:
            fn = runner(xs[b])
            row["first_call_s"] = first_call_seconds(fn, "cpu")
            row["rel_err_vs_eager"] = _rel_err(fn(), expected[b])
            t = measure(fn, "cpu", timing)
            row.update(t.as_row())
            row["images_per_s"] = b / (t.median_ms * 1e-3)
        except Exception as e:
            row["error"] = _error_text(e)
            errors.append(f"{runtime} batch {b}: {row['error']}")
        rows.append(row)
    if errors:
        raise BenchError(rows, errors)
    return rows
