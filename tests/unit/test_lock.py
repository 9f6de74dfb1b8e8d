"""requirements/*.lock agree with pyproject.toml: what `make install` and the images install is what pyproject asks for.

- each lock's header carries the digest of what it was compiled from (pyproject's dependency tables, or
  requirements/no-deps.in); an edit of those without `make lock` fails here and says to run it;
- every requirement of pyproject (dependencies, build-system, the extras the locks cover) is pinned in each main
  lock at a version its specifier allows, and the locks are closed: each locked package's own requirements (read
  from the installed metadata of the same version) are locked too, since they are installed with --no-deps;
- every package has at least one hash, no lock holds what pyproject keeps out (opencv-python), and no lock names a
  host or a path of the machine that wrote it;
- torch: cpu.lock pins the Makefile's TORCH_VERSION +cpu and no CUDA wheel, cuda.lock the plain build with them;
- this environment is the lock: the suite runs on exactly the pins it was green on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _load_lock_module():
    spec = importlib.util.spec_from_file_location("sam3_requirements_lock", ROOT / "requirements" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lock = _load_lock_module()
MAIN = ("cpu", "cuda")
SELF = canonicalize_name("sam3-serve")
# the environment the locks are compiled for (requirements/lock.py: Python 3.11, x86_64-manylinux_2_28)
TARGET = {"python_version": lock.PYTHON_VERSION, "python_full_version": f"{lock.PYTHON_VERSION}.0",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


@cache
def locked(kind: str) -> dict[str, tuple[str, list[str]]]:
    return lock.parse_lock(lock.LOCKS[kind].read_text())


def torch_version() -> str:
    match = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets no TORCH_VERSION"
    return match.group(1)


def digest_problems(pyproject: Path, lock_file: Path) -> list[str]:
    """Why `lock_file` is stale against `pyproject` (empty when it is not)."""
    header = [line for line in lock_file.read_text().splitlines()[:10] if line.startswith(lock.DIGEST_LINE)]
    if not header:
        return [f"{lock_file.name} has no `{lock.DIGEST_LINE.strip()}` header line: run `make lock`"]
    recorded, current = header[0].removeprefix(lock.DIGEST_LINE).strip(), lock.pyproject_digest(pyproject)
    if recorded != current:
        return [f"pyproject.toml's dependency tables changed since {lock_file.name} was written ({recorded[:19]}... "
                f"recorded, {current[:19]}... now): run `make lock` and commit requirements/*.lock"]
    return []


def pyproject_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, Requirement]]:
    """(where, requirement) for everything a main lock must satisfy; sam3-serve's own extras are expanded."""
    inputs = lock.lock_inputs(pyproject)
    found = [("dependencies", Requirement(r)) for r in inputs["dependencies"]]
    found += [("build-system", Requirement(r)) for r in inputs["build-system.requires"]]
    for extra, requirements in inputs["optional-dependencies"].items():
        assert requirements is not None, f"pyproject.toml has no extra {extra!r}, which the locks cover"
        found += [(f"extra {extra}", Requirement(r)) for r in requirements]
    return found


def unmet(requirements: list[tuple[str, Requirement]], pins: dict[str, tuple[str, list[str]]],
          extra: str = "") -> list[str]:
    problems = []
    for where, requirement in requirements:
        name = canonicalize_name(requirement.name)
        if requirement.marker and not requirement.marker.evaluate({**TARGET, "extra": extra}):
            continue
        if name == SELF:  # the project's own extras (test -> batch, load): covered when they are covered
            missing = set(requirement.extras) - set(lock.EXTRAS)
            problems += [f"{where}: sam3-serve[{e}] is not an extra the locks cover" for e in sorted(missing)]
            continue
        if name not in pins:
            problems.append(f"{where}: {requirement} is not in the lock")
        elif not requirement.specifier.contains(Version(pins[name][0]), prereleases=True):
            problems.append(f"{where}: {requirement} but the lock pins {name}=={pins[name][0]}")
    return problems


# ---- the lock against pyproject --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MAIN)
def test_lock_records_the_digest_of_pyprojects_dependency_tables(kind):
    problems = digest_problems(ROOT / "pyproject.toml", lock.LOCKS[kind])
    assert not problems, problems[0]


def test_no_deps_lock_records_the_digest_of_its_input():
    text = lock.LOCKS["no-deps"].read_text()
    recorded = re.search(rf"^{re.escape(lock.INPUTS_DIGEST_LINE)}(\S+)$", text, re.M)
    assert recorded, "no-deps.lock has no digest header: run `make lock`"
    assert recorded.group(1) == lock.no_deps_digest(), \
        "requirements/no-deps.in changed since no-deps.lock was written: run `make lock`"
    wanted = {canonicalize_name(Requirement(r).name): Requirement(r) for r in lock.no_deps_requirements()}
    assert set(locked("no-deps")) == set(wanted), "no-deps.lock and no-deps.in name different packages: make lock"
    for name, requirement in wanted.items():
        assert requirement.specifier.contains(locked("no-deps")[name][0]), (requirement, locked("no-deps")[name])


@pytest.mark.parametrize("kind", MAIN)
def test_every_pyproject_requirement_is_pinned_within_its_range(kind):
    problems = unmet(pyproject_requirements(), locked(kind))
    assert not problems, f"requirements/{kind}.lock and pyproject.toml disagree (run `make lock`):\n" + "\n".join(
        problems)


def closure_problems(pins: dict[str, tuple[str, list[str]]]) -> tuple[int, list[str]]:
    """(packages checked, problems): each locked package's requirements, read from this environment's metadata where
    the same version is installed (all but the other torch build and its CUDA wheels), must be locked too; and the
    extras pyproject asks of them (ray[serve], ray[data], ...)."""
    checked, problems = 0, []
    for name, (version, _) in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        requirements = [(f"{name}=={version}", Requirement(r)) for r in dist.requires or []]
        problems += unmet([(w, r) for w, r in requirements if not (r.marker and "extra" in str(r.marker))], pins)
    for _, requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if name == SELF or not requirement.extras or name not in pins:
            continue
        dist = importlib.metadata.distribution(name)
        if dist.version != pins[name][0]:
            continue
        for extra in requirement.extras:
            wanted = [(f"{name}[{extra}]", Requirement(r)) for r in dist.requires or []
                      if Requirement(r).marker and Requirement(r).marker.evaluate({**TARGET, "extra": extra})]
            problems += unmet(wanted, pins, extra)
    return checked, problems


@pytest.mark.parametrize("kind", MAIN)
def test_lock_is_closed_under_the_locked_packages_own_requirements(kind):
    """Installed --no-deps, a lock must hold every dependency of every package in it."""
    checked, problems = closure_problems(locked(kind))
    assert checked > 150, f"only {checked} locked packages are installed at their locked version here"
    assert not problems, f"requirements/{kind}.lock misses dependencies (run `make lock`):\n" + "\n".join(problems)


def test_the_closure_check_finds_a_missing_dependency():
    pins = {name: pin for name, pin in locked("cpu").items() if name not in ("anyio", "uvicorn")}
    _, problems = closure_problems(pins)
    assert any(p.startswith("starlette==") and "anyio" in p for p in problems), problems
    assert any(p.startswith("ray[serve]") and "uvicorn" in p for p in problems), problems


def test_what_no_deps_leaves_out_is_locked_or_kept_out_on_purpose():
    """inference-sdk goes in without its dependencies: the ones it uses must come from the main locks."""
    for name in locked("no-deps"):
        requirements = importlib.metadata.distribution(name).requires or []
        for kind in MAIN:
            missing = {canonicalize_name(Requirement(r).name) for r in requirements
                       if not Requirement(r).marker or Requirement(r).marker.evaluate({**TARGET, "extra": ""})}
            missing -= set(locked(kind)) | set(lock.EXCLUDED)
            assert not missing, f"{name} needs {sorted(missing)}, in no main lock: add them to pyproject's test extra"


# ---- the lock files themselves ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*MAIN, "no-deps"])
def test_every_package_is_pinned_with_a_hash(kind):
    text = lock.LOCKS[kind].read_text()
    for number, line in enumerate(text.splitlines(), 1):
        body = line.strip()
        ok = (not body or body.startswith("#") or re.match(r"^[A-Za-z0-9][\w.-]*(\[[\w,-]+\])?==\S+ \\$", line)
              or re.match(r"^    --hash=sha256:[0-9a-f]{64}( \\)?$", line))
        assert ok, f"{kind}.lock line {number} is neither a pin nor a hash: {line!r} (edited by hand? make lock)"
    pins = locked(kind)
    assert pins
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"{kind}.lock: no hash for {unhashed}"


@pytest.mark.parametrize("kind", [*MAIN, "no-deps"])
def test_no_lock_holds_an_excluded_package_or_a_no_deps_one(kind):
    for name, why in lock.EXCLUDED.items():
        assert name not in locked(kind), f"{kind}.lock holds {name}: {why}"
    if kind in MAIN:
        both = set(locked(kind)) & set(locked("no-deps"))
        assert not both, f"{sorted(both)} in {kind}.lock would be installed with its dependencies"


@pytest.mark.parametrize("kind", [*MAIN, "no-deps"])
def test_lock_names_no_host_and_no_local_path(kind):
    text = lock.LOCKS[kind].read_text()
    assert "://" not in text, f"{kind}.lock names a URL"
    assert not re.search(r"^\s*--(index-url|extra-index-url|find-links|trusted-host)", text, re.M), kind
    paths = re.findall(r"(?<![\w.-])/(?:opt|tmp|home|root|usr|work)/\S*", text)
    assert not paths, f"{kind}.lock names paths of the machine that wrote it: {paths[:3]}"


def test_torch_is_the_makefiles_version_in_its_two_builds():
    version = torch_version()
    assert locked("cpu")["torch"][0] == f"{version}+cpu"
    cuda_in_cpu = sorted(name for name in locked("cpu") if lock.CUDA_PACKAGE.match(name))
    assert not cuda_in_cpu, f"cpu.lock would install the CUDA stack: {cuda_in_cpu}"
    assert locked("cuda")["torch"][0] == version, "cuda.lock must pin torch's plain (CUDA) build"
    assert "nvidia-cuda-runtime" in locked("cuda"), "cuda.lock holds no CUDA runtime wheel"
    assert set(locked("cpu")) <= set(locked("cuda")), "the CUDA lock is the CPU lock plus torch's CUDA wheels"
    same = {n: v for n, (v, _) in locked("cpu").items() if n != "torch" and locked("cuda")[n][0] != v}
    assert not same, f"the two locks pin different versions of {same}: run `make lock`"


def test_this_environment_is_the_lock():
    """The suite runs on the lock's pins (make test installs them first): a drift here is a stale .venv."""
    installed_torch = importlib.metadata.version("torch")
    kind = "cpu" if installed_torch.endswith("+cpu") else "cuda"
    drift = {}
    for name, (version, _) in locked(kind).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version and not (kind == "cuda" and lock.CUDA_PACKAGE.match(name) and have is None):
            drift[name] = (have, version)
    assert not drift, f"installed != {kind}.lock (installed, locked): {dict(list(drift.items())[:10])}: `make install`"


# ---- the check catches an edit of pyproject --------------------------------------------------------------------


def _edited_copy(tmp_path: Path, pattern: str, replacement: str) -> Path:
    text = (ROOT / "pyproject.toml").read_text()
    edited, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
    assert count == 1, f"pyproject.toml has no {pattern!r}"
    copy = tmp_path / "pyproject.toml"
    copy.write_text(edited)
    return copy


@pytest.mark.parametrize(("pattern", "replacement"), [
    (r"^dependencies = \[$", 'dependencies = [\n    "rich>=13",'),  # a new dependency
    (r'"pillow>=[^"]*"', '"pillow>=99"'),  # a range the locked pillow falls out of
    (r"^load = \[", 'load = ["gevent", '),  # an extra the locks cover
    (r"^requires = \[", 'requires = ["wheel", '),  # a build requirement
], ids=["dependency-added", "range-changed", "extra-changed", "build-requirement-added"])
def test_a_pyproject_edit_without_make_lock_fails_and_says_so(tmp_path, pattern, replacement):
    edited = _edited_copy(tmp_path, pattern, replacement)
    for kind in MAIN:
        problems = digest_problems(edited, lock.LOCKS[kind])
        assert problems and "run `make lock`" in problems[0]
    if "pillow" in pattern:
        assert unmet(pyproject_requirements(edited), locked("cpu")) == [
            "dependencies: pillow>=99 but the lock pins pillow==" + locked("cpu")["pillow"][0]]


def test_an_edit_outside_the_dependency_tables_needs_no_new_lock(tmp_path):
    edited = _edited_copy(tmp_path, r"\Z", "\n[tool.sam3-serve-test]\nanswer = 42\n")
    assert tomllib.loads(edited.read_text())["tool"]["sam3-serve-test"] == {"answer": 42}
    assert digest_problems(edited, lock.LOCKS["cpu"]) == []
