"""Deployment: every op of the genotype vocabulary and a derived network through torch.onnx (run
with ONNX Runtime) and torch.export, against the reference, at batch sizes other than the export
example's, in NCHW and channels_last.

Two forms of a layer are exported: the package's modules as they are, and the op form, one call of
``metapool::meta_pool`` (on CPU tensors it runs in the Triton interpreter here).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import metapool_kernels.ops.meta_pool  # noqa: F401  (defines metapool::meta_pool)
from metapool_kernels import PAPER_CANDIDATES, FusedMetaPooling, MetaPooling
from metapool_kernels.export import (decomposition_table, meta_pool_decomposition, onnx_op_types,
                                     separable_local_op, strip_gate_decomposition, to_onnx)
from metapool_kernels.models import mobilenet_v2
from metapool_kernels.reference import local_op

pytestmark = pytest.mark.usefixtures("one_thread")

# Max abs error on unit-scale inputs (the float32 bound).
ATOL = 1e-4
# What a Meta-Pooling layer may become in ONNX: pooling, means, convs, the gate's sigmoid and the
# mixture's arithmetic, plus the shape plumbing between them.
ALLOWED_ONNX_OPS = {"AveragePool", "MaxPool", "ReduceMean", "Conv", "MatMul", "Gemm", "Sigmoid", "Mul", "Add",
                    "Identity", "Unsqueeze", "Squeeze", "Reshape", "Clip", "Relu", "Flatten",
                    "GlobalAveragePool"}
# Every op of the vocabulary, each at least once, for the whole-network tests (17 blocks).
ALL_OPS_GENOTYPE = ["avg3", "max3", "strip", "max5", "skip", "avg5", "strip", "avg7", "skip",
                    "max7", "strip", "avg3", "strip", "max3", "skip", "avg5", "max7"]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def fixed_layer(op: str, channels: int = 6, seed: int = 0) -> FusedMetaPooling:
    torch.manual_seed(seed)
    layer = FusedMetaPooling(channels, (op,))
    layer.fix(op)
    return layer.eval()


def searchable_layer(channels: int = 6, seed: int = 0) -> FusedMetaPooling:
    torch.manual_seed(seed)
    layer = FusedMetaPooling(channels)
    torch.nn.init.normal_(layer.alpha)
    return layer.eval()


class OpForm(torch.nn.Module):
    """A layer as one ``metapool::meta_pool`` call (π = 1 for a fixed layer's single op)."""

    def __init__(self, layer: MetaPooling):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        names = (layer.fixed,) if layer.fixed is not None else layer.candidates
        pi = torch.ones(1) if layer.fixed is not None else torch.softmax(layer.alpha, 0)
        gates = ((layer.gate_h.weight, layer.gate_h.bias, layer.gate_w.weight, layer.gate_w.bias)
                 if layer.gate_h is not None else (None,) * 4)
        return torch.ops.metapool.meta_pool(x, pi, *gates, ",".join(names))[0]


def reference_of(layer: FusedMetaPooling) -> MetaPooling:
    ref = MetaPooling(layer.channels, layer.candidates)
    ref.load_state_dict(layer.state_dict())
    return ref.eval()


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with every FusedMetaPooling replaced by the reference MetaPooling."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FusedMetaPooling):
                setattr(module, child_name, reference_of(child))
    return ref.eval()


def inputs(shape, fmt: str = "contiguous", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).contiguous(memory_format=FORMATS[fmt])


def small_derived_network(fmt: str = "contiguous") -> torch.nn.Module:
    """A derived MobileNetV2 x0.35 for 28x28 grey images, BatchNorm statistics measured on unit-scale
    inputs: with its initial statistics an untrained network shrinks activations by orders of
    magnitude per block, and its logits would meet any absolute tolerance."""
    torch.manual_seed(0)
    model = mobilenet_v2(ALL_OPS_GENOTYPE, width_mult=0.35, num_classes=10, in_chans=1, small_input=True)
    model = model.to(memory_format=FORMATS[fmt])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of the calibration batch
    with torch.no_grad():
        model.train()(inputs((32, 1, 28, 28), fmt, seed=99))
    return model.eval()


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})
    return torch.from_numpy(out)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = (out - ref).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def metapool_nodes(ep) -> list:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "metapool" in str(n.target)]


# ---------------------------------------------------------------------------------------------
# ONNX Runtime.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["module", "op"])
@pytest.mark.parametrize("op", PAPER_CANDIDATES)
def test_each_op_round_trips_through_onnx_runtime(op, form, tmp_path):
    layer = fixed_layer(op)
    model = layer if form == "module" else OpForm(layer).eval()
    path = to_onnx(model, inputs((2, 6, 9, 11)), tmp_path / f"{op}.onnx")
    proto = onnx.load(str(path))
    assert set(onnx_op_types(proto)) <= ALLOWED_ONNX_OPS, onnx_op_types(proto)
    assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import), list(proto.opset_import)
    assert max(o.version for o in proto.opset_import) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), "the batch dimension is not dynamic"
    ref = reference_of(layer)
    for batch, fmt in ((1, "contiguous"), (5, "channels_last")):
        x = inputs((batch, 6, 9, 11), fmt, seed=batch)
        assert_close(run_onnx(path, x), ref(x), f"{op} ({form}), batch {batch}, {fmt}")


@pytest.mark.parametrize("form", ["module", "op"])
def test_searchable_mixture_round_trips_through_onnx_runtime(form, tmp_path):
    layer = searchable_layer()
    model = layer if form == "module" else OpForm(layer).eval()
    path = to_onnx(model, inputs((2, 6, 8, 8)), tmp_path / "mix.onnx")
    x = inputs((3, 6, 8, 8))
    assert_close(run_onnx(path, x), reference_of(layer)(x), f"mixture of every op ({form})")


# One layout per exporter keeps the suite fast: the per-op tests cover both layouts through both.
@pytest.mark.parametrize("fmt", ["channels_last"])
def test_derived_network_round_trips_through_onnx_runtime(fmt, tmp_path):
    model = small_derived_network(fmt)
    # to_onnx checks that every node is a standard op (torchvision's classifier adds shape ops in channels_last).
    path = to_onnx(model, inputs((2, 1, 28, 28), fmt), tmp_path / "net.onnx")
    ref = reference_model(model)
    for batch in (1, 7):
        x = inputs((batch, 1, 28, 28), fmt, seed=batch)
        with torch.no_grad():
            expected = ref(x)
        assert expected.abs().max() > 0.1, "logits too small for the tolerance to mean anything"
        assert_close(run_onnx(path, x), expected, f"derived network, batch {batch}, {fmt}")


def test_derived_network_through_the_torchscript_onnx_exporter(tmp_path):
    # torch.onnx.export(..., dynamo=False): the exporter many deployment scripts still call.
    model = small_derived_network()
    path = tmp_path / "legacy.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(model, (inputs((2, 1, 28, 28)),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    proto = onnx.load(str(path))
    assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import), list(proto.opset_import)
    assert {"MaxPool", "AveragePool"} <= set(onnx_op_types(proto)), onnx_op_types(proto)
    ref = reference_model(model)
    for batch in (1, 5):
        x = inputs((batch, 1, 28, 28), seed=batch)
        with torch.no_grad():
            expected = ref(x)
        assert_close(run_onnx(path, x), expected, f"legacy export, batch {batch}")
    # The layers' state (which op each one is fixed to) is still saved and restored as before.
    assert any(k.endswith("_extra_state") for k in model.state_dict())


def test_traced_network_runs_without_the_package(tmp_path):
    import subprocess
    import sys
    model = small_derived_network()
    x = inputs((3, 1, 28, 28), seed=4)
    traced = torch.jit.trace(model, (x,))
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(tmp_path / "ref.npy", reference_model(model)(x).numpy())
    # A fresh interpreter that cannot import metapool_kernels at all.
    probe = (f"import sys; sys.modules['metapool_kernels'] = None; import numpy as np, torch; "
             f"m = torch.jit.load({str(path)!r}); x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})); "
             f"err = (m(x) - torch.from_numpy(np.load({str(tmp_path / 'ref.npy')!r}))).abs().max().item(); "
             f"print('max abs error', err); sys.exit(0 if err <= {ATOL} else 1)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("what", ["layer", "network"])
def test_scripting_is_refused_with_what_to_use(what):
    target = fixed_layer("max5") if what == "layer" else small_derived_network()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.jit\.trace.*torch\.export"):
        torch.jit.script(target)


def test_to_onnx_refuses_a_training_mode_model(tmp_path):
    with pytest.raises(ValueError, match="eval"):
        to_onnx(fixed_layer("max3").train(), inputs((2, 6, 8, 8)), tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------------------
# torch.export.
# ---------------------------------------------------------------------------------------------
def export_dynamic(model, x):
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.mark.parametrize("form", ["module", "op"])
@pytest.mark.parametrize("op", PAPER_CANDIDATES)
def test_each_op_round_trips_through_torch_export(op, form):
    layer = fixed_layer(op)
    model = layer if form == "module" else OpForm(layer).eval()
    ep = export_dynamic(model, inputs((2, 6, 9, 11)))
    lowered = ep.run_decompositions(decomposition_table())
    assert metapool_nodes(lowered) == [], "the package's ops survived run_decompositions(decomposition_table())"
    ref = reference_of(layer)
    for batch, fmt in ((3, "contiguous"), (1, "channels_last")):
        x = inputs((batch, 6, 9, 11), fmt, seed=batch)
        assert_close(ep.module()(x), ref(x), f"{op} ({form}), exported program, batch {batch}, {fmt}")
        assert_close(lowered.module()(x), ref(x), f"{op} ({form}), core ATen program, batch {batch}, {fmt}")


@pytest.mark.parametrize("fmt", ["contiguous"])
def test_derived_network_round_trips_through_torch_export(fmt):
    model = small_derived_network(fmt)
    ep = export_dynamic(model, inputs((2, 1, 28, 28), fmt))
    lowered = ep.run_decompositions(decomposition_table())
    assert metapool_nodes(lowered) == []
    ref = reference_model(model)
    x = inputs((5, 1, 28, 28), fmt, seed=5)
    with torch.no_grad():
        expected = ref(x)
        assert expected.abs().max() > 0.1, "logits too small for the tolerance to mean anything"
        assert_close(ep.module()(x), expected, f"derived network, exported program, {fmt}")
        assert_close(lowered.module()(x), expected, f"derived network, core ATen program, {fmt}")


# ---------------------------------------------------------------------------------------------
# The decompositions themselves.
# ---------------------------------------------------------------------------------------------
def fake_and_real(op_call, decomposition, args):
    """The op's fake-kernel outputs and the decomposition's outputs on the same arguments."""
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op_call(*fake_args)
    return fake, decomposition(*args)


def assert_same_metadata(fake, real, what):
    fake = fake if isinstance(fake, tuple) else (fake,)
    real = real if isinstance(real, tuple) else (real,)
    for i, (f, r) in enumerate(zip(fake, real)):
        got = (tuple(r.shape), r.dtype, r.stride())
        expected = (tuple(f.shape), f.dtype, f.stride())
        assert got == expected, f"{what}, output {i}: decomposition gives {got}, the fake kernel {expected}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decompositions_give_the_fake_kernels_layout(fmt, dtype):
    """FakeTensorMode propagates shapes through the decompositions when sizes are symbolic
    (torch.compile(dynamic=True)): their outputs must look exactly like the kernels'."""
    x = inputs((2, 4, 5, 7), fmt).to(dtype)
    g_h, g_w = torch.randn(2, 4, 5), torch.randn(2, 4, 7)
    for extra in ((), (x.clone(), torch.tensor(0.3))):
        fake, real = fake_and_real(torch.ops.metapool.strip_gate, strip_gate_decomposition, [x, g_h, g_w, *extra])
        assert_same_metadata(fake, real, f"strip_gate, {fmt}, {dtype}, base/weight: {bool(extra)}")
    layer = searchable_layer(4)
    gates = [layer.gate_h.weight, layer.gate_h.bias, layer.gate_w.weight, layer.gate_w.bias]
    for names, pi, g in ((("max5",), torch.ones(1), [None] * 4), (("strip",), torch.ones(1), gates),
                         (layer.candidates, layer.probs().detach(), gates)):
        fake, real = fake_and_real(torch.ops.metapool.meta_pool, meta_pool_decomposition, [x, pi, *g, ",".join(names)])
        assert_same_metadata(fake, real, f"meta_pool {names}, {fmt}, {dtype}")


@pytest.mark.parametrize("op", PAPER_CANDIDATES)
def test_meta_pool_decomposition_of_a_fixed_layer_without_weights(op):
    """π = None is a fixed layer: its one op, unweighted, never the input tensor itself."""
    layer = fixed_layer(op)
    gates = ((layer.gate_h.weight, layer.gate_h.bias, layer.gate_w.weight, layer.gate_w.bias)
             if op == "strip" else (None,) * 4)
    x = inputs((2, 6, 9, 11))
    out, z_h, z_w = meta_pool_decomposition(x, None, *gates, op)
    assert_close(out, reference_of(layer)(x), op)
    assert out.data_ptr() != x.data_ptr()
    assert z_h.shape == ((2, 6, 9) if op == "strip" else (2, 6, 0))
    assert z_w.shape == ((2, 6, 11) if op == "strip" else (2, 6, 0))


def test_compiled_dynamic_channels_last_layer_still_runs_the_kernels(monkeypatch):
    """Under dynamic shapes FakeTensorMode reads the registered decompositions; inductor's code still
    calls the package's op, checks its output strides against the fake ones, and gives the eager
    numbers at a second batch size too. With CI set, inductor refuses a fallback to an op that has a
    decomposition unless the op is on its allow-list: the package puts its ops there."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("CI", "true")

    layer = fixed_layer("strip")
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    # Compiled from scratch: a cached graph would skip the shape propagation under test.
    no_cache = (torch._inductor.config.patch(fx_graph_cache=False),
                torch._functorch.config.patch(enable_autograd_cache=False))
    for batch in (2, 3):
        x = inputs((batch, 6, 9, 11), "channels_last", seed=batch)
        with torch.no_grad(), no_cache[0], no_cache[1]:
            out, code = run_and_get_code(compiled, x)
            expected = layer(x)
        assert out.stride() == expected.stride()
        assert_close(out, expected, f"compiled strip layer, batch {batch}")
        if batch == 2:
            assert any("metapool.meta_pool" in c for c in code), "the compiled code lost the kernel"


def test_onnx_runtime_output_is_not_trivially_the_input(tmp_path):
    """The round trip can fail: a max7 layer's ONNX output differs from its input and from avg7's."""
    x = inputs((2, 6, 9, 11))
    out = run_onnx(to_onnx(fixed_layer("max7"), x, tmp_path / "m.onnx"), x)
    assert not torch.allclose(out, x)
    assert not np.allclose(out.numpy(), reference_of(fixed_layer("avg7"))(x).detach().numpy(), atol=ATOL)


# ---------------------------------------------------------------------------------------------
# The command line: `python -m metapool_kernels.pmpl export`.
# ---------------------------------------------------------------------------------------------
def write_checkpoint(path, kind: str = "train"):
    """A retrain checkpoint of the small derived network on Fashion-MNIST."""
    import dataclasses

    from metapool_kernels.pmpl.networks import model_config
    from metapool_kernels.pmpl.runs import CHECKPOINT_ENTRIES, CHECKPOINT_VERSION, save_checkpoint
    from metapool_kernels.pmpl.train import TrainConfig

    config = model_config(ALL_OPS_GENOTYPE, width_mult=0.35, num_classes=10, in_chans=1, small_input=True,
                          candidates=PAPER_CANDIDATES, seed=0)
    model = small_derived_network()
    # Export reads the model alone; the training state a checkpoint also holds is left empty.
    state = {name: (types[0] if isinstance(types, tuple) else types)() for name, types in CHECKPOINT_ENTRIES[kind].items()}
    state.update(kind=kind, version=CHECKPOINT_VERSION, config=dataclasses.asdict(TrainConfig()),
                 model_config=config, model=model.state_dict())
    save_checkpoint(state, path)
    return path


def test_cli_exports_a_checkpoint_and_verifies_it_on_test_images(tmp_path, capsys):
    from metapool_kernels.pmpl.cli import main

    ckpt = write_checkpoint(tmp_path / "checkpoint.pt")
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--images", "150"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and str(out.resolve()) in text
    assert "on 150 Fashion-MNIST test images" in text and "top-1 agreement with PyTorch" in text
    agreement = float(text.split("top-1 agreement with PyTorch ")[1].split(" %")[0])
    assert agreement >= 99.0
    proto = onnx.load(str(out))
    assert tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]) == (1, 28, 28)


def test_cli_export_says_what_is_wrong(tmp_path, capsys):
    from metapool_kernels.pmpl.cli import main

    search = write_checkpoint(tmp_path / "search.pt", kind="search")
    assert main(["export", "--checkpoint", str(search), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "is a 'search' checkpoint, expected a 'train' one" in capsys.readouterr().err
    train = write_checkpoint(tmp_path / "train.pt")
    assert main(["export", "--checkpoint", str(train), "--out", str(tmp_path / "m.onnx"), "--images", "20",
                 "--atol", "-1"]) == 2
    assert "ONNX Runtime's logits differ from PyTorch's" in capsys.readouterr().err


def test_cli_export_help(capsys):
    from metapool_kernels.pmpl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--out" in out and "ONNX Runtime" in out


# ---------------------------------------------------------------------------------------------
# Separable windows.
# ---------------------------------------------------------------------------------------------
LOCAL_OPS = [op for op in PAPER_CANDIDATES if op not in ("skip", "strip")]


@pytest.mark.parametrize("op", LOCAL_OPS)
def test_separable_local_op_equals_the_square_window(op):
    g = torch.Generator().manual_seed(7)
    # Odd sizes smaller than the window (borders meet), repeated values (ties), a NaN and ±inf.
    x = torch.randint(-3, 4, (2, 3, 5, 9), generator=g).double() + torch.rand(2, 3, 5, 9, generator=g,
                                                                                dtype=torch.float64)
    x[0, 0, 2, 4] = float("nan")
    x[1, 2, 0, 0], x[1, 1, 4, 8] = float("inf"), float("-inf")
    ref = local_op(op, x)
    out = separable_local_op(op, x)
    if op.startswith("max"):
        assert torch.equal(out.isnan(), ref.isnan()), f"{op}: NaN positions differ"
        assert torch.equal(out.nan_to_num(), ref.nan_to_num()), f"{op}: the separable max is not exact"
    else:
        finite = ref.isfinite()
        assert torch.equal(finite, out.isfinite()), f"{op}: non-finite positions differ"
        torch.testing.assert_close(out[finite], ref[finite], rtol=1e-14, atol=1e-14)
        xf = torch.randn(2, 4, 7, 7, generator=g)
        torch.testing.assert_close(separable_local_op(op, xf), local_op(op, xf), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", LOCAL_OPS)
def test_onnx_graph_holds_separable_windows(op, tmp_path):
    k = int(op[3:])
    proto = onnx.load(str(to_onnx(fixed_layer(op), inputs((1, 6, 9, 9)), tmp_path / f"{op}.onnx")))
    pools = [n for n in proto.graph.node if n.op_type in ("MaxPool", "AveragePool")]
    shapes = sorted(tuple(a.ints) for n in pools for a in n.attribute if a.name == "kernel_shape")
    assert shapes == sorted([(1, k), (k, 1)]), f"{op}: pooling windows {shapes}, expected a 1x{k} and a {k}x1 pass"
    x = inputs((3, 6, 9, 9), seed=5)
    if op.startswith("max"):
        out = run_onnx(tmp_path / f"{op}.onnx", x)
        assert torch.equal(out, local_op(op, x)), f"{op}: ONNX Runtime's separable max is not exact"
