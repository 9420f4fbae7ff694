"""The compiled extension's loader: build information, CUDA kernels compiled wherever a toolkit is,
and the refusal of a stale or missing build with an actionable message."""
from __future__ import annotations

import os
import re
import shutil
import sys

import pytest
import torch

import metapool_kernels
from metapool_kernels import _extension


@pytest.fixture
def checked(monkeypatch):
    # The stale check is what these tests exercise; an environment that skips it would hide it.
    monkeypatch.delenv("METAPOOL_SKIP_STALE_CHECK", raising=False)
    return _extension


def test_build_info_strings():
    C = _extension.C
    assert isinstance(C.source_hash(), str) and re.fullmatch(r"[0-9a-f]{16}", C.source_hash())
    assert isinstance(C.torch_version(), str) and C.torch_version() == torch.__version__
    assert isinstance(C.with_cuda(), bool)
    assert isinstance(_extension.has_cuda_kernels(), bool)
    assert _extension.has_cuda_kernels() == C.with_cuda()


def test_source_hash_matches_sources():
    # The loaded module was accepted, so it was built from the sources in this checkout.
    assert _extension._source_hash() == _extension.C.source_hash()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on PATH")
@pytest.mark.skipif(os.environ.get("METAPOOL_NO_CUDA", "0") in ("1", "true", "yes"),
                    reason="METAPOOL_NO_CUDA turns the CUDA kernels off")
def test_cuda_kernels_compiled_where_toolkit_exists():
    assert _extension.C.with_cuda(), (
        "nvcc is on PATH but metapool_kernels._C was built without CUDA kernels; "
        "rebuild with `pip install -e . --no-build-isolation`")
    assert _extension.has_cuda_kernels()


def test_ops_registered():
    for name in ("strip_gate", "strip_gate_backward"):
        assert hasattr(torch.ops.metapool, name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("metapool::strip_gate", "CPU")
    if _extension.C.with_cuda():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("metapool::strip_gate", "CUDA")


def test_load_accepts_current_build(checked):
    assert checked._load() is checked.C


def test_stale_build_refused(checked, monkeypatch):
    current = checked.C.source_hash()
    monkeypatch.setattr(checked, "_source_hash", lambda: "0" * 16 if current != "0" * 16 else "1" * 16)
    with pytest.raises(ImportError, match="stale") as info:
        checked._load()
    assert "pip install -e ." in str(info.value)
    assert current in str(info.value)


def test_stale_check_can_be_skipped(checked, monkeypatch):
    monkeypatch.setattr(checked, "_source_hash", lambda: "f" * 16)
    monkeypatch.setenv("METAPOOL_SKIP_STALE_CHECK", "1")
    assert checked._load() is checked.C


def test_installed_package_skips_hash(checked, monkeypatch):
    # A non-editable install has no csrc/ to hash: nothing to compare against.
    monkeypatch.setattr(checked, "_source_hash", lambda: None)
    assert checked._load() is checked.C


def test_other_torch_refused(checked, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    with pytest.raises(ImportError, match="built against torch") as info:
        checked._load()
    assert "pip install -e ." in str(info.value)


def test_missing_extension_message(checked, monkeypatch):
    monkeypatch.delattr(metapool_kernels, "_C")
    monkeypatch.setitem(sys.modules, "metapool_kernels._C", None)
    with pytest.raises(ImportError, match="could not be loaded") as info:
        checked._load()
    assert "pip install -e ." in str(info.value)
