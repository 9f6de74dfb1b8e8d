"""Every curl in the docs keeps running: each ```bash block of README.md and docs/*.md that calls `curl` runs under
`bash -euo pipefail` against a live app, and must exit 0 and print no error body.

A block runs as a reader would run it against `make serve`, with three substitutions: `http://127.0.0.1:8000` is
the test app's URL, `http://127.0.0.1:8080` (the docs' `python -m http.server 8080`) a file server over the block's
working directory, which holds `clip.mp4`, `ox.mp4` and `ox.png`; and the key placeholders (`YOUR_API_KEY`,
`YOUR_KEY`, `$OXEN_API_KEY`) are a configured key. Every block runs against the one app with API keys on and
127.0.0.1 allow-listed (`providers_url`, shared with the provider tests). A block that carries no key (written for
`make serve`, where auth is off) gets what the docs tell a reader with `SAM3_API_KEYS` set to add,
`-H "Authorization: Bearer <key>"`, from a `.curlrc`; blocks that carry a key get no `.curlrc`, so their own key
placement is what is tested. Blocks that call a tool this machine lacks (`jq`, `awk`) are skipped, saying which.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.conftest import API_KEY, image_bytes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SERVER = "http://127.0.0.1:8000"  # what the docs call the server
FILES = "http://127.0.0.1:8080"  # what the docs call the reader's file server
KEY_PLACEHOLDERS = ("YOUR_API_KEY", "YOUR_KEY")  # literal placeholders, replaced by a key
KEY_VARIABLES = {"OXEN_API_KEY": API_KEY}  # variables the blocks read, set in their environment
TOOLS = ("curl", "jq", "awk", "base64")
BLOCK_TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    page: str
    heading: str
    line: int
    text: str

    @property
    def keyed(self) -> bool:
        return any(p in self.text for p in KEY_PLACEHOLDERS) or any(f"${v}" in self.text for v in KEY_VARIABLES)


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def bash_blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a markdown page, each with the heading it sits under."""
    blocks, heading, fence, body, start = [], path.stem, None, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, body, start = stripped[3:].strip(), [], number
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif stripped == "```":
            if fence == "bash":
                blocks.append(Block(path.name, heading, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path.name}: unclosed code block from line {start}"
    return blocks


def curl_blocks() -> list[pytest.param]:
    params, seen = [], {}
    for page in PAGES:
        for block in bash_blocks(page):
            if "curl" not in block.text:
                continue
            name = f"{block.page}::{slug(block.heading)}"
            seen[name] = seen.get(name, 0) + 1
            params.append(pytest.param(block, id=name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return params


BLOCKS = curl_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The reader's directory: the files the blocks name."""
    from tests.videos import write_video

    path = tmp_path_factory.mktemp("docs")
    video = write_video(8, 96, 128)
    (path / "clip.mp4").write_bytes(video)
    (path / "ox.mp4").write_bytes(video)
    (path / "ox.png").write_bytes(image_bytes(5))
    return path


@pytest.fixture(scope="module")
def file_server(workdir) -> str:
    """`python -m http.server` over the working directory, on a free loopback port."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(workdir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def curl_homes(tmp_path_factory) -> dict[bool, Path]:
    """Block carries its own key -> its CURL_HOME: no .curlrc for those, a Bearer header for the others."""
    bare, bearer = tmp_path_factory.mktemp("curl-bare"), tmp_path_factory.mktemp("curl-bearer")
    (bearer / ".curlrc").write_text(f'header = "Authorization: Bearer {API_KEY}"\n')
    return {True: bare, False: bearer}


def run_block(script: str, cwd: Path, curl_home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(curl_home), "CURL_HOME": str(curl_home), "LC_ALL": "C.UTF-8",
           **KEY_VARIABLES}
    with subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out, err = "", f"still running after {BLOCK_TIMEOUT_S} s"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # curl and awk too, whatever happened
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def json_values(text: str) -> list:
    """Every JSON value in the output (one per curl, NDJSON lines, jq's pretty prints); other lines skipped."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "{[":
            try:
                value, i = decoder.raw_decode(text, i)
                values.append(value)
                continue
            except ValueError:
                pass
        newline = text.find("\n", i)
        i = len(text) if newline < 0 else newline + 1
    return values


def error_in(value: object) -> str | None:
    """Why a JSON value is an error body of one of the front doors, or None."""
    if not isinstance(value, dict):
        return None
    for key in ("error", "detail"):  # native, Segmind, HF Space, Oxen; FastAPI
        if key in value:
            return f"top-level {key!r}"
    if value.get("status") in ("error", "failed", "not ready"):  # Oxen's hub shape, a failed generation, /readyz
        return f"status {value['status']!r}"
    if value.get("success") is False:  # HF Space
        return "success false"
    if set(value) == {"message"}:  # Roboflow
        return "a bare message"
    return None


def test_the_docs_have_curl_examples():
    pages = {param.values[0].page for param in BLOCKS}
    assert {"README.md", "native-image.md", "native-video.md", "oxen.md", "segmind.md", "roboflow.md",
            "hf-space.md"} <= pages, pages


@pytest.mark.parametrize("block", BLOCKS)
def test_block_runs(block: Block, providers_url, workdir, file_server, curl_homes):
    missing = [tool for tool in TOOLS if re.search(rf"(^|[|$(\s]){tool}\s", block.text) and not shutil.which(tool)]
    if missing:
        pytest.skip(f"{block.page} line {block.line} needs {', '.join(missing)}, not installed here")
    script = block.text.replace(SERVER, providers_url).replace(FILES, file_server)
    for placeholder in KEY_PLACEHOLDERS:
        script = script.replace(placeholder, API_KEY)
    result = run_block(script, workdir, curl_homes[block.keyed])
    where = f"{block.page} line {block.line}"
    assert result.returncode == 0, f"{where} exited {result.returncode}\n{result.stderr[-3000:]}\n{result.stdout[-3000:]}"
    values = json_values(result.stdout)
    printers = len(re.findall(r"\| jq \.(\s|$)", block.text))  # each `... | jq .` prints one value at least
    assert len(values) >= max(1, printers), f"{where} printed {len(values)} JSON values:\n{result.stdout[-3000:]}"
    for value in values:
        problem = error_in(value)
        assert problem is None, f"{where} printed an error body ({problem}): {json.dumps(value)[:2000]}"


# the docs' own links and paths; no server needed

LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
REPO_PATH = re.compile(r"`((?:serve_app|deployments|tests|cluster|load_tests|docs)/[\w./-]*)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_paths_exist(page: Path):
    text = page.read_text()
    for target, _ in LINK.findall(text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".")
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"README.md's 'Read on' misses {unlinked}"
