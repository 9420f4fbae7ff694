"""The package as a project depending on it gets it: built from a clone by pip into a fresh
environment that already has torch, and imported from outside the source tree."""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def copy_clone(dest: Path) -> Path:
    """The sources a clone has: no built extension, no build folder, no caches."""
    ignore = shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "*.egg-info")
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("csrc", "metapool_kernels"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra)
    return env


def run(cmd, cwd, env, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def test_setup_without_torch_says_what_to_do(tmp_path):
    # What pip's isolated build hits: setup.py run where torch cannot be imported.
    probe = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info']; "
             "import runpy; runpy.run_path('setup.py', run_name='__main__')")
    code, out = run([sys.executable, "-c", probe], cwd=copy_clone(tmp_path / "clone"),
                    env=clean_env(METAPOOL_NO_CUDA="1"), timeout=120)
    assert code != 0
    assert "Traceback" not in out, out
    assert "--no-build-isolation" in out and "install torch first" in out, out


@pytest.mark.install
def test_pip_install_no_build_isolation_into_fresh_venv(tmp_path):
    src = copy_clone(tmp_path / "clone")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # The fresh environment reuses this interpreter's torch (and pip, setuptools, ninja) through a
    # .pth file rather than downloading them.
    venv_site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    parents = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (venv_site / "parent_env.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    env = clean_env(METAPOOL_NO_CUDA="1", MAX_JOBS="2", PIP_DISABLE_PIP_VERSION_CHECK="1")

    code, out = run([str(py), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                     str(src)], cwd=tmp_path, env=env)
    assert code == 0, out[-4000:]
    installed = Path(subprocess.check_output(
        [str(py), "-c", "import metapool_kernels; print(metapool_kernels.__file__)"],
        cwd=tmp_path, env=env, text=True).strip())
    assert installed.is_relative_to(venv), installed

    check = """
import torch, metapool_kernels
from metapool_kernels import FusedMetaPooling, MetaPooling
torch.manual_seed(0)
ref = MetaPooling(6)
with torch.no_grad():
    ref.alpha.normal_()
fused = FusedMetaPooling(6)
fused.load_state_dict(ref.state_dict())
x = torch.randn(2, 6, 9, 7, requires_grad=True)
torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
print("op ok")
"""
    code, out = run([str(py), "-c", check], cwd=tmp_path, env=env, timeout=300)
    assert code == 0 and "op ok" in out, out[-4000:]

    # Inside the clone the unbuilt sources shadow the installed package: a clear error, not a
    # circular-import one.
    code, out = run([str(py), "-c", "import metapool_kernels"], cwd=src, env=env, timeout=300)
    assert code != 0
    assert "source tree" in out and "outside the clone" in out and "circular" not in out, out[-4000:]

    code, out = run([str(py), "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                     "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path, env=env)
    assert code == 0, out[-4000:]
    wheels = list((tmp_path / "dist").glob("metapool_kernels-*.whl"))
    assert len(wheels) == 1, out[-4000:]


def test_trainer_without_its_extra_says_which_extra(tmp_path):
    # A base install has the kernels but not torchvision/timm; the trainer names what to install.
    probe = ("import sys; sys.modules['timm'] = None; sys.argv = ['pmpl', '--help']; "
             "import runpy; runpy.run_module('metapool_kernels.pmpl', run_name='__main__')")
    code, out = run([sys.executable, "-c", probe], cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert code != 0
    assert "needs timm" in out and "'train' extra" in out, out[-3000:]
    assert "circular" not in out, out[-3000:]
