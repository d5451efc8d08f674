"""No upward imports: each layer of prolora_serve imports only the layers below it.

Lowest first: adapters < kernels < server < clients. adapters imports nothing of ours but
itself; kernels also adapters; server also kernels; clients anything. Inside server, the engine
is below the HTTP API and the trainer (which do not import each other), config (the option
definitions, torch-free) is below all of them, and cli.py (the console entry point) above.

Every ``import``/``from ... import`` counts, wherever it stands (module level, inside a
function, under ``if TYPE_CHECKING``), relative ones resolved to their package; so do literal
module names given to ``importlib.import_module`` / ``__import__``, and literal names passed to
a function of the same file that hands its parameter on to ``import_module``.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = "prolora_serve"
LAYERS = ("adapters", "kernels", "server", "clients")  # lowest first

# Inside server: the modules/subpackages a unit must not import (prolora_serve.server.<unit>).
# config < engine < {api, training} < cli: the HTTP API and the trainer both sit on the engine
# and know nothing of each other; only the console entry point (cli.py) sees all of them.
# scaleout (Ray Serve) sits on the API and the engine: nothing below it imports it.
SERVER_UNITS_FORBIDDEN = {
    "config": {"engine", "api", "training", "scaleout", "cli"},
    "engine": {"api", "training", "scaleout", "cli"},
    "api": {"training", "scaleout", "cli"},
    "training": {"api", "scaleout", "cli"},
    "scaleout": {"training", "cli"},
}

# (importing module, imported package) -> why this one upward import is allowed.
EXCEPTIONS = {
    ("prolora_serve.server.cli", "prolora_serve.clients"):
        "the prolora-serve console entry point composes the commands of every layer: its remote "
        "`adapters upload/list/show/delete` commands run the HTTP client",
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. prolora_serve.kernels.pool
    path: Path  # its file
    line: int
    target: str  # imported module (or module.name for `from module import name`)


def package_roots(repo: Path = REPO) -> dict[str, Path]:
    """prolora_serve.<layer> -> its folder (pyproject's package-dir mapping)."""
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: repo / folder for package, folder in setuptools["package-dir"].items()}


def module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name ``from <level dots><module> import ...`` means inside ``source``."""
    base = source.split(".") if is_package else source.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _import_module_target(call: ast.Call) -> ast.AST | None:
    """The name argument of importlib.import_module(...) / __import__(...), else None."""
    if _called_name(call) not in ("import_module", "__import__"):
        return None
    if call.args:
        return call.args[0]
    return next((kw.value for kw in call.keywords if kw.arg == "name"), None)


def _forwarders(tree: ast.Module) -> dict[str, tuple[int, str]]:
    """Functions of this file that pass one of their parameters to import_module: name ->
    (position, parameter name)."""
    found = {}
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = [a.arg for a in func.args.posonlyargs + func.args.args]
        for call in ast.walk(func):
            if isinstance(call, ast.Call):
                arg = _import_module_target(call)
                if isinstance(arg, ast.Name) and arg.id in params:
                    found[func.name] = (params.index(arg.id), arg.id)
    return found


def imports_of(path: Path, source: str) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = source if is_package else source.rpartition(".")[0]
    forwarders = _forwarders(tree)
    found: list[Import] = []

    def add(node: ast.AST, target: str) -> None:
        found.append(Import(source, path, node.lineno, target))

    def add_literal(node: ast.AST, name: str | None, package_arg: ast.AST | None = None) -> None:
        if name is None:
            return
        if name.startswith("."):  # import_module(".x", package=...)
            anchor = _literal(package_arg)
            if anchor is None and isinstance(package_arg, ast.Name) and package_arg.id == "__package__":
                anchor = package
            if anchor is None:
                return
            level = len(name) - len(name.lstrip("."))
            add(node, resolve_relative(anchor, True, level, name.lstrip(".") or None))
        else:
            add(node, name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = (resolve_relative(source, is_package, node.level, node.module) if node.level
                      else node.module)
            for alias in node.names:  # `from pkg import sub` may import the submodule pkg.sub
                add(node, module if alias.name == "*" else f"{module}.{alias.name}")
        elif isinstance(node, ast.Call):
            arg = _import_module_target(node)
            if arg is not None:
                package_arg = next((kw.value for kw in node.keywords if kw.arg == "package"),
                                   node.args[1] if len(node.args) > 1 else None)
                add_literal(node, _literal(arg), package_arg)
            name = _called_name(node)
            if name in forwarders:
                position, param = forwarders[name]
                value = node.args[position] if len(node.args) > position else next(
                    (kw.value for kw in node.keywords if kw.arg == param), None)
                add_literal(node, _literal(value))
    return found


def collect_imports(roots: dict[str, Path]) -> list[Import]:
    found = []
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                found.extend(imports_of(path, module_name(package, root, path)))
    return found


def _unit(module: str, depth: int) -> str | None:
    parts = module.split(".")
    return parts[depth] if len(parts) > depth and parts[0] == TOP else None


def violation(imp: Import) -> str | None:
    """Why this import goes upward, or None if it does not."""
    source_layer, target_layer = _unit(imp.source, 1), _unit(imp.target, 1)
    if source_layer not in LAYERS or target_layer not in LAYERS:
        return None  # not ours (stdlib, torch, ...) or outside the layered folders
    for (source, target), _reason in EXCEPTIONS.items():
        if imp.source == source and (imp.target == target or imp.target.startswith(target + ".")):
            return None
    if LAYERS.index(target_layer) > LAYERS.index(source_layer):
        allowed = ", ".join(LAYERS[: LAYERS.index(source_layer) + 1])
        return f"{source_layer} may import only {allowed}"
    if source_layer == target_layer == "server":
        source_unit, target_unit = _unit(imp.source, 2), _unit(imp.target, 2)
        if target_unit in SERVER_UNITS_FORBIDDEN.get(source_unit, ()):
            return f"server.{source_unit} must not import server.{target_unit}"
    return None


def violations(roots: dict[str, Path]) -> list[str]:
    return [f"{imp.path}:{imp.line}: {imp.source} imports {imp.target} ({why})"
            for imp in collect_imports(roots) if (why := violation(imp))]


# --- the repository -------------------------------------------------------------------------

def test_no_upward_imports() -> None:
    roots = package_roots()
    assert {package.split(".")[1] for package in roots} == set(LAYERS)
    assert violations(roots) == []


def test_checker_sees_the_imports_it_should() -> None:
    """A guard against the checker silently finding nothing: known imports of today's tree."""
    targets = {(imp.source, imp.target) for imp in collect_imports(package_roots())}
    assert ("prolora_serve.kernels.pool", "prolora_serve.adapters.weights.CompactAdapter") in targets
    assert ("prolora_serve.server.cli", "prolora_serve.clients.client.ProloraClient") in targets  # lazy
    assert ("prolora_serve.server.cli", "prolora_serve.server.training.cli") in targets  # by name


def test_every_exception_is_used() -> None:
    """An exception nothing needs any more should go."""
    imports = collect_imports(package_roots())
    for source, target in EXCEPTIONS:
        assert any(imp.source == source and imp.target.startswith(target + ".") for imp in imports), \
            (source, target)


# --- the checker itself, on a synthetic tree ------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in LAYERS:
        (tmp_path / layer).mkdir(exist_ok=True)
        (tmp_path / layer / "__init__.py").touch()
    return {f"{TOP}.{layer}": tmp_path / layer for layer in LAYERS}


def test_checker_passes_downward_imports(tmp_path: Path) -> None:
    roots = _tree(tmp_path, {
        "kernels/pool.py": "from ..adapters.weights import W\nimport prolora_serve.adapters\n",
        "server/engine/__init__.py": "",
        "server/engine/run.py": "from ...kernels import pool\nfrom ..config import X\n",
        "server/api/app.py": "from prolora_serve.server.engine import run\n",
        "clients/client.py": "from prolora_serve.server.api import app\n",
        "adapters/x.py": "from . import y\nfrom .y import z\nimport os, torch\n",
    })
    assert violations(roots) == []


def test_checker_flags_upward_imports(tmp_path: Path) -> None:
    roots = _tree(tmp_path, {
        "adapters/a.py": "from prolora_serve.server import x\n",
        "adapters/b.py": "def f():\n    from ..kernels.pool import P\n",  # lazy, relative
        "adapters/c.py": "import importlib\nm = importlib.import_module('prolora_serve.clients.client')\n",
        "kernels/d.py": "from prolora_serve import server\n",
        "kernels/sub/__init__.py": "from ... import clients\n",
        "server/engine/__init__.py": "",
        "server/engine/e.py": "from ..api import app\n",
        "server/engine/f.py": ("import importlib\n"
                               "def load(name):\n    return importlib.import_module(name)\n"
                               "load('prolora_serve.server.training.trainer')\n"),
        "server/config.py": "from .engine import e\n",
        "server/api/g.py": "from prolora_serve.clients import client\n",  # not the excepted file
        "server/training/h.py": "def f():\n    import prolora_serve.server.api.g\n",
        "server/cli.py": "from prolora_serve.clients import client\nfrom .api import g\n",
    })
    found = violations(roots)
    flagged = {line.split(": ", 2)[1].split(" imports ")[0] for line in found}
    assert flagged == {f"{TOP}.adapters.a", f"{TOP}.adapters.b", f"{TOP}.adapters.c",
                       f"{TOP}.kernels.d", f"{TOP}.kernels.sub", f"{TOP}.server.engine.e",
                       f"{TOP}.server.engine.f", f"{TOP}.server.config", f"{TOP}.server.api.g",
                       f"{TOP}.server.training.h"}, found
    assert len(found) == 10, found  # server/cli.py's import of clients is the named exception


def test_relative_resolution() -> None:
    assert resolve_relative("prolora_serve.kernels.pool", False, 1, "metadata") == "prolora_serve.kernels.metadata"
    assert resolve_relative("prolora_serve.kernels.pool", False, 2, "adapters") == "prolora_serve.adapters"
    assert resolve_relative("prolora_serve.kernels", True, 1, "pool") == "prolora_serve.kernels.pool"
    assert resolve_relative("prolora_serve.server.engine.model", False, 3, None) == "prolora_serve"
