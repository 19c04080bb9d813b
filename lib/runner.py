"""How a job survives being killed: one lock per output, shards with completion records, manifests,
and atomic publication. Every job goes through `Job` (its lock, shard directory and publisher); nothing else
writes an output directory.

Layout beside an output `OUT` (named in `OutputPaths` only; the `.OUT.hfbatch-` prefix keeps them apart
from a user's files such as `uv.lock` or `foo.partial/`):
    .OUT.hfbatch-lock                 fcntl lock held by the one writer (the kernel drops it when the process dies)
    .OUT.hfbatch-partial/job.json     fingerprint of the run the shards belong to
    .OUT.hfbatch-partial/shards/00003.arrow + 00003.json   a finished shard: data, then its completion record
    .OUT.hfbatch-partial/shards/00003.parts/               a model job's progress inside shard 3 (hfbatch.parts)
    .OUT.hfbatch-tmp-<pid>/           the output being assembled; renamed to OUT only when complete
    .OUT.hfbatch-export.json          for `hfbatch export`'s single-file OUT: the identity of the file it wrote
A directory without manifest.json is never complete: readers refuse it.

hfbatch removes only what it made: an output whose manifest.json is an hfbatch manifest, or a partial or temp
directory holding the marker file `.hfbatch-made`, written right after the directory is created and removed
last. Anything else at these paths (a symlink, a file, a directory without the marker) is refused, never
written through or deleted; so is an output that is, or holds, the current directory, $HOME or an input.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from . import __version__, log
from .errors import Busy, InputError

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
MARKER = ".hfbatch-made"  # in every partial and temp dir hfbatch makes
JOB_FILE = "job.json"


# ---- small durable-file helpers -----------------------------------------------------------------------

def refuse_output_inside_inputs(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse (InputError) an output inside a directory the run reads: embed ds -o ds/emb, train -o MODEL/sub
    --base-model MODEL, export ds -o ds/data-00000-of-00001.arrow. `out` and `inputs` resolved."""
    for path in inputs:
        if path in out.parents:
            raise InputError(f"--output {out} is inside the input {path}, which this run reads: choose an "
                             f"output outside it")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj) -> str:
    """Stable hash of a JSON-able value (config, inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sum_counts(records: Iterable[dict], skip: Iterable[str] = ()) -> dict:
    """Each numeric field summed over `records` (shard records, per-source counts), in first-seen order; the
    fields named in `skip`, and any that is not a number, are left out."""
    skip = set(skip)
    counts: dict = {}
    for record in records:
        for key, value in record.items():
            if key not in skip and isinstance(value, (int, float)):
                counts[key] = counts.get(key, 0) + value
    return counts


MANIFEST_KEYS = ("job", "rows", "config", "inputs")  # what every manifest `Job` writes holds, and readers use


def read_manifest(path: Path) -> dict | None:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        manifest, problem = None, f"{type(exc).__name__}: {exc}"
    else:
        problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{file} is not an hfbatch manifest ({problem}); re-run the job that made {path} "
                         f"with --force")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        return f"no {', '.join(missing)}"
    inputs = manifest["inputs"]
    if not isinstance(manifest["config"], dict) or not isinstance(inputs, list) or \
            not all(isinstance(i, dict) and isinstance(i.get("path"), str) for i in inputs):
        return "its config or inputs are not what hfbatch writes"
    return None


def require_complete(path: Path, what: str = "input") -> dict:
    """The manifest of a finished hfbatch output, or a clear refusal."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    manifest = read_manifest(path)
    if manifest is None:
        raise InputError(f"{what} {path} is not a complete hfbatch output (no {MANIFEST}): it is still being "
                         f"written, its job was killed, or it was not made by hfbatch; (re-)run the job that makes it")
    return manifest


def package_versions() -> dict:
    versions = {"python": sys.version.split()[0], "hfbatch": __version__}
    for name in ("torch", "transformers", "datasets", "pyarrow", "faiss-cpu", "openvino", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ---- input fingerprints --------------------------------------------------------------------------------

def file_input(path: Path, previous: Iterable[dict] = ()) -> dict:
    """A source file: size, mtime and sha256. The sha256 of an unchanged file (same size and mtime as a
    previous run recorded) is reused, so a no-op re-run does not read a 100 GB corpus again (as make does)."""
    path = Path(path).resolve()
    stat = path.stat()
    record = {"kind": "file", "path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for old in previous:
        if old.get("path") == record["path"] and old.get("size") == stat.st_size \
                and old.get("mtime_ns") == stat.st_mtime_ns and old.get("sha256"):
            return {**record, "sha256": old["sha256"]}
    return {**record, "sha256": sha256_file(path)}


def output_input(path: Path) -> dict:
    """An hfbatch output used as input: identified by its manifest, which changes whenever it is rebuilt."""
    path = Path(path).resolve()
    require_complete(path)
    return {"kind": "hfbatch", "path": str(path), "manifest_sha256": sha256_file(path / MANIFEST)[:16]}


def _same_input(a: dict, b: dict) -> bool:
    keys = ("sha256",) if a.get("kind") == "file" else ("manifest_sha256",)
    return a.get("kind") == b.get("kind") and all(a.get(k) == b.get(k) for k in keys)


@dataclass(frozen=True)
class Change:
    """One difference between an existing output and the run asked for: `kind` "job" (another job made it),
    "option" (a config entry `name`) or "input" (the input at path `name`; `old`/`new` are None where it is
    not given any more / is new). str() is the words a user can act on."""

    kind: str
    name: str
    old: object = None
    new: object = None

    def __str__(self) -> str:
        if self.kind == "job":
            return f"it was made by `hfbatch {self.old}`, not `{self.new}`"
        if self.kind == "option":
            return f"option {self.name}: {self.old!r} -> {self.new!r}"
        if self.new is None:
            return f"input {self.name} is no longer given"
        if self.old is None:
            return f"input {self.name} is new"
        return f"input {self.name} changed"


def describe_changes(manifest: dict, job: str, config: dict, inputs: list[dict]) -> list[Change]:
    """What differs between an existing output and the run asked for."""
    changes = []
    if manifest.get("job") != job:
        changes.append(Change("job", "job", manifest.get("job"), job))
    old_config = manifest.get("config", {})
    for key in sorted(set(old_config) | set(config)):
        if old_config.get(key) != config.get(key):
            changes.append(Change("option", key, old_config.get(key), config.get(key)))
    old_inputs = {i["path"]: i for i in manifest.get("inputs", [])}
    new_inputs = {i["path"]: i for i in inputs}
    for path in sorted(set(old_inputs) | set(new_inputs)):
        old, new = old_inputs.get(path), new_inputs.get(path)
        if old is None or new is None or not _same_input(old, new):
            changes.append(Change("input", path, old, new))
    return changes


# ---- hfbatch's own paths beside an output, and what is hfbatch's --------------------------------------

def is_hfbatch_output(path: Path) -> bool:
    """Whether `path` is a real directory (not a symlink) whose manifest.json is an hfbatch manifest."""
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode) or not stat.S_ISREG(os.lstat(path / MANIFEST).st_mode):
            return False
        manifest = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"job", "hfbatch_version"} <= manifest.keys()


def _is_empty_dir(path: Path) -> bool:
    """Whether `path` is a real directory (not a symlink) with nothing in it."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        return next(entries, None) is None


def made_by_hfbatch(path: Path) -> bool:
    """Whether `path` is a real directory that hfbatch made: it holds the marker, or is still empty (a run
    killed between creating it and writing the marker, or one that has already removed everything else)."""
    path = Path(path)
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    return (os.path.isfile(path / MARKER) and not os.path.islink(path / MARKER)) or _is_empty_dir(path)


def make_marked_dir(path: Path) -> Path:
    """Create `path` (it must not exist; a symlink there is not followed) with hfbatch's marker in it."""
    os.mkdir(path)
    (path / MARKER).write_text("made by hfbatch; hfbatch removes this directory when it is done with it\n")
    return path


def remove_made_dir(path: Path) -> None:
    """Remove a directory that hfbatch made (or an old hfbatch output) without ever leaving one that reads
    as a user's: the marker is written first (an old output has none) and removed last, and the files that
    make it usable (job.json, manifest.json) go before the rest, so a kill part-way leaves a marked
    directory that no run resumes or reads, and the next run removes."""
    path = Path(path)
    if not (made_by_hfbatch(path) or is_hfbatch_output(path)):
        raise RuntimeError(f"refusing to remove {path}: hfbatch did not make it")  # a bug: callers check first
    marker = path / MARKER
    if not marker.exists():
        marker.write_text("made by hfbatch; being removed\n")
    for name in (JOB_FILE, MANIFEST):
        (path / name).unlink(missing_ok=True)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name == MARKER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # never follows symlinks inside
            else:
                os.unlink(entry.path)
    marker.unlink()
    os.rmdir(path)


class OutputPaths:
    """The one place that names hfbatch's own paths beside an output OUT (see the module docstring); jobs,
    workers and tests take them from here instead of spelling them out."""

    def __init__(self, output):
        self.output = Path(output)
        self._prefix = f".{self.output.name}.hfbatch-"
        self.lock = self.output.parent / (self._prefix + "lock")
        self.partial = self.output.parent / (self._prefix + "partial")
        self._tmp_name = re.compile(re.escape(self._prefix + "tmp-") + r"\d+(-old)?")

    @property
    def export_record(self) -> Path:
        """What `hfbatch export` wrote at OUT (a file, not a directory: no manifest fits inside it)."""
        return self.output.parent / (self._prefix + "export.json")

    @property
    def shards(self) -> Path:
        return self.partial / "shards"

    def tmp(self, tag=None) -> Path:
        """The temp path of process `tag` (default: this one)."""
        return self.output.parent / f"{self._prefix}tmp-{os.getpid() if tag is None else tag}"

    def temps(self) -> list[Path]:
        """Every temp path of this output there is, by exact name (an output named `a*` matches no other)."""
        try:
            names = os.listdir(self.output.parent)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(self.output.parent / n for n in names if self._tmp_name.fullmatch(n))

    def refuse_foreign(self) -> None:
        """Refuse (InputError, one line) anything at these paths that hfbatch did not make. Reads only."""
        OutputLock(self.output).refuse_foreign()
        if os.path.lexists(self.partial):
            why = _not_made_by_hfbatch(self.partial, outputs_too=False)
            if why is None and os.path.islink(self.shards):
                why = "a directory whose shards/ is a symbolic link"
            if why:
                _refuse(self.partial, why, "work directory (its resumable shards)", self.output)
        for tmp in self.temps():
            why = _not_made_by_hfbatch(tmp, outputs_too=True)
            if why:
                _refuse(tmp, why, "temp directory", self.output)


def _not_made_by_hfbatch(path: Path, outputs_too: bool) -> str | None:
    """Why the directory at `path` is not hfbatch's, in words, or None when it is."""
    if os.path.islink(path):
        return "a symbolic link"
    if not os.path.isdir(path):
        return "not a directory"
    if made_by_hfbatch(path) or (outputs_too and is_hfbatch_output(path)):
        return None
    return f"a directory that hfbatch did not make (no {MARKER} in it)"


def _refuse(path: Path, why: str, role: str, output: Path):
    raise InputError(f"{path} is {why}, where hfbatch keeps the {role} for {output}; hfbatch neither writes "
                     f"through nor deletes it: move it away and re-run")


# ---- the lock ------------------------------------------------------------------------------------------

_LOCK_TEXT = re.compile(r"hfbatch lock, pid (\d+)\n?")


class OutputLock:
    """One writer per output. fcntl locks vanish with their process, so a kill -9 leaves no stale lock.
    The lock file is opened without following a symlink, and only a file that is empty or reads as an
    hfbatch lock is ever written."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = OutputPaths(output).lock
        self._fd: int | None = None

    def _why_foreign(self, fd: int) -> str | None:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        text = os.pread(fd, 64, 0).decode(errors="replace")
        return None if text == "" or _LOCK_TEXT.fullmatch(text) else "a file that is not an hfbatch lock"

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if os.path.islink(self.path):
                why = "a symbolic link"
            elif os.path.isdir(self.path):
                why = "a directory"
            else:
                raise InputError(f"{self.path}: cannot open hfbatch's lock for {self.output} "
                                 f"({exc.strerror}); check the permissions of {self.path.parent}") from None
            _refuse(self.path, why, "lock", self.output)

    def refuse_foreign(self) -> None:
        """Refuse a lock path that is not hfbatch's, reading only (nothing is created)."""
        if not os.path.lexists(self.path):
            return
        fd = self._open(os.O_RDONLY)
        try:
            why = self._why_foreign(fd)
        finally:
            os.close(fd)
        if why:
            _refuse(self.path, why, "lock", self.output)

    def acquire(self) -> None:
        self.refuse_foreign()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open(os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            match = _LOCK_TEXT.fullmatch(os.pread(fd, 64, 0).decode(errors="replace"))
            os.close(fd)
            raise Busy(f"{self.output} is being written by another hfbatch run (pid "
                       f"{match.group(1) if match else 'unknown'}); wait for it to finish or stop it") from None
        why = self._why_foreign(fd)  # again, now that it is ours: it may have changed since the check
        if why:
            os.close(fd)
            _refuse(self.path, why, "lock", self.output)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"hfbatch lock, pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None


# ---- atomic directory replacement ----------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    except (AttributeError, OSError):
        return False
    return rc == 0


def publish_dir(tmp: Path, output: Path) -> None:
    """Make the finished `tmp` appear at `output` in one step: readers see the old or the new, never half.
    The old output (checked by the caller to be an hfbatch output or an empty directory) is then removed."""
    fsync_tree(tmp)
    if output.exists():
        if _exchange(tmp, output):
            old = tmp  # tmp now holds the old output
        else:
            old = OutputPaths(output).tmp(f"{os.getpid()}-old")
            os.rename(output, old)
            os.rename(tmp, output)
        if is_hfbatch_output(old):
            remove_made_dir(old)
        else:
            os.rmdir(old)  # an empty directory made for the output: rmdir, which cannot remove anything in it
    else:
        os.rename(tmp, output)
    fsync_dir(output.parent)


# ---- the job -------------------------------------------------------------------------------------------

class ShardDir:
    """The finished-shard protocol of a `.partial/shards` directory: data file, then its completion record.

    A Job holds one (`job.shards`); a worker process (hfbatch.executor) makes its own on the same directory, so
    several processes can finish different shards of one run.
    """

    def __init__(self, shard_dir: Path):
        self.shard_dir = Path(shard_dir)

    def shard_file(self, index: int, suffix: str = ".arrow") -> Path:
        return self.shard_dir / f"{index:05d}{suffix}"

    def parts(self, index: int, job: str = "hfbatch"):
        """The committed progress inside unfinished shard `index` (hfbatch.parts): what a kill keeps."""
        from .parts import ShardParts

        return ShardParts(self.shard_file(index, ".parts"), index, job)

    def is_done(self, index: int) -> bool:
        return self.shard_file(index, ".json").exists()

    def pending(self, n_shards: int) -> list[int]:
        return [i for i in range(n_shards) if not self.is_done(i)]

    def plan_rows(self, rows: int, shard_rows: int) -> tuple[int, list[int], int]:
        """`rows` rows cut every `shard_rows`: (number of shards, the pending ones, the rows left in them)."""
        n_shards = max(1, -(-rows // shard_rows))
        pending = self.pending(n_shards)
        return n_shards, pending, sum(max(0, min(shard_rows, rows - i * shard_rows)) for i in pending)

    def write_shard(self, index: int, table, rejects: list[dict] | None = None, **counts) -> None:
        """Data first, then the completion record: a shard without its record is redone."""
        rows = self.write_shard_stream(index, table.schema, [table])
        self.finish_shard(index, rows, rejects, **counts)

    def write_shard_stream(self, index: int, schema, tables: Iterable) -> int:
        """Write shard `index`'s data from an iterable of Arrow tables or record batches, so a shard larger
        than memory never sits in memory. It is not done until `finish_shard` syncs and records it (which
        may run in another thread, while the next shard is computed). Returns rows."""
        import pyarrow as pa

        data_path = self.shard_file(index)
        tmp = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}")  # workers never share one
        rows = 0
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for table in tables:
                    writer.write(table)
                    rows += table.num_rows
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, data_path)
        return rows

    def link_shard(self, index: int, data_file: Path) -> bool:
        """Shard `index`'s data as a hard link to `data_file` (an Arrow stream file holding exactly its rows:
        nothing is copied, and that file is never changed in place); False where the filesystem cannot."""
        shard = self.shard_file(index)
        shard.unlink(missing_ok=True)  # (left by a killed attempt at this shard)
        try:
            os.link(data_file, shard)
        except OSError:
            return False
        return True

    def finish_shard(self, index: int, rows: int, rejects: list[dict] | None = None, arrays: dict | None = None,
                     **counts) -> None:
        """Make a written shard's data durable, then record it: its `arrays` ({suffix: numpy array}, e.g. the
        rows' content hashes) and rejects first, the record last."""
        with open(self.shard_file(index), "rb") as fh:
            os.fsync(fh.fileno())
        for suffix, array in (arrays or {}).items():
            import numpy as np

            with open(self.shard_file(index, suffix), "wb") as fh:
                np.save(fh, array)
                fh.flush()
                os.fsync(fh.fileno())
        rejects_path = self.shard_file(index, ".rejects.jsonl")
        if rejects:
            write_bytes_atomic(rejects_path, "".join(json.dumps(r, default=str) + "\n" for r in rejects).encode())
        else:
            rejects_path.unlink(missing_ok=True)  # left by an earlier, killed attempt at this shard
        write_json_atomic(self.shard_file(index, ".json"),
                          {"shard": index, "rows": rows, "rejects": len(rejects or []), **counts})
        shutil.rmtree(self.shard_file(index, ".parts"), ignore_errors=True)  # held in the shard now


class Job:
    """A run of one job on one output, made of parts a reader can hold: the `lock` (OutputLock), the up-to-date
    check against the existing output, the resumable `shards` (ShardDir), and the `publisher` (Publisher).

        with Job("embed", out, config=cfg, datasets=[src], force=force) as job:   # lock, check, resume
            if job.up_to_date:
                return job.summary()
            for shard in job.shards.pending(n_shards):                             # (hfbatch.executor)
                job.shards.write_shard(shard, table, truncated=...)
            assembly = job.publisher.assemble_dataset(n_shards, features)          # into a temp dir
            write_side_file(assembly.dir)                                          # the job's own files
            job.publish(assembly, extra={...})                                     # manifest, rename
    """

    def __init__(self, name: str, output, *, config: dict, files: Iterable = (), datasets: Iterable = (),
                 force: bool = False, incremental: bool = False, reads: Iterable = ()):
        self.name = name
        self.incremental = incremental
        self.previous: dict | None = None  # with --incremental: the manifest of the output being updated
        self.output = Path(output).resolve()
        self.config = config
        self.force = force
        self._file_paths = [Path(p) for p in files]
        self._dataset_paths = [Path(p) for p in datasets]
        # read by the job besides its inputs (a --model, --base-model or --tokenizer directory; search's index's
        # source dataset): an output that is, holds or sits inside one is refused like one over an input
        self._read_paths = [Path(p) for p in reads]
        self.paths = OutputPaths(self.output)
        self.partial = self.paths.partial
        self.lock = OutputLock(self.output)
        self.shards = ShardDir(self.paths.shards)
        self.publisher: Publisher | None = None  # once the run's fingerprint is known
        self.fingerprint: str | None = None
        self.up_to_date = False
        self._made_partial = False  # this run (not an earlier, killed one) made self.partial
        self.manifest: dict | None = None
        self.inputs: list[dict] = []
        self._peeked: list[dict] = []  # the inputs as looks_up_to_date found them
        self.started = time.monotonic()

    def looks_up_to_date(self) -> bool:
        """Whether OUTPUT already holds this run (same job, options and inputs), read without the lock: for a job
        to skip checking its inputs' values where it will not read them (a no-op re-run from cron). The run
        decides again under the lock. An input hashed here is not hashed again there."""
        if self.force or not is_hfbatch_output(self.output):  # (reads only a real directory's regular file)
            return False
        try:
            existing = read_manifest(self.output)
            inputs = self._inputs_now(existing.get("inputs", []))
        except (InputError, OSError):  # a damaged manifest, an input gone: the run says what is wrong
            return False
        self._peeked = inputs[:len(self._file_paths)]
        return not describe_changes(existing, self.name, self.config, inputs)

    def _inputs_now(self, previous: list[dict]) -> list[dict]:
        """The inputs' records as they are now (a file's sha256 reused from `previous` where it is unchanged)."""
        return [file_input(p, previous) for p in self._file_paths] + [output_input(p) for p in self._dataset_paths]

    # -- lifecycle --
    def __enter__(self) -> Job:
        self._refuse_unsafe()  # before the lock: a refused run writes nothing
        self.lock.acquire()
        try:
            self._refuse_unsafe()  # again, now that no other hfbatch run can change these paths
            self._check_existing()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._discard_unfinished(exc)
        finally:
            self.lock.release()  # otherwise, on failure the work directory stays: the next run resumes from it

    def _discard_unfinished(self, exc) -> None:
        """A failed run leaves no half-assembled output, and a run refused for its input leaves no work
        directory that it made itself: the fix changes an input or an option, and with them the fingerprint
        its shards would be resumed under."""
        with contextlib.suppress(OSError):  # the job's own error is the one to report
            tmp = self.paths.tmp()
            if os.path.isdir(tmp) and not os.path.islink(tmp) and made_by_hfbatch(tmp):
                remove_made_dir(tmp)
            if isinstance(exc, InputError) and self._made_partial:
                self._discard_partial(None)

    def _refuse_unsafe(self) -> None:
        """Refuse (InputError, one line) an output that replacing could lose a user's data with. Reads only."""
        out = self.output
        if out == Path(out.anchor):
            raise InputError(f"--output {out} is the root directory; choose a new directory for the output")
        ancestor = next(p for p in out.parents if os.path.lexists(p))
        if not ancestor.is_dir():
            raise InputError(f"--output {out}: {ancestor} is not a directory; choose an output whose parent "
                             f"is a directory")
        inputs = [p.resolve() for p in self._file_paths + self._dataset_paths + self._read_paths]
        refuse_output_inside_inputs(out, inputs)
        protected = [(p, f"the input {p}") for p in inputs]
        home = os.environ.get("HOME")
        if home:
            protected.append((Path(home).resolve(), "your home directory ($HOME)"))
        try:
            protected.append((Path.cwd(), "the current directory"))
        except FileNotFoundError:
            pass
        for path, what in protected:
            if path == out or out in path.parents:
                raise InputError(f"--output {out} {'is' if path == out else 'holds'} {what}, and hfbatch replaces "
                                 f"its output as a whole: choose a new directory for the output")
        if os.path.lexists(out) and not (is_hfbatch_output(out) or _is_empty_dir(out)):
            raise InputError(f"{out} exists and is not an hfbatch output (no hfbatch {MANIFEST}); hfbatch never "
                             f"replaces a directory it did not make: choose another --output or move it away")
        self.paths.refuse_foreign()

    def _partial_job(self) -> dict | None:
        """The job.json of the work directory (already checked to be hfbatch's), or None where there is none
        or it cannot be read (a run killed while making or removing it: nothing there to resume)."""
        try:
            job = json.loads((self.partial / JOB_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return job if isinstance(job, dict) else None

    def _discard_partial(self, reason: str | None) -> None:
        """Remove the work directory (already checked to be hfbatch's); `reason` is logged unless None."""
        if os.path.lexists(self.partial):
            if reason:
                log.event(self.name, "discarding_partial", partial=self.partial, reason=reason)
            remove_made_dir(self.partial)

    def _check_existing(self) -> None:
        for stale in self.paths.temps():
            remove_made_dir(stale)  # a killed run's half-assembled (or replaced) output; we hold the lock
        existing = read_manifest(self.output) if self.output.exists() else None
        partial_job = self._partial_job()
        if partial_job is None:
            self._discard_partial("nothing to resume (no job.json)")
        elif existing is not None and partial_job.get("fingerprint") == existing.get("fingerprint"):
            # killed after publishing, before removing its work directory: the output holds all of it
            self._discard_partial("its run was already published")
            partial_job = None
        previous = list((existing or {}).get("inputs", [])) + list((partial_job or {}).get("inputs", [])) + \
            self._peeked
        self.inputs = self._inputs_now(previous)
        self.fingerprint = fingerprint({"job": self.name, "config": self.config, "inputs": self.inputs})
        self.publisher = Publisher(self.name, self.paths, self.shards, self.fingerprint)

        if existing is not None and not self.force:
            changes = describe_changes(existing, self.name, self.config, self.inputs)
            if not changes:
                self.up_to_date = True
                self.manifest = existing
                log.event(self.name, "up_to_date", output=self.output)
                return
            said = "; ".join(map(str, changes))
            if self.incremental and all(c.kind == "input" for c in changes):
                self.previous = existing
                log.event(self.name, "incremental", output=self.output, changes=said)
            else:
                hint = ("--incremental updates an output only when its options are unchanged; pass --force"
                        if self.incremental else "pass --force to recompute it (or --incremental where offered)")
                raise InputError(f"{self.output} was made from other inputs or options ({said}); "
                                 f"{hint}")
        self._prepare_partial(partial_job)

    def _prepare_partial(self, old: dict | None) -> None:
        if old is not None:
            if old.get("fingerprint") == self.fingerprint and not self.force:
                done = len(list(self.shards.shard_dir.glob("*.json")))
                for stale in self.shards.shard_dir.glob(".*.tmp-*"):
                    stale.unlink(missing_ok=True)  # a killed writer's half shard; we hold the lock
                log.event(self.name, "resuming", partial=self.partial, shards_done=done)
                return
            self._discard_partial("force" if self.force else "different inputs or options")
        make_marked_dir(self.partial)
        self.shards.shard_dir.mkdir()
        self._made_partial = True
        write_json_atomic(self.partial / JOB_FILE, {"job": self.name, "fingerprint": self.fingerprint,
                                                    "config": self.config, "inputs": self.inputs})

    # -- publishing --
    def _manifest(self, rows: int, counts: dict, extra: dict) -> dict:
        return {
            "job": self.name,
            "hfbatch_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            # unique per publish: downstream jobs key their inputs on the manifest's hash, and two rebuilds
            # within the same second must still read as a change
            "build_id": uuid.uuid4().hex,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "output": str(self.output),
            "rows": rows,
            "counts": counts,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "versions": package_versions(),
            **extra,
        }

    def publish(self, assembly: Assembly, extra: dict | None = None) -> dict:
        """Publish the assembled output (see Publisher) with its manifest (`extra`: the job's own keys)."""
        manifest = self._manifest(assembly.rows, assembly.counts, {**assembly.extra, **(extra or {})})
        self.publisher.publish(assembly, manifest)
        # a kill before this is finished leaves a work directory whose fingerprint is the output's own:
        # the next run removes it (_check_existing)
        self._discard_partial(None)
        self.manifest = manifest
        log.event(self.name, "published", output=self.output, rows=manifest["rows"],
                  seconds=manifest["elapsed_s"])
        return manifest

    def publish_dataset(self, n_shards: int, features, extra: dict | None = None, **assemble) -> dict:
        """`publisher.assemble_dataset(n_shards, features, **assemble)` then `publish`, for an output that is
        its shards' rows and nothing else."""
        return self.publish(self.publisher.assemble_dataset(n_shards, features, **assemble), extra)

    def summary(self) -> dict:
        manifest = self.manifest or {}
        return {"job": self.name, "status": "up_to_date" if self.up_to_date else "ok", "output": str(self.output),
                "rows": manifest.get("rows"), **{k: v for k, v in manifest.get("counts", {}).items()}}


@dataclass
class Assembly:
    """An output being assembled in `dir`, a marked temp directory beside it (the job writes its side files
    there), with the rows and counts its manifest will hold. `joined`: the finished shards as one dataset,
    with every shard column (a shard-only one, such as embed's text hashes, too) and before a sample's
    selection; None where the shards became the output's data files themselves."""

    dir: Path
    rows: int
    counts: dict
    extra: dict = field(default_factory=dict)  # manifest keys (the features)
    joined: object = None


class Publisher:
    """From finished shards to a published output, in two explicit steps: assemble (`assemble_dataset` joins
    the shards into a saved dataset, `assemble_files` gives an empty directory for other outputs), then, once
    the job has written its side files into `assembly.dir`, `publish` (manifest, fsync, atomic rename)."""

    def __init__(self, name: str, paths: OutputPaths, shards: ShardDir, fingerprint: str):
        self.name, self.paths, self.shards, self.fingerprint = name, paths, shards, fingerprint

    def shard_records(self, n_shards: int) -> list[dict]:
        missing = self.shards.pending(n_shards)
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are not finished")  # a bug: publish before all shards
        return [json.loads(self.shards.shard_file(i, ".json").read_text()) for i in range(n_shards)]

    def _tmp_output(self) -> Path:
        """A new, marked, empty directory beside the output to assemble it in."""
        tmp = self.paths.tmp()
        if os.path.lexists(tmp):  # swept at the start; left by an attempt of this run that fell back
            remove_made_dir(tmp)
        return make_marked_dir(tmp)

    def assemble_files(self, rows: int, counts: dict | None = None) -> Assembly:
        """An empty directory for an output that is not a dataset (a FAISS index): the job writes its files."""
        return Assembly(self._tmp_output(), rows, dict(counts or {}))

    def assemble_dataset(self, n_shards: int, features, *, rows=None, max_shard_size="500MB",
                         reuse_shards: bool = False) -> Assembly:
        """Join the finished shards (memory-mapped, in order) into one `save_to_disk` dataset of the
        `features` columns; `rows` (indices, in order) keeps only those rows (a sample). With `reuse_shards`
        (for shards that are the output's rows, in order, in the schema of `features`), the shards become the
        output's data files without being copied again, when they are no larger than `max_shard_size`.

        `features` given in `to_dict()` form (embed, classify) are saved with pyarrow alone
        (hfbatch.dataset.save_table), so those jobs never import datasets; `datasets.Features` with datasets."""
        from .sizes import parse_size

        records = self.shard_records(n_shards)
        counts = sum_counts(records, skip=("shard", "rows"))
        plain = not hasattr(features, "to_dict")  # (datasets.Features is a dict too)
        extra = {"features": features if plain else features.to_dict()}
        limit = int(parse_size(max_shard_size, option="max_shard_size"))
        if reuse_shards and rows is None:
            tmp = self._tmp_output()
            linked = self._link_shards(records, extra["features"], tmp, limit)
            if linked is not None:
                counts["rejects"] = self._gather_rejects(n_shards, tmp)
                return Assembly(tmp, linked, counts, extra)
        if plain and any(r["rows"] for r in records):
            assembly = self._save_with_pyarrow(records, features, rows, limit)
        else:
            assembly = self._save_with_datasets(records, features, rows, max_shard_size)
        assembly.counts = {**counts, "rejects": self._gather_rejects(n_shards, assembly.dir)}
        assembly.extra = extra
        return assembly

    def _save_with_pyarrow(self, records: list[dict], features: dict, rows, limit: int) -> Assembly:
        import numpy as np
        import pyarrow as pa

        from .dataset import arrow_array, memory_mapped_table, save_table

        tables = [memory_mapped_table(self.shards.shard_file(r["shard"])) for r in records if r["rows"] > 0]
        joined = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        table = joined.take(arrow_array(rows, np.int64)) if rows is not None else joined
        columns = list(features)
        table = table.select(columns) if table.schema.names != columns else table
        tmp = self._tmp_output()
        try:
            save_table(tmp, table, self.fingerprint, limit)
        except TypeError as exc:  # a column type hfbatch.dataset does not map: datasets saves it
            log.event(self.name, "saving_with_datasets", reason=str(exc))
            remove_made_dir(tmp)
            return self._save_with_datasets(records, features, rows, limit)
        return Assembly(tmp, table.num_rows, {}, {}, joined)

    def _save_with_datasets(self, records: list[dict], features, rows, max_shard_size) -> Assembly:
        import datasets

        parts = [datasets.Dataset.from_file(str(self.shards.shard_file(r["shard"]))) for r in records
                 if r["rows"] > 0]
        if parts:
            joined = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        else:
            if not hasattr(features, "to_dict"):  # features in to_dict() form
                features = datasets.Features.from_dict(features)
            joined = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        dataset = joined.select(rows) if rows is not None else joined
        tmp = self._tmp_output()
        if set(dataset.column_names) != set(features):
            dataset = dataset.select_columns(list(features))
        # (datasets saves no data file at all for no rows, and then cannot load what it saved)
        dataset.save_to_disk(str(tmp), **({"max_shard_size": max_shard_size} if len(dataset) else {"num_shards": 1}))
        return Assembly(tmp, len(dataset), {}, {}, joined.data.table)

    def _link_shards(self, records: list[dict], features: dict, tmp: Path, limit: int) -> int | None:
        """save_to_disk's layout around the shards themselves (hard links: the .partial goes away after); the
        result is opened and its row count checked before it is used. None (nothing kept) where that cannot
        be done: the caller copies."""
        from .dataset import SavedDataset, save_around

        shards = [self.shards.shard_file(r["shard"]) for r in records if r["rows"] > 0]
        if not shards or any(p.stat().st_size > 2 * limit for p in shards):
            return None
        try:
            save_around(tmp, features, shards, self.fingerprint)
            rows = len(SavedDataset.open(tmp))
            if rows == sum(r["rows"] for r in records):
                return rows
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # e.g. no hard links here
            log.event(self.name, "copying_shards", reason=f"{type(exc).__name__}: {exc}")
        remove_made_dir(tmp)
        return None

    def _gather_rejects(self, n_shards: int, tmp: Path) -> int:
        count = 0
        with open(tmp / REJECTS, "wb") as out:
            for i in range(n_shards):
                part = self.shards.shard_file(i, ".rejects.jsonl")
                if part.exists():
                    data = part.read_bytes()
                    count += data.count(b"\n")
                    out.write(data)
        if count == 0:
            (tmp / REJECTS).unlink()
        return count

    def publish(self, assembly: Assembly, manifest: dict) -> None:
        """The manifest into the assembled directory, then the directory at the output in one step."""
        tmp = assembly.dir
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / MARKER).unlink()  # the output is known as hfbatch's by its manifest (a kill here: see temps())
        publish_dir(tmp, self.paths.output)
