"""`--devices`: which devices a job's shard workers run on (hfbatch.executor runs them), and how a worker
process claims its device.

Devices are named as `--devices` gives them ("cuda:0", "cpu"); a CUDA worker sees only its own GPU
(CUDA_VISIBLE_DEVICES), `cpu` workers get disjoint shares of the cores, and every worker dies with the
coordinating process (PR_SET_PDEATHSIG), so a `kill -9` of the job leaves no worker writing into the next
run's shards.
"""

from __future__ import annotations

import os

from .errors import InputError

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


def die_with_parent() -> None:
    """Linux: SIGKILL this worker when the coordinating process dies, even by kill -9."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: the daemon flag still stops workers on a normal exit
        pass


def claim_device(device: str, rank: int, workers: int) -> str:
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


