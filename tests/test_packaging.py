"""A built (non-editable) wheel works: it ships every file the package reads at run time, and
installed on its own it builds and picks the fused C++ CPU kernels instead of falling back.

The wheel is built from a copy of the source tree (what an in-tree build reads), so the build
leaves no build/ or egg-info behind in the checkout and no stale build/lib from an earlier run
can slip into it. It is installed with ``pip install --target`` and imported in a subprocess
whose cwd lies outside the repository, with only that folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Not part of a source tree a wheel is built from (the .gitignore entries, plus the git folder).
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
              ".pytest_cache", ".hypothesis", "test-artifacts", ".whl", ".gl")


def package_dirs() -> dict[str, Path]:
    """Each distributed package's folder in the repository (pyproject's package-dir mapping)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = setuptools["package-dir"]
    return {package: REPO / roots[package] for package in roots}


def test_pyproject_lists_every_package() -> None:
    """Every folder with an __init__.py under a mapped root is a listed package (else a wheel
    silently lacks it)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for package, root in package_dirs().items():
        for init in root.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join([package, *init.parent.relative_to(root).parts]))
    assert found <= listed, f"packages missing from pyproject [tool.setuptools] packages: {sorted(found - listed)}"


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist"), str(source)],
                   check=True, cwd=tmp, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("prolora_serve-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed_wheel(built_wheel: Path) -> Path:
    site = built_wheel.parent.parent / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(built_wheel)],
                   check=True, capture_output=True, text=True)
    return site


def test_wheel_ships_every_package_file(built_wheel: Path) -> None:
    """Every file under the package folders (sources, the kernels' C++ sources and headers, the
    dashboard's static files) is in the wheel at its package path."""
    with zipfile.ZipFile(built_wheel) as wheel:
        shipped = set(wheel.namelist())
    expected = set()
    for package, root in package_dirs().items():
        for path in root.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                expected.add("/".join([*package.split("."), *path.relative_to(root).parts]))
    assert expected - shipped == set(), "files the wheel lacks"
    for name in ("cpu_kernels.h", "cpu_lanes.h", "cpu_bindings.cpp", "cpu_gathered.cpp",
                 "cpu_attention.cpp"):  # what kernels/cpu_extension.py hashes and compiles
        assert f"prolora_serve/kernels/{name}" in shipped
    assert "prolora_serve/server/api/static/index.html" in shipped


@pytest.fixture(scope="module")
def run_installed(installed_wheel: Path, tmp_path_factory: pytest.TempPathFactory):
    """Run a snippet against the installed wheel alone; the extension is built from its files
    into a fresh TORCH_EXTENSIONS_DIR (shared by this module's tests, so it is built once)."""
    outside = tmp_path_factory.mktemp("cwd")
    extensions = tmp_path_factory.mktemp("torch_extensions")
    env = {**os.environ, "PYTHONPATH": str(installed_wheel), "TORCH_EXTENSIONS_DIR": str(extensions)}
    prelude = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import torch
        import prolora_serve, prolora_serve.kernels
        site = Path({str(installed_wheel)!r}).resolve()
        assert Path(prolora_serve.kernels.__file__).resolve().is_relative_to(site), prolora_serve.kernels.__file__
    """)
    epilogue = textwrap.dedent("""
        foreign = sorted(m.__name__ for m in list(sys.modules.values())
                         if m.__name__.startswith("prolora_serve.") and getattr(m, "__file__", None)
                         and not Path(m.__file__).resolve().is_relative_to(site))
        assert not foreign, f"imported from outside the installed wheel: {foreign}"
    """)

    def run(snippet: str) -> tuple[dict, str]:
        code = prelude + textwrap.dedent(snippet) + epilogue
        done = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    return run


@pytest.mark.slow  # compiles the C++ extension from the wheel's files (~40 s on 2 cores)
def test_installed_wheel_uses_fused_cpu_adapter_kernel(run_installed) -> None:
    result, stderr = run_installed("""
        backend = prolora_serve.kernels.get_backend("auto", "cpu", torch.float32)
        print(json.dumps({"backend": backend.name}))
    """)
    assert result == {"backend": "cpu"}, stderr
    assert "unavailable" not in stderr


@pytest.mark.slow  # the extension is usually built by the test above; alone, it builds it
def test_installed_wheel_uses_fused_cpu_decode_attention(run_installed) -> None:
    """Contract: ``prolora_serve.kernels.get_decode_attention(device_type, dtype)`` returns the
    decode attention chosen for that cache, whose ``name`` is "cpu" for the fused C++ kernel
    and "sdpa" for the torch fallback."""
    result, stderr = run_installed("""
        from prolora_serve.kernels import get_decode_attention
        print(json.dumps({"decode": get_decode_attention("cpu", torch.float32).name}))
    """)
    assert result == {"decode": "cpu"}, stderr
    assert "unavailable" not in stderr
