"""How a job survives being killed: one lock per output, shards with completion records, manifests,
and atomic publication. Every job goes through `Job`; nothing else writes an output directory.

Layout beside an output `OUT`:
    OUT.lock                  fcntl lock held by the one writer (the kernel drops it when the process dies)
    OUT.partial/job.json      fingerprint of the run the shards belong to
    OUT.partial/shards/00003.arrow + 00003.json   a finished shard: data, then its completion record
    OUT.partial/shards/00003.parts/               a model job's progress inside shard 3 (hfbatch.parts)
    .OUT.tmp-<pid>/           the output being assembled; renamed to OUT only when complete
A directory without manifest.json is never complete: readers refuse it.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from . import __version__, log
from .errors import Busy, InputError

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


# ---- small durable-file helpers -----------------------------------------------------------------------

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


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}/{MANIFEST} is corrupt ({exc}); re-run the job that made {path} with --force")


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


def describe_changes(manifest: dict, job: str, config: dict, inputs: list[dict]) -> list[str]:
    """What differs between an existing output and the run asked for, in words a user can act on."""
    changes = []
    if manifest.get("job") != job:
        changes.append(f"it was made by `hfbatch {manifest.get('job')}`, not `{job}`")
    old_config = manifest.get("config", {})
    for key in sorted(set(old_config) | set(config)):
        if old_config.get(key) != config.get(key):
            changes.append(f"option {key}: {old_config.get(key)!r} -> {config.get(key)!r}")
    old_inputs = {i["path"]: i for i in manifest.get("inputs", [])}
    new_inputs = {i["path"]: i for i in inputs}
    for path in sorted(set(old_inputs) | set(new_inputs)):
        if path not in new_inputs:
            changes.append(f"input {path} is no longer given")
        elif path not in old_inputs:
            changes.append(f"input {path} is new")
        elif not _same_input(old_inputs[path], new_inputs[path]):
            changes.append(f"input {path} changed")
    return changes


# ---- the lock ------------------------------------------------------------------------------------------

class OutputLock:
    """One writer per output. fcntl locks vanish with their process, so a kill -9 leaves no stale lock."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Busy(f"{self.path.with_suffix('')} is being written by another hfbatch run (pid {holder}); "
                       f"wait for it to finish or stop it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
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
    """Make the finished `tmp` appear at `output` in one step: readers see the old or the new, never half."""
    fsync_tree(tmp)
    if output.exists():
        if _exchange(tmp, output):
            shutil.rmtree(tmp)  # tmp now holds the old output
        else:
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old)
    else:
        os.rename(tmp, output)
    fsync_dir(output.parent)


# ---- the job -------------------------------------------------------------------------------------------

class ShardDir:
    """The finished-shard protocol of a `.partial/shards` directory: data file, then its completion record.

    A Job is one; a worker process (hfbatch.devices) makes its own on the same directory, so several processes
    can finish different shards of one run.
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

    def finish_shard(self, index: int, rows: int, rejects: list[dict] | None = None, **counts) -> None:
        """Make a written shard's data durable, then record it (rejects first: the record is last)."""
        with open(self.shard_file(index), "rb") as fh:
            os.fsync(fh.fileno())
        rejects_path = self.shard_file(index, ".rejects.jsonl")
        if rejects:
            write_bytes_atomic(rejects_path, "".join(json.dumps(r, default=str) + "\n" for r in rejects).encode())
        else:
            rejects_path.unlink(missing_ok=True)  # left by an earlier, killed attempt at this shard
        write_json_atomic(self.shard_file(index, ".json"),
                          {"shard": index, "rows": rows, "rejects": len(rejects or []), **counts})
        shutil.rmtree(self.shard_file(index, ".parts"), ignore_errors=True)  # held in the shard now


class Job(ShardDir):
    """A run of one job on one output: lock, up-to-date check, resumable shards, atomic publish.

        with Job("embed", out, config=cfg, datasets=[src], force=force) as job:
            if job.up_to_date:
                return job.summary()
            for shard in job.pending(n_shards):
                job.write_shard(shard, table, rows_in=...)
            job.publish_dataset(features, extra={...})
    """

    def __init__(self, name: str, output, *, config: dict, files: Iterable = (), datasets: Iterable = (),
                 force: bool = False, incremental: bool = False):
        self.name = name
        self.incremental = incremental
        self.previous: dict | None = None  # with --incremental: the manifest of the output being updated
        self.output = Path(output).resolve()
        self.config = config
        self.force = force
        self._file_paths = [Path(p) for p in files]
        self._dataset_paths = [Path(p) for p in datasets]
        self.partial = self.output.with_name(self.output.name + ".partial")
        self.shard_dir = self.partial / "shards"
        self.lock = OutputLock(self.output)
        self.up_to_date = False
        self.manifest: dict | None = None
        self.inputs: list[dict] = []
        self.started = time.monotonic()

    # -- lifecycle --
    def __enter__(self) -> Job:
        self.lock.acquire()
        try:
            self._check_existing()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()  # on failure the .partial stays: the next run resumes from it

    def _check_existing(self) -> None:
        for stale in self.output.parent.glob(f".{self.output.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's half-assembled output; we hold the lock
        existing = read_manifest(self.output) if self.output.exists() else None
        previous = list((existing or {}).get("inputs", []))
        previous += json.loads((self.partial / "job.json").read_text()).get("inputs", []) \
            if (self.partial / "job.json").exists() else []
        self.inputs = [file_input(p, previous) for p in self._file_paths] + \
                      [output_input(p) for p in self._dataset_paths]
        self.fingerprint = fingerprint({"job": self.name, "config": self.config, "inputs": self.inputs})

        if self.output.exists() and existing is None and not self.force:
            raise InputError(f"{self.output} exists and is not an hfbatch output (no {MANIFEST}); "
                             f"choose another --output or pass --force to replace it")
        if existing is not None and not self.force:
            changes = describe_changes(existing, self.name, self.config, self.inputs)
            if not changes:
                self.up_to_date = True
                self.manifest = existing
                log.event(self.name, "up_to_date", output=self.output)
                return
            if self.incremental and all(c.startswith("input ") for c in changes):
                self.previous = existing
                log.event(self.name, "incremental", output=self.output, changes="; ".join(changes))
            else:
                hint = ("--incremental updates an output only when its options are unchanged; pass --force"
                        if self.incremental else "pass --force to recompute it (or --incremental where offered)")
                raise InputError(f"{self.output} was made from other inputs or options ({'; '.join(changes)}); "
                                 f"{hint}")
        self._prepare_partial()

    def _prepare_partial(self) -> None:
        job_file = self.partial / "job.json"
        if job_file.exists():
            old = json.loads(job_file.read_text())
            if old.get("fingerprint") == self.fingerprint and not self.force:
                done = len(list(self.shard_dir.glob("*.json")))
                for stale in self.shard_dir.glob(".*.tmp-*"):
                    stale.unlink(missing_ok=True)  # a killed writer's half shard; we hold the lock
                log.event(self.name, "resuming", partial=self.partial, shards_done=done)
                return
            log.event(self.name, "discarding_partial", partial=self.partial,
                      reason="force" if self.force else "different inputs or options")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.shard_dir.mkdir(parents=True)
        write_json_atomic(job_file, {"job": self.name, "fingerprint": self.fingerprint,
                                     "config": self.config, "inputs": self.inputs})

    def shard_records(self, n_shards: int) -> list[dict]:
        missing = self.pending(n_shards)
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are not finished")  # a bug: publish before all shards
        return [json.loads(self.shard_file(i, ".json").read_text()) for i in range(n_shards)]

    # -- publishing --
    def _tmp_output(self) -> Path:
        tmp = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        return tmp

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

    def publish_dataset(self, n_shards: int, features, extra: dict | None = None,
                        max_shard_size: str = "500MB", prepare: Callable | None = None,
                        reuse_shards: bool = False, fill: Callable | None = None,
                        side_files: Callable[[Path], None] | None = None) -> dict:
        """Join the finished shards (memory-mapped, in order) into one `save_to_disk` dataset of the
        `features` columns. `prepare(dataset) -> dataset` may select rows first (a sample);
        `fill(tmp_dir, joined_shards)` may write side files from shard-only columns; `side_files(tmp_dir)`
        writes side files from elsewhere (it keeps the shards reusable). With `reuse_shards`
        (for shards that are the output's rows, in order, in the schema of `features`), the shards become
        the output's data files without being copied again, when they are no larger than `max_shard_size`."""
        import datasets

        records = self.shard_records(n_shards)
        if reuse_shards and prepare is None and fill is None:
            tmp = self._tmp_output()
            rows = self._link_shards(records, features, tmp, max_shard_size)
            if rows is not None:
                counts = self._sum_counts(records)
                counts["rejects"] = self._gather_rejects(n_shards, tmp)
                if side_files is not None:
                    side_files(tmp)
                extra = {"features": features.to_dict(), **(extra or {})}
                return self._finish(tmp, self._manifest(rows, counts, extra))
        parts = [datasets.Dataset.from_file(str(self.shard_file(i))) for i in range(n_shards)
                 if records[i]["rows"] > 0]
        if parts:
            dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        else:
            dataset = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        if prepare is not None:
            dataset = prepare(dataset)
        tmp = self._tmp_output()
        tmp.mkdir(parents=True)
        if fill is not None:  # side files from shard-only columns, written before the atomic rename
            fill(tmp, dataset)
        if set(dataset.column_names) != set(features):
            dataset = dataset.select_columns(list(features))
        dataset.save_to_disk(str(tmp), max_shard_size=max_shard_size)
        if side_files is not None:
            side_files(tmp)
        n_rejects = self._gather_rejects(n_shards, tmp)
        counts = self._sum_counts(records)
        counts["rejects"] = n_rejects
        manifest = self._manifest(len(dataset), counts, {"features": features.to_dict(), **(extra or {})})
        return self._finish(tmp, manifest)

    @staticmethod
    def _sum_counts(records: list[dict]) -> dict:
        counts = {}
        for record in records:
            for key, value in record.items():
                if key not in ("shard", "rows") and isinstance(value, (int, float)):
                    counts[key] = counts.get(key, 0) + value
        return counts

    def _link_shards(self, records: list[dict], features, tmp: Path, max_shard_size) -> int | None:
        """save_to_disk's layout around the shards themselves (hard links: the .partial goes away after),
        with datasets' own metadata files; the result is opened with load_from_disk and its row count
        checked before it is used. None (nothing kept) where that cannot be done: the caller copies."""
        import datasets
        from datasets.utils.py_utils import convert_file_size_to_int

        limit = convert_file_size_to_int(max_shard_size)
        shards = [self.shard_file(r["shard"]) for r in records if r["rows"] > 0]
        if not shards or any(p.stat().st_size > 2 * limit for p in shards):
            return None
        try:
            datasets.Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(str(tmp))
            state = json.loads((tmp / "state.json").read_text())
            for old in state["_data_files"]:
                (tmp / old["filename"]).unlink()
            names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
            for shard, name in zip(shards, names):
                os.link(shard, tmp / name)
            state.update(_data_files=[{"filename": n} for n in names], _fingerprint=self.fingerprint)
            (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
            rows = len(datasets.load_from_disk(str(tmp)))
            if rows == sum(r["rows"] for r in records):
                return rows
        except (OSError, ValueError, KeyError, TypeError) as exc:  # e.g. no hard links on this filesystem
            log.event(self.name, "copying_shards", reason=f"{type(exc).__name__}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)
        return None

    def publish_files(self, fill: Callable[[Path], None], rows: int, extra: dict | None = None,
                      counts: dict | None = None) -> dict:
        """For outputs that are not datasets (a FAISS index): `fill(tmp_dir)` writes the files."""
        tmp = self._tmp_output()
        tmp.mkdir(parents=True)
        fill(tmp)
        return self._finish(tmp, self._manifest(rows, counts or {}, extra or {}))

    def _gather_rejects(self, n_shards: int, tmp: Path) -> int:
        count = 0
        with open(tmp / REJECTS, "wb") as out:
            for i in range(n_shards):
                part = self.shard_file(i, ".rejects.jsonl")
                if part.exists():
                    data = part.read_bytes()
                    count += data.count(b"\n")
                    out.write(data)
        if count == 0:
            (tmp / REJECTS).unlink()
        return count

    def _finish(self, tmp: Path, manifest: dict) -> dict:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        publish_dir(tmp, self.output)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.manifest = manifest
        log.event(self.name, "published", output=self.output, rows=manifest["rows"],
                  seconds=manifest["elapsed_s"])
        return manifest

    def summary(self) -> dict:
        manifest = self.manifest or {}
        return {"status": "up_to_date" if self.up_to_date else "ok", "output": str(self.output),
                "rows": manifest.get("rows"), **{k: v for k, v in manifest.get("counts", {}).items()}}
