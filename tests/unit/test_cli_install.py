"""`pip install .` into a fresh virtualenv gives a working `sam3-serve` (and `sam3-batch`) console script.

The package is built and installed from a copy of the source tree, the way a user's `pip install .` does (no
editable install, nothing found through the checkout). Its dependencies are not installed again: the new venv
sees this suite's site-packages through a .pth file, so the test checks the package (its metadata, entry points
and module list) in about 20 s instead of minutes of downloads; `make install` installs the dependencies from the
lock."""

from __future__ import annotations

import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_a_working_sam3_serve(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("serve_app", "deployments"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "suite_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # the venv's own setuptools (ensurepip's, older than the lock's and without bdist_wheel) would shadow the
    # suite's: the build uses the locked one, as `make install` and the images do (--no-build-isolation)
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"], capture_output=True,
                   timeout=120)
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              str(source)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(env_dir / "bin" / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    where = subprocess.run([python, "-c", "import serve_app.cli, deployments.app; print(serve_app.cli.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(purelib), f"imported from {where.stdout.strip()}, not the new venv"
    helped = run("sam3-serve", "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "usage: sam3-serve" in helped.stdout and "--max-image-bytes" in helped.stdout
    shown = run("sam3-serve", "config", "--port", "8011")
    assert shown.returncode == 0 and "port: 8011  # flag" in shown.stdout, shown.stderr[-2000:]
    built = run("sam3-serve", "build", "--model", "tiny-random")
    assert built.returncode == 0, built.stderr[-2000:]
    assert yaml.safe_load(built.stdout)["applications"][0]["import_path"] == "deployments.app:app_builder"
    assert run("sam3-batch", "--help").returncode == 0
