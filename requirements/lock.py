"""`make lock`: write requirements/cpu.lock, cuda.lock and no-deps.lock from pyproject.toml with `uv pip compile`.

    make lock                        re-resolve; the pins already in the locks are kept wherever they still fit
    make lock UPGRADE=1              re-resolve to the newest releases pyproject.toml allows
    make lock LOCK_ARGS="-c FILE"    more uv arguments (the first locks were compiled with `-c` a `pip freeze`
                                     of the environment the suite was green on)

cpu.lock and cuda.lock each hold every runtime and test dependency of sam3-serve (pyproject's dependencies, its
build requirements and the extras in EXTRAS) for Python 3.11 on linux x86_64, pinned and hashed, to install with
`pip install --require-hashes --no-deps` (requirements/install.sh). They differ in torch only: cpu.lock pins its
+cpu build, cuda.lock the plain build with the CUDA wheels the registry resolves for it. no-deps.lock holds
requirements/no-deps.in, the packages installed without their own (conflicting) dependencies.

Each lock's header records a digest of what it was compiled from; tests/unit/test_lock.py recomputes it, so an
edit of pyproject.toml's dependency tables without `make lock` fails the suite and says to run it.

The indexes are pip's own (pip.conf and PIP_* variables, as `pip config list` shows them), handed to uv on its
command line: no index, find-links location or host is written into a lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = ROOT / "pyproject.toml"
NO_DEPS_IN = REQUIREMENTS / "no-deps.in"
EXTRAS = ("test", "batch", "load")
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
FLAVORS = ("cpu", "cuda")
LOCKS = {"cpu": REQUIREMENTS / "cpu.lock", "cuda": REQUIREMENTS / "cuda.lock", "no-deps": REQUIREMENTS / "no-deps.lock"}
# never in a lock: what pyproject.toml (and no-deps.in) keep out on purpose
EXCLUDED = {
    "opencv-python": "it installs a second cv2 over opencv-python-headless (the same files, the GUI build); "
                     "inference-sdk, which pins it, is installed with --no-deps (requirements/no-deps.in)",
}
# the packages only a CUDA build of torch pulls in
CUDA_PACKAGE = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")
DIGEST_LINE = "# pyproject-digest: "
INPUTS_DIGEST_LINE = "# no-deps-digest: "


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_inputs(pyproject: Path = PYPROJECT) -> dict:
    """The parts of pyproject.toml a lock is compiled from (the other tables do not change what is locked)."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": {extra: optional.get(extra) for extra in EXTRAS},
        "build-system.requires": data.get("build-system", {}).get("requires", []),
    }


def _sha256(obj: object) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pyproject_digest(pyproject: Path = PYPROJECT) -> str:
    return _sha256(lock_inputs(pyproject))


def no_deps_requirements(path: Path = NO_DEPS_IN) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def no_deps_digest(path: Path = NO_DEPS_IN) -> str:
    return _sha256(no_deps_requirements(path))


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) of a lock as uv writes it (`name==version \\` then `--hash=` lines)."""
    found: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
            if not match:
                raise ValueError(f"not a pinned requirement: {line!r}")
            current = canonical(match.group(1))
            found[current] = (match.group(3), [])
        for digest in re.findall(r"--hash=(\S+)", line):
            if current is None:
                raise ValueError(f"a hash before any requirement: {line!r}")
            found[current][1].append(digest)
    return found


# ---- pip's configuration, handed to uv ------------------------------------------------------------------------


def pip_sources(python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """uv's index arguments (and environment) from pip's configuration: the same registries `pip install` uses."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    rank = {"global": 0, "install": 1, ":env:": 2}  # pip's own order: [install] over [global], PIP_* over both
    chosen: dict[str, tuple[int, str]] = {}
    for line in listed.stdout.splitlines():
        match = re.match(r"^(?P<section>:env:|[^.]+)\.(?P<key>[a-z-]+)='(?P<value>.*)'$", line)
        if not match or match["section"] not in rank:
            continue
        key, value, level = match["key"], match["value"], rank[match["section"]]
        if key not in chosen or level >= chosen[key][0]:
            chosen[key] = (level, value)
    args: list[str] = []
    if "index-url" in chosen:
        args += ["--index-url", chosen["index-url"][1]]
    for key in ("extra-index-url", "find-links"):
        for value in chosen.get(key, (0, ""))[1].split():
            args += [f"--{key}", value]
    env = {}
    if "cert" in chosen and not os.environ.get("SSL_CERT_FILE"):
        env["SSL_CERT_FILE"] = chosen["cert"][1]
    return args, env


def find_uv() -> str:
    for candidate in (Path(sys.executable).parent / "uv", shutil.which("uv")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    sys.exit("lock.py: uv not found next to this Python or on PATH: `make install` installs it (it is in the test "
             "extra), or `pip install uv`")


# ---- compile, check, write -------------------------------------------------------------------------------------


def _pins(text: str) -> dict[str, str]:
    return {name: version for name, (version, _) in parse_lock(text).items()}


def _tidy(text: str, labels: dict[str, str | None]) -> str:
    """Name the temporary input files in uv's `# via` notes by what they are; drop other outside paths."""
    out: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^(\s*#\s*(?:via\s+)?)(-[rc]\s+)(\S+)\s*$", line)
        if match and Path(match.group(3)).is_absolute():
            label = labels.get(Path(match.group(3)).name)
            if label is None:  # e.g. `make lock LOCK_ARGS="-c /elsewhere/freeze.txt"`: no path of this machine
                continue
            line = f"{match.group(1)}{label}"
        out.append(line)
    # a `# via` block whose entries were all dropped
    cleaned = [line for i, line in enumerate(out)
               if not (line.strip() == "# via" and (i + 1 == len(out) or not out[i + 1].lstrip().startswith("#   ")))]
    return "\n".join(cleaned) + "\n"


def _check(name: str, text: str, sources: list[str], flavor: str | None, torch_version: str) -> list[str]:
    problems = []
    locked = parse_lock(text)
    for package, (version, hashes) in sorted(locked.items()):
        if not hashes:
            problems.append(f"{package}=={version} has no hash")
        if package in EXCLUDED:
            problems.append(f"{package}=={version} is in the lock: {EXCLUDED[package]}; find what requires it "
                            f"(the `# via` note) and keep it out")
    for value in sources[1::2]:
        if value in text:
            problems.append(f"the lock names a package source ({value}): locks must not")
    if "://" in text:
        problems.append("the lock holds a URL: locks must not name a host")
    if flavor is not None:
        torch = locked.get("torch", ("(none)", []))[0]
        expected = torch_version + ("+cpu" if flavor == "cpu" else "")
        if torch != expected:
            problems.append(f"torch is {torch}, not {expected}" + (
                ": the index serving torch's plain (CUDA) build is not among pip's sources" if flavor == "cuda"
                else ": the +cpu wheel must be among pip's sources (PyTorch's CPU wheel index or a find-links)"))
        cuda = sorted(p for p in locked if CUDA_PACKAGE.match(p))
        if flavor == "cpu" and cuda:
            problems.append(f"CUDA packages in the CPU lock: {', '.join(cuda)}")
        if flavor == "cuda" and not any(p.startswith("nvidia-cuda-runtime") for p in cuda):
            problems.append("no nvidia-cuda-runtime in the CUDA lock: torch resolved without its CUDA wheels")
    return [f"{name}: {p}" for p in problems]


def header(name: str, flavor: str | None, torch_version: str) -> str:
    if flavor is None:
        return (f"# requirements/{name}: requirements/no-deps.in pinned and hashed, for Python {PYTHON_VERSION} on "
                f"linux x86_64.\n"
                f"# Installed with --no-deps after the main lock (requirements/install.sh). Do not edit: run `make "
                f"lock`.\n"
                f"{INPUTS_DIGEST_LINE}{no_deps_digest()}\n")
    build = f"torch {torch_version}+cpu" if flavor == "cpu" else f"torch {torch_version} with its CUDA wheels"
    return (f"# requirements/{name}: every runtime and test dependency of sam3-serve (pyproject.toml: dependencies,\n"
            f"# build-system, extras {', '.join(EXTRAS)}), pinned and hashed, for Python {PYTHON_VERSION} on linux "
            f"x86_64, {build}.\n"
            f"# `make install` and docker/ install it with --require-hashes --no-deps (requirements/install.sh).\n"
            f"# Do not edit: `make lock` writes it from pyproject.toml (uv pip compile).\n"
            f"{DIGEST_LINE}{pyproject_digest()}\n")


def compile_lock(kind: str, uv: str, sources: list[str], env: dict[str, str], torch_version: str, upgrade: bool,
                 extra: list[str], tmp: Path) -> str:
    target = LOCKS[kind]
    work = tmp / target.name
    if target.exists() and not upgrade:
        shutil.copy(target, work)  # uv keeps the pins of its output file where they still fit
    labels = {}
    if kind == "no-deps":
        inputs = [str(NO_DEPS_IN.relative_to(ROOT)), "--no-deps"]
    else:
        pin = tmp / f"torch-{kind}.txt"
        # `===`: the plain build exactly; `==2.13.0` would also match a local 2.13.0+cpu wheel
        pin.write_text(f"torch=={torch_version}+cpu\n" if kind == "cpu" else f"torch==={torch_version}\n")
        build = tmp / "build-system.in"
        build.write_text("\n".join(lock_inputs()["build-system.requires"]) + "\n")
        labels = {pin.name: f"torch {kind} pin (make lock)", build.name: "build-system (pyproject.toml)"}
        inputs = ["pyproject.toml", str(build), *[f"--extra={e}" for e in EXTRAS], "--constraint", str(pin)]
    common = [uv, "pip", "compile", *inputs, "--python-version", PYTHON_VERSION, "--python-platform",
              PYTHON_PLATFORM, "--generate-hashes", "--index-strategy", "unsafe-best-match", "--no-header", "--quiet"]
    done = subprocess.run([*common, "--output-file", str(work), *sources, *(["--upgrade"] if upgrade else []), *extra],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"lock.py: uv could not resolve {target.name}:\n{done.stderr.strip()}")
    # The hashes: uv takes a version's files from the first index that has it, and pip's extra indexes come first,
    # so a mirror holding one wheel of numpy would leave one hash. The same pins again without the extra indexes
    # (pip's index and find-links only) give every file of the main index; kept where they resolve the same.
    main_only = [a for pair in zip(sources[::2], sources[1::2]) if pair[0] != "--extra-index-url" for a in pair]
    if main_only != sources:
        wide, pinned = tmp / f"wide-{target.name}", tmp / f"pins-{target.name}.txt"
        pinned.write_text("".join(f"{n}=={v}\n" for n, v in _pins(work.read_text()).items()))  # no hashes: all files
        again = subprocess.run([*common, "--constraint", str(pinned), "--output-file", str(wide), *main_only, *extra],
                               cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        if again.returncode == 0 and _pins(wide.read_text()) == _pins(work.read_text()):
            work = wide
        else:
            print(f"lock.py: {target.name}: some pins are on an extra index only; their hashes are that index's")
    body = _tidy(work.read_text(), labels)
    flavor = None if kind == "no-deps" else kind
    problems = _check(target.name, body, sources, flavor, torch_version)
    if problems:
        sys.exit("lock.py: refusing to write a bad lock:\n  " + "\n  ".join(problems))
    return header(target.name, flavor, torch_version) + body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="torch's version (the Makefile's TORCH_VERSION)")
    parser.add_argument("--upgrade", action="store_true", help="ignore the current pins")
    parser.add_argument("uv_args", nargs="*", help="more arguments for `uv pip compile` (after --)")
    args = parser.parse_args(argv)
    uv = find_uv()
    sources, env = pip_sources()
    written = {}
    with tempfile.TemporaryDirectory(prefix="sam3-lock-") as tmp:
        for kind in (*FLAVORS, "no-deps"):
            written[kind] = compile_lock(kind, uv, sources, env, args.torch, args.upgrade, args.uv_args, Path(tmp))
    clash = set(parse_lock(written["no-deps"])) & (set(parse_lock(written["cpu"])) | set(parse_lock(written["cuda"])))
    if clash:
        sys.exit(f"lock.py: {', '.join(sorted(clash))} in both no-deps.lock and a main lock: keep one")
    for kind, text in written.items():  # all or nothing: written once every lock resolved and passed its checks
        before = LOCKS[kind].read_text() if LOCKS[kind].exists() else ""
        LOCKS[kind].write_text(text)
        packages = parse_lock(text)
        state = "unchanged" if before == text else "written"
        print(f"{LOCKS[kind].relative_to(ROOT)}: {state}, {len(packages)} packages, "
              f"{sum(len(h) for _, h in packages.values())} hashes, {len(text.encode()) // 1024} KiB")


if __name__ == "__main__":
    main()
