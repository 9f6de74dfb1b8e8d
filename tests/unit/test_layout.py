"""The layout's one rule: imports run downwards. Core <- image <- video; core <- jobs; everything <- protocols.

Deployment modules import serve_app and `deployments.handles`, never each other (`app.py` binds them all)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# a package may import a package of a strictly lower rank, or itself; equal ranks are siblings that must not meet
RANKS = {"core": 0, "image": 1, "jobs": 1, "video": 2, "protocols": 3, "batch": 4, "ui": 4}
ENTRY_POINTS = {"serve_app.main", "serve_app.cli"}  # start Ray and bind the graph: may import anything
SHARED_DEPLOYMENT_MODULES = {"deployments.handles"}
BINDER = "deployments.app"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> list[tuple[int, list[str]]]:
    """Per import statement (function-local ones too, relative ones resolved): its line and the modules it may name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, [base, *(f"{base}.{alias.name}" for alias in node.names)]))  # `from pkg import mod`
    return found


def feature(module: str) -> str | None:
    """The package under serve_app a module belongs to (`core`, `image`...), or None for the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else None


def violations(root: Path) -> list[str]:
    """Every upward or sideways import under root/serve_app and root/deployments, as readable lines."""
    found = []
    for path in sorted((root / "serve_app").rglob("*.py")) + sorted((root / "deployments").rglob("*.py")):
        module = module_name(root, path)
        for line, targets in sorted(imports_of(path, module)):
            problems = [(target, _check(module, target)) for target in targets]
            target, problem = next(((t, p) for t, p in problems if p), (None, None))
            if problem:
                found.append(f"{path.relative_to(root)}:{line}: imports {target} ({problem})")
    return found


def _check(module: str, target: str) -> str | None:
    if module.startswith("deployments"):
        if not target.startswith("deployments.") or target.rpartition(".")[0] != "deployments":
            return None
        if module == BINDER or target in SHARED_DEPLOYMENT_MODULES or target == module:
            return None
        if module in SHARED_DEPLOYMENT_MODULES:
            return "the shared handle module must not import a deployment module"
        return "deployment modules must not import each other; move what both need to deployments/handles.py"
    if module in ENTRY_POINTS or not module.startswith("serve_app"):
        return None
    if target.startswith("deployments"):
        return "serve_app must not know about Ray Serve deployments"
    if not target.startswith("serve_app.") or target in ENTRY_POINTS:
        return None
    source, dest = feature(module), feature(target)
    if dest is None or source == dest:
        return None
    if source is None:
        return f"top-level serve_app modules belong in a package; {module} imports a feature"
    if source not in RANKS or dest not in RANKS:
        return f"unknown package {source if source not in RANKS else dest}: give it a rank in tests/unit/test_layout.py"
    if RANKS[dest] >= RANKS[source]:
        return f"{source} (rank {RANKS[source]}) may only import packages below it, not {dest} (rank {RANKS[dest]})"
    return None


def test_every_import_runs_downwards():
    assert violations(ROOT) == []


def test_every_package_says_its_job():
    for init in sorted((ROOT / "serve_app").rglob("__init__.py")) + [ROOT / "deployments" / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{init.relative_to(ROOT)} needs a one-line docstring"


def test_every_serve_app_package_has_a_rank():
    packages = {p.parent.name for p in (ROOT / "serve_app").glob("*/__init__.py")}
    assert packages <= set(RANKS), f"give these packages a rank: {sorted(packages - set(RANKS))}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"serve_app/__init__.py": "", "deployments/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"serve_app/core/http.py": "from serve_app.protocols import native\n"}, "core (rank 0)"),
        ({"serve_app/core/cache.py": "def f():\n    from serve_app.image.engine import ImageEngine\n"}, "core (rank 0)"),
        ({"serve_app/image/engine.py": "from ..video import session\n"}, "image (rank 1)"),
        ({"serve_app/jobs/store.py": "import serve_app.image.models\n"}, "jobs (rank 1)"),
        ({"serve_app/image/service.py": "from deployments.handles import RayGraph\n"}, "Ray Serve deployments"),
        ({"deployments/jobs.py": "from deployments.ingress import RayGraph\n"}, "must not import each other"),
        ({"deployments/handles.py": "from deployments import video\n"}, "shared handle module"),
    ],
)
def test_an_upward_import_is_caught(tmp_path, files, expected):
    found = violations(_tree(tmp_path, files))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "files",
    [
        {"serve_app/video/io.py": "from serve_app.image import codecs\nfrom serve_app.core.errors import BadRequest\n"},
        {"serve_app/protocols/oxen.py": "from serve_app.jobs.backend import x\nfrom serve_app.video import io\n"},
        {"serve_app/image/engine.py": "from . import postprocess\nfrom .geometry import nms\n"},
        {"deployments/app.py": "from deployments.ingress import Ingress\nfrom deployments.jobs import JobStore\n"},
        {"deployments/jobs.py": "from deployments.handles import RayGraph\n"},
        {"serve_app/main.py": "from deployments.app import build_app\n"},
    ],
)
def test_a_downward_import_is_allowed(tmp_path, files):
    assert violations(_tree(tmp_path, files)) == []


def test_test_modules_have_unique_basenames():
    """tests/unit and tests/integration are not packages: pytest imports each test module by its basename, and a
    second module of the same name stops the whole run at collection ("import file mismatch")."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


CPU_SIDE = ("deployments.ingress", "deployments.cache", "deployments.jobs", "deployments.ui",
            "deployments.stream")  # the VideoStreams registry; its StreamActor imports the model in its __init__


def test_the_cpu_side_deployments_never_import_torch():
    """The ingress, cache, job store and runner, web UI and streams registry load no model: importing torch would
    cost each of their processes 1.5 s of CPU at start and ~184 MB of RSS. Run in a fresh interpreter, as a replica
    imports its class."""
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            f"for name in {CPU_SIDE!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
