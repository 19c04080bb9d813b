"""One loop for every job's shards: claim a pending shard, compute it, write it, record it; a re-run resumes
from the completion records. ingest, tokenize, embed and classify all run through `run_shards`.

The seam between a job and an executor is the job's *work*: a factory `make_work(device) -> work`
(picklable where the job offers --devices: it is called in each worker process), where `work` has
  - `info`: a dict for the manifest (dim, max_length, device/precision/backend in force, ...; {} if none);
  - `prepare(i)`: the CPU side of shard i (read rows, tokenize), run in a thread one shard ahead;
  - `compute(i, prepared, on_rows, parts) -> (data, counts)`: the rest of shard i. `on_rows(n)` reports
    progress; `parts` (hfbatch.parts.ShardParts) goes to a model's batch loop, which commits the shard's
    finished batches every few seconds and, on a re-run, takes the batches a killed attempt committed.
    `data` is an Arrow table, or a `Stream` (batches written as they come, so a shard larger than memory
    never sits in memory). `counts` are the fields of the shard's completion record (summed into the
    manifest's counts where numeric), or a function returning them, called once `data` is written; a
    `rejects` list is written beside the record, `arrays` ({suffix: numpy array}) are saved beside the shard.
  - optionally `recorded(i)`: called in the loop's thread once shard i's record is durable (ingest stops
    early there when --max-rejects is exceeded).
An executor runs that work over the pending shards and writes them with the runner's shard protocol
(hfbatch.runner.ShardDir: data file, then completion record). Records are written in a thread while the
next shard is computed, one at a time and in order, so a kill leaves the first shards done. The output is
assembled in shard order, so rows come out in the dataset's order whatever process computed them.

Two executors exist, both around the one loop `compute_shards`:
  - in this process, on the job's own --device (`make_work(None)`);
  - with `--devices`, one spawned worker process per device (never forked: CUDA and the tokenizers' thread
    pools do not survive a fork). Workers claim shards one at a time from a shared counter (a faster device
    takes more), ignore Ctrl-C (the coordinator stops them) and die with the coordinating process
    (hfbatch.devices); a worker sees only its own device.
  - with `executor` (--executor ray), a pool of Ray actors (hfbatch.ray_executor), each running
    `compute_shards` over the shards it claims, with the same `make_work` factories and shard directory.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import log
from .batching import prefetch
from .errors import EXIT_FAILED, HfbatchError, InputError, JobFailed


@dataclass
class Stream:
    """A shard's data as it comes: Arrow tables or record batches of `schema`. With `link`, an Arrow stream
    file that holds exactly these rows already (an older output's data file): it is hard-linked as the
    shard, where the filesystem allows, instead of writing `tables` (then only counted)."""

    schema: object
    tables: Iterable
    link: Path | None = None


@dataclass
class ShardsDone:
    """What `run_shards` did: the work's `info`, and the model rows of this run (computed here, or taken
    from parts that a killed run committed)."""

    info: dict
    rows_computed: int = 0
    rows_resumed: int = 0
    workers: list[dict] | None = None  # the Ray executor's workers and the shards each computed

    def add(self, computed: int, resumed: int) -> None:
        self.rows_computed += computed
        self.rows_resumed += resumed

    def summary(self) -> dict:
        summary = {"rows_computed": self.rows_computed, "rows_resumed": self.rows_resumed}
        if self.workers is not None:
            summary["workers"] = self.workers
        return summary


def run_shards(job_name: str, shards, pending: list[int], make_work: Callable, devices: list[str] | None = None,
               progress: log.Progress | None = None, executor=None, device: str = "auto",
               inputs: Iterable = ()) -> ShardsDone:
    """Finish the `pending` shards of the shard directory `shards` (hfbatch.runner.ShardDir). Without
    `devices`, `make_work(None)` runs here, on the job's own --device; with them, on one worker per device
    (then `info` has `devices`); with `executor` (hfbatch.ray_executor.RayExecutor), on a Ray actor pool
    that runs `compute_shards` over the same factory and shard directory (`inputs`: the paths every node
    must see; `device`: the job's --device)."""
    on_rows = progress.update if progress is not None else (lambda n: None)
    if executor is not None:
        from .ray_executor import run_on_ray

        done = run_on_ray(job_name, shards, pending, make_work, executor, device, progress or log.Progress(
            job_name, None), [str(p) for p in inputs])
    elif not devices:
        work = make_work(None)
        done = ShardsDone(dict(getattr(work, "info", {})))
        compute_shards(work, shards, pending, job_name, on_rows, on_shard=lambda i, *rows: done.add(*rows))
    else:
        done = _run_workers(job_name, shards, pending, make_work, devices, on_rows)
    if done.rows_computed or done.rows_resumed:  # a model job (ingest and tokenize run no batches)
        log.event(job_name, "model_rows", computed=done.rows_computed, resumed=done.rows_resumed)
    return done


def run_job_shards(job, rows: int, shard_rows: int, make_work: Callable, devices: list[str] | None = None,
                   **executor_options) -> tuple[int, ShardsDone]:
    """A dataset job's shards of `rows` rows, `shard_rows` each: the pending ones run (`run_shards`, with its
    `executor`/`device`/`inputs`) under a progress bar over the rows left; (number of shards, what was done)."""
    n_shards, pending, pending_rows = job.shards.plan_rows(rows, shard_rows)
    with log.Progress(job.name, pending_rows) as progress:
        done = run_shards(job.name, job.shards, pending, make_work, devices, progress, **executor_options)
    return n_shards, done


def compute_shards(work, shards, indices: Iterable[int], job_name: str, on_rows: Callable[[int], None],
                   on_shard: Callable | None = None, worker: str | None = None) -> None:
    """The loop: each shard of `indices` (taken lazily: a worker's claims) computed by `work`, written, then
    recorded in a thread while the next one is computed. `on_shard(i, rows_computed, rows_resumed)` follows
    each record; `worker` (text, not summed as a count) goes into the records."""
    recorded = getattr(work, "recorded", None)
    in_flight = []  # the shard being recorded: (index, future, its parts)

    def settle():
        """The shard being recorded is durable, and reported."""
        while in_flight:
            i, future, parts = in_flight.pop()
            future.result()
            if on_shard is not None:
                on_shard(i, parts.rows_computed, parts.rows_resumed)
            if recorded is not None:
                recorded(i)

    with ThreadPoolExecutor(1) as recorder:
        for i, prepared in prefetch(work.prepare, indices):  # the next shard is read and tokenized meanwhile
            parts = shards.parts(i, job_name)
            # no part of this shard is committed before the last shard's record: after a kill, what is done
            # does not depend on how fast the recorder was
            parts.before_commit = settle
            data, counts = work.compute(i, prepared, on_rows, parts)
            rows = _write(shards, i, data)
            counts = dict(counts() if callable(counts) else counts)
            if worker is not None:
                counts["worker"] = worker
            settle()
            in_flight.append((i, recorder.submit(shards.finish_shard, i, rows, **counts), parts))
        settle()


def _write(shards, i: int, data) -> int:
    """Shard i's data file (not yet durable: its record's `finish_shard` syncs it); returns its rows."""
    if not isinstance(data, Stream):
        return shards.write_shard_stream(i, data.schema, [data])
    if data.link is not None and shards.link_shard(i, data.link):
        return sum(t.num_rows for t in data.tables)
    return shards.write_shard_stream(i, data.schema, data.tables)


def _run_workers(job_name, shards, pending, make_work, devices, on_rows) -> ShardsDone:
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    # Shards are handed out by a shared counter into `pending` (no task queue: a queue of 10k+ indices
    # has a feeder thread that a failing run would wait on forever).
    claimed, results = ctx.Value("q", 0), ctx.Queue()
    workers = [ctx.Process(target=_worker, name=f"hfbatch-{job_name}-{device}", daemon=True,
                           args=(make_work, device, rank, len(devices), os.getpid(), job_name, str(shards.shard_dir),
                                 pending, claimed, results))
               for rank, device in enumerate(devices)]
    log.event(job_name, "workers", devices=",".join(devices), shards=len(pending))
    # Ctrl-C is the coordinator's to handle (it stops the workers): they start with SIGINT ignored, so no
    # worker prints a KeyboardInterrupt traceback, even while it is still importing.
    try:
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        sigint = None
    try:
        for w in workers:
            w.start()
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    infos: dict[int, dict] = {}
    shards_by: dict[int, int] = dict.fromkeys(range(len(devices)), 0)
    finished: set[int] = set()
    done = ShardsDone({})  # its info once every worker is ready

    def handle(kind, rank, payload):
        if kind == "rows":
            on_rows(payload)
        elif kind == "shard":
            shards_by[rank] += 1
            done.add(*payload[1:])  # (shard, rows computed, rows resumed)
        elif kind == "ready":
            infos[rank] = payload
            _check_same_settings(infos, devices)
        elif kind == "done":
            finished.add(rank)
        elif kind == "error":
            code, message = payload
            raise (InputError if code == InputError.exit_code else JobFailed)(f"{message} (worker on {devices[rank]})")

    try:
        checked = time.monotonic()
        while len(finished) < len(workers):
            try:
                handle(*results.get(timeout=1.0))
            except queue.Empty:
                pass
            if time.monotonic() - checked < 1.0:
                continue
            checked = time.monotonic()  # a worker killed (OOM, signal) sends nothing: look at exit codes
            dead = [r for r, w in enumerate(workers) if r not in finished and w.exitcode is not None]
            if dead:
                drain_until = time.monotonic() + 2.0  # its last messages (an error line, "done") may be queued
                try:
                    while time.monotonic() < drain_until:
                        handle(*results.get(timeout=0.5))
                except queue.Empty:
                    pass
                dead = [r for r in dead if r not in finished]
                if dead:
                    raise JobFailed(f"the worker on {devices[dead[0]]} died (exit code {workers[dead[0]].exitcode}) "
                                    f"before finishing; finished shards are kept: run the same command again "
                                    f"to resume")
        for w in workers:
            w.join()
    finally:
        _stop(workers)
        results.close()
        results.cancel_join_thread()
    left = [i for i in pending if not shards.is_done(i)]
    if left:
        raise JobFailed(f"shards {left[:5]} were not finished by the workers; run the same command again")
    info = dict(infos[0])
    info["device"] = ",".join(devices)
    info["devices"] = [{"device": devices[r], "precision": infos[r].get("precision"),
                        "backend": infos[r].get("backend"), "shards": shards_by[r]} for r in sorted(infos)]
    done.info = info
    return done


def _stop(workers, grace: float = 5.0) -> None:
    """End workers still running (another failed, or Ctrl-C): SIGTERM first, which they turn into a normal
    exit between two batches (so what they registered with multiprocessing's resource tracker is released,
    and it prints no "leaked semaphore" warnings), then SIGKILL whatever is left after `grace` seconds."""
    running = [w for w in workers if w.is_alive()]
    for w in running:
        w.terminate()
    deadline = time.monotonic() + grace
    for w in running:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            w.kill()
            w.join()


def _check_same_settings(infos: dict[int, dict], devices: list[str], option: str = "--devices") -> None:
    """Workers must compute rows alike: two GPUs where `--precision auto` resolves differently (bf16 on one,
    fp16 on an older one) would mix precisions in one output."""
    keys = ("precision", "backend", "dim", "max_length")
    first = min(infos)
    for rank, info in infos.items():
        differ = [k for k in keys if info.get(k) != infos[first].get(k)]
        if differ:
            said = ", ".join(f"{k} {infos[first].get(k)} on {devices[first]} but {info.get(k)} on {devices[rank]}"
                             for k in differ)
            raise InputError(f"{option}: the workers would compute rows differently ({said}); "
                             f"give --precision explicitly, or devices of one kind")


def _worker(make_work, device, rank, workers, parent, job_name, shard_dir, pending, claimed, results) -> None:
    import signal

    from .devices import claim_device, die_with_parent
    from .runner import ShardDir

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped by the coordinator: exit normally
    die_with_parent()
    if os.getppid() != parent:  # the job died before PDEATHSIG was armed: nothing to do for anyone
        os._exit(1)
    local_device = claim_device(device, rank, workers)
    log.setup(verbose=False)

    try:
        work = make_work(local_device)
        results.put(("ready", rank, work.info))
        shards = ShardDir(Path(shard_dir))

        def shard_indices():
            while os.getppid() == parent:  # (an orphan stops: for platforms without PDEATHSIG)
                with claimed.get_lock():
                    k = claimed.value
                    claimed.value = k + 1
                if k >= len(pending):
                    return
                yield pending[k]

        compute_shards(work, shards, shard_indices(), job_name, lambda n: results.put(("rows", rank, n)),
                       on_shard=lambda *shard: results.put(("shard", rank, shard)), worker=f"{device}#{rank}")
        results.put(("done", rank, None))
    except HfbatchError as exc:
        results.put(("error", rank, (exc.exit_code, exc.message)))
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug or an environment failure: one line to the coordinator
        if os.environ.get("HFBATCH_DEBUG"):
            import traceback

            traceback.print_exc()
        results.put(("error", rank, (EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}")))
        sys.exit(EXIT_FAILED)
    finally:
        results.close()
        results.join_thread()  # every message is flushed before the process ends
