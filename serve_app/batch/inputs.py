"""Finding the inputs: folders, globs, list files and manifests, on local disk or any filesystem pyarrow knows."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from serve_app.batch.spec import SpecError, canonical, category_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
LIST_SUFFIXES = (".txt", ".lst", ".list")
_GLOB_CHARS = frozenset("*?[")

LISTING_SCHEMA = pa.schema([("index", pa.int64()), ("path", pa.string()), ("prompts", pa.string())])


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI pyarrow understands (s3://, gs://, hdfs://, file://)."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise SpecError(f"cannot open {location!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def _join(location: str, path: str) -> str:
    """The user-facing name of `path` found under `location`: a URI keeps its scheme, a local path stays absolute."""
    if is_uri(location):
        scheme = location.split("://", 1)[0]
        return path if is_uri(path) else f"{scheme}://{path}"
    return path


def _walk(fs: pafs.FileSystem, base: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _glob_regex(pattern: str) -> re.Pattern:
    """`*` and `?` stay inside one path segment, `[...]` is a character class, `**/` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 1
        elif char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _glob(location: str) -> list[str]:
    head, sep, rest = location.partition("://")
    parts = (rest if sep else head).split("/")
    fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    base_location = (head + sep if sep else "") + ("/".join(parts[:fixed]) or ("/" if sep or fixed else "."))
    fs, base = filesystem(base_location)
    regex = _glob_regex(base.rstrip("/") + "/" + "/".join(parts[fixed:]))
    return [p for p in _walk(fs, base) if regex.match(p)]


def _list_file(location: str) -> list[str]:
    """One path or URI per line; blank lines and `#` comments skipped; relative paths are relative to the file."""
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8")
    base = path.rsplit("/", 1)[0]
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line if is_uri(line) or line.startswith("/") else _join(location, f"{base}/{line}"))
    return out


def expand(location: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files one input names: a folder (walked, filtered by suffix), a glob, a list file, or one file."""
    if _GLOB_CHARS & set(location.split("://", 1)[-1]):
        return [_join(location, p) for p in _glob(location) if p.lower().endswith(suffixes)]
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return [_join(location, p) for p in _walk(fs, path) if p.lower().endswith(suffixes)]
    if info.type == pafs.FileType.NotFound:
        raise SpecError(f"input {location!r} does not exist")
    if path.lower().endswith(LIST_SUFFIXES):
        return _list_file(location)
    return [_join(location, path)]


def find_files(inputs: Iterable[str], suffixes: tuple[str, ...]) -> list[str]:
    """Every file the inputs name, in order (each folder and glob sorted), each once."""
    return list(dict.fromkeys(p for location in inputs for p in expand(location, suffixes)))


@dataclass
class Listing:
    """The job's inputs in index order: index, path and (manifest jobs) per-item prompts, and a digest of them all."""

    table: pa.Table
    digest: str
    categories: list[str]

    @property
    def count(self) -> int:
        return self.table.num_rows


def listing(paths: list[str], prompts: list[str], categories: list[str]) -> Listing:
    """`prompts`: per item, canonical JSON, or "" where the job's prompts apply (never null: Ray Data turns an
    all-null column into NaN floats)."""
    digest = hashlib.sha256()
    for path, prompt in zip(paths, prompts):
        digest.update(path.encode() + b"\0" + prompt.encode() + b"\n")
    table = pa.table(
        {"index": pa.array(range(len(paths)), pa.int64()), "path": pa.array(paths, pa.string()),
         "prompts": pa.array(prompts, pa.string())},
        schema=LISTING_SCHEMA,
    )
    return Listing(table, digest.hexdigest(), categories)


def read_manifest(location: str, key: str, check) -> Iterator[tuple[str, list[dict]]]:
    """(path, checked prompts) per JSONL line `{key: path, "prompts": [...]}`; errors name the line."""
    fs, path = filesystem(location)
    base = path.rsplit("/", 1)[0]
    with fs.open_input_stream(path) as stream:
        lines = stream.read().decode("utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{location}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get(key), str) or set(item) - {key, "prompts"}:
            raise SpecError(f'{location}:{number}: expected {{"{key}": "<path>", "prompts": [...]}}')
        try:
            prompts = check(item.get("prompts") or [])
        except SpecError as exc:
            raise SpecError(f"{location}:{number}: {exc}") from None
        name = item[key]
        yield (name if is_uri(name) or name.startswith("/") else _join(location, f"{base}/{name}")), prompts


def manifest_listing(location: str, key: str, check, limit: int | None) -> Listing:
    """A manifest's items in file order (a path listed twice keeps its first line)."""
    paths: list[str] = []
    prompts: list[str] = []
    categories: dict[str, None] = {}
    seen: set[str] = set()
    for path, items in read_manifest(location, key, check):
        if path in seen:
            continue
        seen.add(path)
        paths.append(path)
        prompts.append(canonical(items))
        for i, prompt in enumerate(items):
            categories.setdefault(category_name(prompt, i), None)
    return _limited(listing(paths, prompts, list(categories)), limit)


def files_listing(inputs: list[str], suffixes: tuple[str, ...], categories: list[str], limit: int | None) -> Listing:
    if not inputs:
        raise SpecError("give at least one input: a folder, a glob, a list file or a file")
    paths = find_files(inputs, suffixes)
    if not paths:
        raise SpecError(f"no input files ({', '.join(suffixes)}) found in {', '.join(inputs)}")
    return _limited(listing(paths, [""] * len(paths), categories), limit)


def _limited(found: Listing, limit: int | None) -> Listing:
    """`--limit`: the first `limit` items. The digest stays the full listing's, so a later run without it resumes."""
    if limit is None:
        return found
    if limit < 1:
        raise SpecError("--limit must be at least 1")
    return Listing(found.table.slice(0, limit), found.digest, found.categories)
