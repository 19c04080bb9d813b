"""The Ray executor: a job's pending shards computed by a pool of Ray actors (`--executor ray`).

The work units are hfbatch's own shards, and the work is the job's own `make_work(device)` factory (see
hfbatch.executor): each actor (`ShardWorker`) calls it once, so it loads the model once, and then runs the job's
shard loop (`compute_shards`: prepare one shard ahead, compute, write the shard file and its completion record
into `.OUT.hfbatch-partial/shards/`, in-shard parts included) over the shards it claims. The driver only
keeps the shard list and collects counts; the job then assembles and publishes exactly as locally, in shard
order, so the output's rows and order are those of a local run whichever actor computed what.

How the pool runs:
  - Start-up, before any shard: every actor reports where it runs, checks that it can open the job's inputs
    and write into the shard directory (shared storage), and loads its work; every problem is reported in
    one line by node name.
  - Pull-based: the shard list is a small actor (`ShardQueue`); an actor's loop claims the next shard when it
    is ready for one, so faster actors take more shards.
  - CPU actors are pinned to as many cores as Ray gave them (disjoint shares on a node), and the model's
    thread pools size themselves from that; GPU actors see the GPUs Ray assigned them (CUDA_VISIBLE_DEVICES).
  - An actor that dies (kill -9, OOM) is replaced, and its claimed shards without a completion record go
    back to the queue; a shard is tried at most 1 + `max_retries` times (a failing actor that is still alive
    goes on), then the job fails with that shard's last error in one line. hfbatch's own errors (bad input,
    a refused model) fail the job at once: retrying cannot change them.
  - A killed driver leaves the finished shards (and parts) behind like a local run; Ray ends a dead driver's
    actors, and the next run resumes from the completion records, with either executor.

Ray is an optional extra (`pip install 'hfbatch[ray]'`), imported only here and only when used.

Hidden knobs (environment; tests only, never in a config):
    HFBATCH_TEST_RAY_HOLD=FILE[:SHARD]  the first actor to finish a batch of shard SHARD (default: any shard)
                                        writes its pid into FILE and waits there to be killed (one-shot: FILE
                                        is created exclusively), so a test can kill -9 it deterministically
    HFBATCH_TEST_RAY_FAIL=SHARD         every attempt at shard SHARD raises RuntimeError
"""

from __future__ import annotations

import collections
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import log
from .errors import HfbatchError, InputError, JobFailed

INSTALL_HINT = "pip install 'hfbatch[ray]'"
START_TIMEOUT_S = 600.0  # actors waiting this long for CPUs/GPUs that other jobs hold: say so instead of hanging
EXECUTORS = ("local", "ray")
DEFAULT_MAX_RETRIES = 2


@dataclass(frozen=True)
class RayExecutor:
    """`--executor ray` and its options. `address` None: RAY_ADDRESS, else a local Ray started for the job.
    `num_workers` None: one actor per GPU (with GPUs), else one per node; `gpus_per_worker` None: 1 with
    `--device cuda`, else 0."""

    address: str | None = None
    num_workers: int | None = None
    gpus_per_worker: float | None = None
    max_retries: int = DEFAULT_MAX_RETRIES


def executor_for(executor="local", device: str = "auto", devices=None, ray_address=None, num_workers=None,
                 gpus_per_worker=None, max_retries=None) -> RayExecutor | None:
    """The executor a job's shards run on, from the job's options (`executor` "local" or "ray", or a
    RayExecutor), checked against its --device/--devices before any work: None is the local executor."""
    ray_options = {"ray_address": ray_address, "num_workers": num_workers, "gpus_per_worker": gpus_per_worker,
                   "max_retries": max_retries}
    given = [f"--{k.replace('_', '-')}" for k, v in ray_options.items() if v is not None and k != "ray_address"]
    if executor is None or executor == "local":
        if given:
            raise InputError(f"{', '.join(given)} needs --executor ray")
        return None
    if executor == "ray":
        executor = RayExecutor(address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                               max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries)
    elif not isinstance(executor, RayExecutor):
        raise InputError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if devices:
        raise InputError("--devices is for the local executor; with --executor ray give --num-workers and "
                         "--gpus-per-worker instead")
    if executor.gpus_per_worker is not None:
        if device == "cuda" and executor.gpus_per_worker == 0:
            raise InputError("--device cuda contradicts --gpus-per-worker 0; give one of them")
        if device == "cpu" and executor.gpus_per_worker > 0:
            raise InputError(f"--device cpu contradicts --gpus-per-worker {executor.gpus_per_worker:g}; "
                             f"give one of them")
    import_ray()
    return executor


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# ---- the actors ----------------------------------------------------------------------------------------

class ShardQueue:
    """The driver's shard list as one small actor: workers claim shards from it one at a time, as the job's
    shard loop asks for them (so a faster worker claims more), and report rows and finished shards to it; the
    driver polls it, and gives the unfinished claims of a failed worker back to it."""

    def __init__(self, pending: list[int]):
        self.queue = collections.deque(pending)
        self.claims: dict[str, list[int]] = collections.defaultdict(list)
        self.rows = 0
        self.finished: list[tuple] = []

    def claim(self, worker: str) -> int | None:
        if not self.queue:
            return None
        shard = self.queue.popleft()
        self.claims[worker].append(shard)
        return shard

    def report(self, rows: int, finished: tuple | None = None) -> None:
        """`rows` computed since the last report; `finished`: (worker, shard, rows computed, rows resumed)."""
        self.rows += rows
        if finished is not None:
            self.finished.append(finished)
            self.claims[finished[0]].remove(finished[1])

    def poll(self) -> tuple[int, list[tuple]]:
        """The rows and finished shards reported since the last poll."""
        rows, finished = self.rows, self.finished
        self.rows, self.finished = 0, []
        return rows, finished

    def take_back(self, worker: str) -> list[int]:
        """A failed worker's claims not reported finished (the driver puts back those not recorded)."""
        return self.claims.pop(worker, [])

    def put_back(self, shards: list[int]) -> None:
        """Shards to compute again, ahead of the rest, in order."""
        self.queue.extendleft(reversed(sorted(shards)))


class ShardWorker:
    """One Ray actor: the job's work, loaded once, running the job's shard loop over the shards it claims
    from the ShardQueue, into the shared shard directory."""

    def __init__(self, job_name: str, shard_dir: str, name: str):
        from .runner import ShardDir

        log.setup(verbose=False)
        self.job_name, self.name = job_name, name
        self.shards = ShardDir(Path(shard_dir))
        self.work = None

    def where(self) -> dict:
        import ray

        return {"node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def check_storage(self, inputs: list[str]) -> list[str]:
        """What this node cannot do of what the job needs: read every input, write into the shard directory."""
        problems = []
        for path in inputs:
            try:
                files = [Path(path)] if Path(path).is_file() else sorted(Path(path).iterdir())
                for file in (f for f in files if f.is_file()):
                    with open(file, "rb") as fh:
                        fh.read(1)
            except OSError as exc:
                problems.append(f"cannot open the input {path} ({exc.strerror or exc})")
        probe = self.shards.shard_dir / f".probe-{socket.gethostname()}-{os.getpid()}"
        try:
            probe.write_bytes(b"hfbatch: can this node write here?\n")
            probe.unlink()
        except OSError as exc:
            problems.append(f"cannot write into {self.shards.shard_dir} ({exc.strerror or exc})")
        return problems

    def load(self, make_work, device: str, slot: int | None, cpus: float) -> tuple[dict, str]:
        """The job's work on `device`; a CPU actor first takes share `slot` of its node's cores, `cpus` of
        them. Returns the work's info and the kind of device (`cpu`, `cuda (<GPU name>)`)."""
        if slot is not None and hasattr(os, "sched_setaffinity"):
            # before the model is made: torch's and OpenVINO's thread pools size themselves from the affinity
            cores = sorted(os.sched_getaffinity(0))
            n = max(1, int(cpus))
            os.sched_setaffinity(0, [cores[(slot * n + k) % len(cores)] for k in range(min(n, len(cores)))])
        self.work = _with_test_hooks(make_work(device))
        kind = device
        if device == "cuda":
            import torch

            kind = f"cuda ({torch.cuda.get_device_name(0)})"
        return dict(getattr(self.work, "info", {})), kind

    def run(self, queue) -> None:
        """Compute shards claimed from `queue` until it is empty."""
        import ray

        def claims():
            while (shard := ray.get(queue.claim.remote(self.name))) is not None:
                yield shard

        unreported = 0
        last = time.monotonic()

        def on_rows(n):  # batched: one message a second, not one per batch
            nonlocal unreported, last
            unreported += n
            if time.monotonic() - last >= 1.0:
                queue.report.remote(unreported)
                unreported, last = 0, time.monotonic()

        def on_shard(shard, computed, resumed):
            nonlocal unreported
            ray.get(queue.report.remote(unreported, (self.name, shard, computed, resumed)))
            unreported = 0

        from .executor import compute_shards

        compute_shards(self.work, self.shards, claims(), self.job_name, on_rows, on_shard, worker=self.name)


class _TestHooks:
    """The work with the HFBATCH_TEST_RAY_* hooks around its `compute` (see the module docstring)."""

    def __init__(self, work, hold: str | None, fail: str | None):
        self._work, self._hold, self._fail = work, hold, fail

    def __getattr__(self, name):
        return getattr(self._work, name)

    def compute(self, i, prepared, on_rows, parts=None):
        if self._fail == str(i):
            raise RuntimeError(f"HFBATCH_TEST_RAY_FAIL: shard {i} fails on every attempt")
        path, _, only = (self._hold or "").partition(":")

        def held(n):
            on_rows(n)
            if path and (not only or int(only) == i):
                _hold_here(path)

        return self._work.compute(i, prepared, held, parts)


def _with_test_hooks(work):
    hold, fail = os.environ.get("HFBATCH_TEST_RAY_HOLD"), os.environ.get("HFBATCH_TEST_RAY_FAIL")
    return _TestHooks(work, hold, fail) if hold or fail else work


def _hold_here(path: str) -> None:
    """The first process here writes its pid into `path` and waits to be killed; any other goes on."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    while True:
        time.sleep(1)


# ---- the driver ----------------------------------------------------------------------------------------

@dataclass
class _Worker:
    """The driver's view of one actor."""

    handle: object
    name: str
    place: dict = field(default_factory=dict)  # where(): node, node_ip, node_id, pid
    info: dict = field(default_factory=dict)
    kind: str = ""  # cpu, cuda (NVIDIA H200)
    slot: int | None = None  # a CPU actor's share of its node's cores
    shards: int = 0


@dataclass(frozen=True)
class _Pool:
    """What each actor gets: Ray resources, and the device its work runs on."""

    size: int
    cpus: float
    gpus: float
    device: str  # "cpu" or "cuda"


def run_on_ray(job_name: str, shards, pending: list[int], make_work, executor: RayExecutor, device: str, progress,
               inputs: list[str]):
    """Finish the `pending` shards of the shard directory `shards` (hfbatch.runner.ShardDir, on storage every
    node sees, as are the `inputs` paths) on a Ray actor pool; returns hfbatch.executor.ShardsDone with the
    work's info, plus the executor, the cluster's device kinds and each worker's shard count."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        # "local": a new Ray for this job, never a cluster someone else started on this machine
        address = executor.address or os.environ.get("RAY_ADDRESS") or "local"
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="warning",
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if address == "local":
                raise JobFailed(f"--executor ray: cannot start a local Ray ({_first_line(exc)})") from None
            raise InputError(f"--ray-address {address}: cannot join the Ray cluster ({_first_line(exc)}); "
                             f"start it with `ray start --head` or fix the address") from None
    try:
        pool = _plan_pool(ray, executor, device)
        return _Driver(ray, job_name, shards, inputs, pending, make_work, executor, pool, progress).run()
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A cluster address (`host:port`) that nothing answers at is refused in one line: ray.init would keep
    trying to connect to it for as long as the job lets it."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "local", "auto", a Ray Client address: ray.init's to judge
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                         f"one with `ray start --head`, or give the address it printed") from None


def _plan_pool(ray, executor: RayExecutor, device: str) -> _Pool:
    """How many actors, with what resources each, from the options and what the cluster has; refused in one
    line when the cluster cannot hold them."""
    gpus = executor.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if device == "cuda" else 0.0
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cluster_gpus = sum(n.get("GPU", 0) for n in nodes)
    if gpus > 0:
        size = executor.num_workers or max(1, int(cluster_gpus // gpus))
        if size * gpus > cluster_gpus:
            raise InputError(f"--num-workers {size} x --gpus-per-worker {gpus:g} needs {size * gpus:g} GPUs; the "
                             f"Ray cluster has {cluster_gpus:g}: give fewer workers or --gpus-per-worker 0 (CPU)")
        return _Pool(size, 1.0, gpus, "cuda")  # one CPU each: reading and tokenizing the next shard
    size = executor.num_workers or max(1, len(nodes))
    cpus = _cpus_per_worker([int(n.get("CPU", 0)) for n in nodes], size)
    if cpus == 0:
        total = sum(int(n.get("CPU", 0)) for n in nodes)
        raise InputError(f"--num-workers {size}: the Ray cluster has {total} CPUs on {len(nodes)} node(s), not one "
                         f"per worker; give fewer workers")
    return _Pool(size, float(cpus), 0.0, "cpu")


def _cpus_per_worker(node_cpus: list[int], workers: int) -> int:
    """The most whole CPUs each of `workers` CPU actors can have with all of them placed (0: not possible)."""
    for cpus in range(max(node_cpus, default=0), 0, -1):
        if sum(n // cpus for n in node_cpus) >= workers:
            return cpus
    return 0


class _Driver:
    """Starts the pool, runs every actor's shard loop over the ShardQueue, and replaces or retries what fails."""

    def __init__(self, ray, job_name, shards, inputs, pending, make_work, executor, pool, progress):
        self.ray, self.make_work, self.executor, self.pool = ray, make_work, executor, pool
        self.job_name, self.shards, self.inputs = job_name, shards, [str(p) for p in inputs]
        self.progress = progress
        self.pending = list(pending)
        self.attempts: collections.Counter = collections.Counter()
        self.started = 0  # actors made, for their names
        self.workers: list[_Worker] = []
        self.retired: list[_Worker] = []  # dead ones, for the per-worker shard counts
        self.deaths_at_start = 0
        from .executor import ShardsDone

        self.done = ShardsDone({})

    # -- actors --
    def _new_actors(self, count: int) -> list[_Worker]:
        actor = self.ray.remote(ShardWorker).options(
            num_cpus=self.pool.cpus, num_gpus=self.pool.gpus, max_restarts=0, max_task_retries=0,
            runtime_env={"env_vars": _forwarded_environment()})
        made = []
        for _ in range(count):
            name = f"ray#{self.started}"
            self.started += 1
            made.append(_Worker(actor.remote(self.job_name, str(self.shards.shard_dir), name), name))
        return made

    def _start(self, count: int) -> list[_Worker]:
        """`count` new actors, placed, checked and loaded (every problem found reported at once). Actors that
        die while starting (OOM while loading, a node lost) are replaced, up to --max-retries times."""
        while True:
            workers = self._new_actors(count)
            try:
                return self._bring_up(workers)
            except BaseException as exc:
                for w in workers:  # none is left holding the cluster's resources (a joined cluster outlives us)
                    self.ray.kill(w.handle)
                if not isinstance(exc, self.ray.exceptions.RayActorError):
                    raise
                self.deaths_at_start += 1
                if self.deaths_at_start > self.executor.max_retries:
                    raise JobFailed(f"Ray workers died while starting ({self.deaths_at_start} times; last: "
                                    f"{_first_line(exc)}); finished shards are kept: run the same command again "
                                    f"to resume") from None
                log.warn(self.job_name, "ray_worker_died", starting=count, reason=_first_line(exc))

    def _bring_up(self, workers: list[_Worker]) -> list[_Worker]:
        places = self._gather(workers, [w.handle.where.remote() for w in workers], "start", START_TIMEOUT_S)
        for w, place in zip(workers, places):
            w.place = place
        problems = self._gather(workers, [w.handle.check_storage.remote(self.inputs) for w in workers],
                                "check storage")
        said = [f"node {w.place['node']} ({w.place['node_ip']}): {p}" for w, ps in zip(workers, problems) for p in ps]
        if said:
            raise InputError(f"input and output must be on storage that every Ray node sees: {'; '.join(said)}")
        slots = self._core_slots(workers)
        loaded = self._gather(workers, [w.handle.load.remote(self.make_work, self.pool.device, slot, self.pool.cpus)
                                        for w, slot in zip(workers, slots)], "load its work (the model)")
        for w, (info, kind) in zip(workers, loaded):
            w.info, w.kind = info, kind
        return workers

    def _core_slots(self, workers: list[_Worker]) -> list[int | None]:
        """CPU actors: each its slot on its node (0, 1, ...: which share of the node's cores it takes); the
        slot of an actor that died is given to its replacement. None for GPU actors (their CPU is for
        tokenizing)."""
        if self.pool.gpus > 0:
            return [None] * len(workers)
        for w in workers:
            taken = {x.slot for x in self.workers + workers if x is not w and x.place["node_id"] == w.place["node_id"]}
            w.slot = next(k for k in range(len(taken) + 1) if k not in taken)
        return [w.slot for w in workers]

    def _gather(self, workers: list[_Worker], refs: list, doing: str, timeout: float | None = None) -> list:
        """The results of one start-up call per actor, or one line saying which actor failed and why (a dead
        actor's RayActorError goes up to `_start`)."""
        ray = self.ray
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise JobFailed(f"Ray did not start {len(workers)} worker(s) with {self.pool.cpus:g} CPU(s) and "
                            f"{self.pool.gpus:g} GPU(s) each within {timeout:.0f} s: other jobs hold the cluster's "
                            f"resources; try again later or give fewer --num-workers") from None
        except ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, HfbatchError):
                raise type(cause)(f"{cause.message} (on a Ray worker, while it tried to {doing})") from None
            raise JobFailed(f"a Ray worker could not {doing}: {_describe(cause)}") from None

    # -- shards --
    # -- shards --
    def run(self):
        ray = self.ray
        self.queue = ray.remote(ShardQueue).options(num_cpus=0).remote(self.pending)
        running: dict = {}  # the ref of an actor's run() -> the actor
        try:
            self.workers = self._start(self.pool.size)
            self._check_same_settings()
            log.event(self.job_name, "ray_workers", workers=len(self.workers), shards=len(self.pending),
                      nodes=",".join(sorted({w.place["node"] for w in self.workers})),
                      cpus_each=f"{self.pool.cpus:g}", gpus_each=f"{self.pool.gpus:g}")
            running = {w.handle.run.remote(self.queue): w for w in self.workers}
            idle: list[_Worker] = []  # done: the queue was empty when they asked
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                self._poll()
                for ref in ready:
                    w = running.pop(ref)
                    again = self._ended(w, ref)
                    if again is None:
                        idle.append(w)
                        continue
                    for x in [again] + idle:  # shards went back to the queue: idle workers may take them
                        running[x.handle.run.remote(self.queue)] = x
                    idle = []
            self._poll()
        finally:
            for w in self.workers:
                ray.kill(w.handle)
            ray.kill(self.queue)
        left = [i for i in self.pending if not self.shards.is_done(i)]
        if left:
            raise JobFailed(f"shards {left[:5]} were not finished by the Ray workers; run the same command again")
        return self._finish()

    def _poll(self) -> None:
        rows, finished = self.ray.get(self.queue.poll.remote())
        self.progress.update(rows)
        by_name = {w.name: w for w in self.workers + self.retired}
        for name, _shard, computed, resumed in finished:
            by_name[name].shards += 1
            self.done.add(computed, resumed)

    def _ended(self, w: _Worker, ref) -> _Worker | None:
        """An actor's run() returned: None when it ran out of shards; else the actor to run again (it, or
        its replacement when it died), once its unfinished shards are back in the queue."""
        ray = self.ray
        try:
            ray.get(ref)
            return None
        except ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            shard = self._take_back(w)
            if isinstance(cause, HfbatchError):  # hfbatch refused something: the same on every retry
                raise type(cause)(f"{cause.message} (shard {shard}, Ray worker on {w.place['node']})") from None
            self._failed(w, shard, _describe(cause))
            return w  # alive, its model loaded: it goes on (with this shard again, or the next)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
            shard = self._take_back(w)
            self._failed(w, shard, f"its worker died ({_first_line(exc)})")
            self.workers.remove(w)
            self.retired.append(w)
            ray.kill(w.handle)
            fresh = self._start(1)[0]
            self.workers.append(fresh)
            self._check_same_settings()
            return fresh

    def _take_back(self, w: _Worker) -> int | None:
        """The failed worker's claimed shards that have no completion record go back to the queue; returns
        the first of them, the one it was computing (its shard loop records shards in order)."""
        self._poll()  # what it finished before failing is counted first
        claimed = self.ray.get(self.queue.take_back.remote(w.name))
        back = sorted(s for s in claimed if not self.shards.is_done(s))
        self.ray.get(self.queue.put_back.remote(back))
        return back[0] if back else None

    def _failed(self, w: _Worker, shard: int | None, why: str) -> None:
        if shard is None:  # it failed after its last shard was recorded: nothing to retry
            log.warn(self.job_name, "ray_worker_failed", worker=w.name, node=w.place.get("node"), reason=why)
            return
        self.attempts[shard] += 1
        tries = self.attempts[shard]
        log.warn(self.job_name, "ray_shard_failed", shard=shard, worker=w.name, node=w.place.get("node"),
                 attempt=tries, of=1 + self.executor.max_retries, reason=why)
        if tries > self.executor.max_retries:
            raise JobFailed(f"shard {shard} failed {tries} times (--max-retries {self.executor.max_retries}); "
                            f"last on node {w.place.get('node')}: {why}; finished shards are kept: fix it and "
                            f"run the same command again to resume")

    def _check_same_settings(self) -> None:
        """Every worker computes rows alike (a GPU where `--precision auto` gives fp16 beside bf16 ones would
        mix precisions in one output)."""
        from .executor import _check_same_settings

        _check_same_settings({k: w.info for k, w in enumerate(self.workers)},
                             [f"{w.name} on {w.place['node']}" for w in self.workers], option="--executor ray")

    def _finish(self):
        everyone = self.workers + self.retired
        first = self.workers[0].info
        info = dict(first)
        kinds = sorted({w.kind for w in everyone})
        info["device"] = ",".join(kinds)
        info["executor"] = "ray"
        info["cluster"] = {"device_kinds": kinds, "nodes": sorted({w.place["node"] for w in everyone}),
                           "cpus_per_worker": self.pool.cpus, "gpus_per_worker": self.pool.gpus}
        info["workers"] = [{"worker": w.name, "node": w.place["node"], "device": w.kind,
                            "precision": w.info.get("precision"), "backend": w.info.get("backend"),
                            "shards": w.shards} for w in everyone]
        self.done.info = info
        self.done.workers = [{"worker": w.name, "node": w.place["node"], "shards": w.shards} for w in everyone]
        return self.done


def _forwarded_environment() -> dict[str, str]:
    """The driver's hfbatch and Hugging Face settings, for actors on every node (offline, no bars, the
    cache and parts knobs)."""
    prefixes = ("HFBATCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_PARALLELISM")
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


def _cause(exc):
    """The exception raised inside the actor (Ray wraps it)."""
    return getattr(exc, "cause", None) or exc


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(exc) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"
