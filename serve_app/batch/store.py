"""The output folder as a resumable store: run.json, Parquet part files moved into place whole, merged reads."""

from __future__ import annotations

import heapq
import io
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve_app.batch.inputs import filesystem
from serve_app.batch.spec import SpecError

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PARTS = "parts"
_PART = re.compile(r"part-(\d{10})-(\d{10})-[0-9a-f]{12}\.parquet\Z")
_TMP_PREFIX = ".tmp-"


class OutputStore:
    """One job's output folder (local or a pyarrow URI). Part files appear whole or not at all: a part is written
    under a temporary name and moved into place, so a part file that exists is a finished block (the done-marker)."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        self.fs, self.root = filesystem(self.location)
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        """What to show a user: the location as given, plus `name`."""
        return f"{self.location}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    # ---- the run ------------------------------------------------------------------------------------

    def done_for(self, run: dict) -> pa.Array:
        """The indices this folder already holds for `run` (read only); another run's folder is refused."""
        if not self.exists(RUN_FILE):
            return pa.array([], pa.int64())
        held = json.loads(self.read_bytes(RUN_FILE))
        differ = sorted(k for k in set(held) | set(run) if held.get(k) != run.get(k))
        if differ:
            raise SpecError(
                f"{self.location} holds another run ({', '.join(differ)} differ): use a new output folder, "
                "or delete this one to start over"
            )
        return self.done_indices()

    def prepare(self, run: dict) -> pa.Array:
        """Start (write run.json) or resume (same run.json) a run; returns the indices already done.

        Temporary files of writers that died are removed: never run two jobs into one folder at once."""
        done = self.done_for(run)
        self.fs.create_dir(self.path(PARTS), recursive=True)
        if not self.exists(RUN_FILE):
            self.write_bytes(RUN_FILE, json.dumps(run, indent=2, sort_keys=True).encode())
        for info in self.fs.get_file_info(pafs.FileSelector(self.path(PARTS))):
            if info.base_name.startswith(_TMP_PREFIX):
                self.fs.delete_file(info.path)
        self.delete(SUMMARY_FILE)  # summary.json marks a finished run; this one is not finished yet
        return done

    def parts(self) -> list[tuple[int, int, str]]:
        """(first index, last index, path) of every finished part file, by first index."""
        if not self.exists(PARTS):
            return []
        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.path(PARTS))):
            match = _PART.match(info.base_name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), info.path))
        return sorted(found)

    def done_indices(self) -> pa.Array:
        """The sorted indices of every finished row (8 bytes each: what a resume holds of the past)."""
        columns = [pq.read_table(path, columns=["index"], filesystem=self.fs)["index"] for _, _, path in self.parts()]
        if not columns:
            return pa.array([], pa.int64())
        return pc.unique(pa.chunked_array([c for column in columns for c in column.chunks], pa.int64())).sort()

    # ---- writing ------------------------------------------------------------------------------------

    def write_part(self, table: pa.Table) -> str | None:
        """One block of finished rows as a part file named by its index range; None for an empty block."""
        if table.num_rows == 0:
            return None
        table = table.sort_by("index")
        first, last = pc.min(table["index"]).as_py(), pc.max(table["index"]).as_py()
        name = f"{PARTS}/part-{first:010d}-{last:010d}-{uuid.uuid4().hex[:12]}.parquet"
        with self.atomic(name) as stream:
            pq.write_table(table, stream, compression="zstd")
        return self.uri(name)

    @contextmanager
    def atomic(self, name: str) -> Iterator[pa.NativeFile]:
        """A writable stream that becomes `name` only once closed without an error."""
        folder, _, base = self.path(name).rpartition("/")
        tmp = f"{folder}/{_TMP_PREFIX}{uuid.uuid4().hex[:12]}-{base}"
        self.fs.create_dir(folder, recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as stream:
                yield stream
            self.fs.move(tmp, self.path(name))
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic(name) as stream:
            stream.write(data)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as stream:
            return stream.read()

    @contextmanager
    def text_writer(self, name: str) -> Iterator[io.TextIOBase]:
        """A text file written in one stream and moved into place at the end (memory: the writer's buffer)."""
        with self.atomic(name) as stream, io.TextIOWrapper(
            io.BufferedWriter(_Unclosed(stream)), encoding="utf-8", newline="\n"
        ) as text:
            yield text

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    # ---- reading ------------------------------------------------------------------------------------

    def rows(self) -> Iterator[dict]:
        """Every finished row once, in index order, holding only the parts that overlap the current index.

        A part is opened when the merge reaches its first index; rows a retried write stored twice are yielded once."""
        parts = self.parts()
        heap: list[tuple[int, int, dict, Iterator[dict]]] = []
        opened, last = 0, None
        while heap or opened < len(parts):
            if opened < len(parts) and (not heap or parts[opened][0] <= heap[0][0]):
                rows = iter(pq.read_table(parts[opened][2], filesystem=self.fs).to_pylist())
                _push(heap, opened, rows)
                opened += 1
                continue
            index, number, row, rows = heapq.heappop(heap)
            _push(heap, number, rows)
            if index != last:
                last = index
                yield row


def _push(heap: list, number: int, rows: Iterator[dict]) -> None:
    row = next(rows, None)
    if row is not None:
        heapq.heappush(heap, (row["index"], number, row, rows))


class _Unclosed(io.RawIOBase):
    """A raw writable view of a pyarrow stream that leaves closing to its owner."""

    def __init__(self, stream: pa.NativeFile) -> None:
        self.stream = stream

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.stream.write(bytes(data))
        return len(data)
