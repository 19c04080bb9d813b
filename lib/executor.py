"""Computing a job's pending shards: in this process on one device, or with `--devices` on several devices at
once, one worker process per device.

A job describes its per-shard work as a picklable factory `make_work(device) -> work`, where `work` has
  - `info`: a dict for the manifest (dim, max_length, device/precision/backend in force, ...);
  - `prepare(i)`: the CPU side of shard i (read rows, tokenize), run in a thread one shard ahead;
  - `compute(i, prepared, on_rows, parts) -> (table, counts)`: the model side; `on_rows(n)` reports
    progress; `parts` (hfbatch.parts.ShardParts) goes to the batch loop, which commits the shard's finished
    batches every few seconds and, on a re-run, takes the batches a killed attempt committed.
`run_shards` finishes every pending shard with the runner's shard protocol (data file, then completion
record), so a killed run resumes the same way however many processes wrote the shards (and their parts),
and the output is assembled in shard order: rows come out in the dataset's order whatever device computed
them.

Workers are spawned (never forked: CUDA and the tokenizers' thread pools do not survive a fork), claim shards
one at a time from a shared counter (a faster device takes more), ignore Ctrl-C (the coordinator stops
them), and die with the coordinating process
(PR_SET_PDEATHSIG), so a `kill -9` of the job leaves no worker writing into the next run's shards.
A CUDA worker sees only its own GPU (CUDA_VISIBLE_DEVICES); `cpu` workers get disjoint shares of the cores.
A later Ray executor is another `run_shards` over the same `make_work` factories.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import log
from .batching import prefetch
from .errors import EXIT_FAILED, HfbatchError, InputError, JobFailed

_PR_SET_PDEATHSIG = 1


def parse_devices(spec: str | None) -> list[str] | None:
    """`--devices` text -> device names: "0,1" and "cuda:0,cuda:1" -> ["cuda:0", "cuda:1"]; "cpu,cpu" ->
    two CPU workers. None when the option was not given."""
    if spec is None:
        return None
    devices = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if part.isdigit():
            part = f"cuda:{int(part)}"
        elif part.startswith("cuda:") and part[5:].isdigit():
            part = f"cuda:{int(part[5:])}"
        elif part != "cpu":
            raise InputError(f"--devices: {part!r} is not a device: give CUDA indices (0,1), cuda:N or cpu")
        devices.append(part)
    cuda = [d for d in devices if d != "cpu"]
    if cuda and len(cuda) != len(devices):
        raise InputError("--devices mixes CPU and CUDA devices: their rows would be computed in different "
                         "precisions; use one kind")
    if len(set(cuda)) != len(cuda):
        raise InputError("--devices names a GPU twice: one worker per GPU")
    return devices


def devices_kind(devices: list[str]) -> str:
    """What --devices contributes to a job's config: the kind of device, not the list. How many GPUs, and
    which, change speed, not rows: a run killed on `--devices 0,1` resumes on `--devices 0`."""
    return "cpu" if devices[0] == "cpu" else "cuda"


def check_devices(devices: list[str], device: str) -> None:
    """Refuse, before any worker starts, devices this machine does not have."""
    kind = devices_kind(devices)
    if device not in ("auto", kind):
        raise InputError(f"--device {device} contradicts --devices {','.join(devices)}; give one of them")
    if kind == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [d for d in devices if int(d.split(":")[1]) >= count]
    if missing:
        have = f"CUDA devices 0..{count - 1}" if count else "no CUDA device"
        raise InputError(f"--devices {','.join(devices)}: this machine has {have}; "
                         f"name existing GPUs, or drop --devices to run on the CPU")


@dataclass
class ShardsDone:
    """What `run_shards` did: the work's `info`, and the model rows of this run (computed here, or taken
    from parts that a killed run committed)."""

    info: dict
    rows_computed: int = 0
    rows_resumed: int = 0

    def add(self, computed: int, resumed: int) -> None:
        self.rows_computed += computed
        self.rows_resumed += resumed

    def summary(self) -> dict:
        return {"rows_computed": self.rows_computed, "rows_resumed": self.rows_resumed}


def run_shards(job, pending: list[int], make_work: Callable, devices: list[str] | None,
               progress: log.Progress) -> ShardsDone:
    """Finish the `pending` shards of `job`. Its `info` has `devices` when there were several workers.
    Without `devices`, `make_work(None)` runs here, on the job's own --device."""
    if not devices:
        work = make_work(None)
        done = ShardsDone(work.info)
        for i, prepared in prefetch(work.prepare, pending):  # the next shard is read and tokenized meanwhile
            parts = job.parts(i, job.name)
            table, counts = work.compute(i, prepared, progress.update, parts)
            job.write_shard(i, table, **counts)
            done.add(parts.rows_computed, parts.rows_resumed)
    else:
        done = _run_workers(job, pending, make_work, devices, progress)
    log.event(job.name, "model_rows", computed=done.rows_computed, resumed=done.rows_resumed)
    return done


def _run_workers(job, pending, make_work, devices, progress) -> ShardsDone:
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    # Shards are handed out by a shared counter into `pending` (no task queue: a queue of 10k+ indices
    # has a feeder thread that a failing run would wait on forever).
    claimed, results = ctx.Value("q", 0), ctx.Queue()
    workers = [ctx.Process(target=_worker, name=f"hfbatch-{job.name}-{device}", daemon=True,
                           args=(make_work, device, rank, len(devices), os.getpid(), job.name, str(job.shard_dir),
                                 pending, claimed, results))
               for rank, device in enumerate(devices)]
    log.event(job.name, "workers", devices=",".join(devices), shards=len(pending))
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
            progress.update(payload)
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
    left = [i for i in pending if not job.is_done(i)]
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


def _check_same_settings(infos: dict[int, dict], devices: list[str]) -> None:
    """Workers must compute rows alike: two GPUs where `--precision auto` resolves differently (bf16 on one,
    fp16 on an older one) would mix precisions in one output."""
    keys = ("precision", "backend", "dim", "max_length")
    first = min(infos)
    for rank, info in infos.items():
        differ = [k for k in keys if info.get(k) != infos[first].get(k)]
        if differ:
            said = ", ".join(f"{k} {infos[first].get(k)} on {devices[first]} but {info.get(k)} on {devices[rank]}"
                             for k in differ)
            raise InputError(f"--devices: the workers would compute rows differently ({said}); "
                             f"give --precision explicitly, or devices of one kind")


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the coordinating process dies, even by kill -9."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: the daemon flag still stops workers on a normal exit
        pass


def _claim_device(device: str, rank: int, workers: int) -> str:
    """Make this process see only its device; returns the --device value for the work."""
    if device.startswith("cuda:"):
        # Before torch is imported in this fresh (spawned) process: the worker sees its GPU as cuda:0. The
        # index counts the GPUs the job was given: with CUDA_VISIBLE_DEVICES=2,3 set, cuda:1 is GPU 3.
        index = int(device.split(":")[1])
        given = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = given[index] if index < len(given) else str(index)
        return "cuda"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) > 1 and workers > 1:  # disjoint core shares; thread pools size themselves from affinity
        share = cores[rank::workers] or [cores[rank % len(cores)]]
        os.sched_setaffinity(0, share)
    return "cpu"


def _worker(make_work, device, rank, workers, parent, job_name, shard_dir, pending, claimed, results) -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped by the coordinator: exit normally
    _die_with_parent()
    if os.getppid() != parent:  # the job died before PDEATHSIG was armed: nothing to do for anyone
        os._exit(1)
    local_device = _claim_device(device, rank, workers)
    log.setup(verbose=False)
    from .runner import ShardDir

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

        def report(n):
            results.put(("rows", rank, n))

        for i, prepared in prefetch(work.prepare, shard_indices()):
            parts = shards.parts(i, job_name)
            table, counts = work.compute(i, prepared, report, parts)
            shards.write_shard(i, table, **counts, worker=f"{device}#{rank}")  # (text: not summed as a count)
            results.put(("shard", rank, (i, parts.rows_computed, parts.rows_resumed)))
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
