"""How the benchmarks run a command as its own process and measure it: wall time, CPU time and peak RSS.

The CPU seconds (user + system, all threads) and the peak resident set come from the child's own rusage
(`os.wait4`), so they are the child's alone and exact: no polling of /proc, nothing from other children.
CPU seconds hardly depend on what else runs on a shared machine; CPU seconds / cores is about what the wall
time would be on idle cores, at best.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Measured:
    done: subprocess.CompletedProcess
    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def hfbatch_command() -> list[str]:
    """The `hfbatch` of this interpreter's environment (or the module, where no console script is installed)."""
    exe = shutil.which("hfbatch", path=os.path.dirname(sys.executable)) or shutil.which("hfbatch")
    return [exe] if exe else [sys.executable, "-c", "from hfbatch.cli import main; main()"]


def run_measured(cmd: list, env: dict | None = None) -> Measured:
    """Run cmd to its end (output kept in temp files, so a chatty child never blocks on a full pipe)."""
    cmd = [str(part) for part in cmd]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return Measured(done, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def run_hfbatch(args: list, env: dict | None = None) -> Measured:
    """`hfbatch ARGS` measured; a failure ends the benchmark with its stderr."""
    measured = run_measured(hfbatch_command() + list(args), env)
    if measured.done.returncode:
        raise SystemExit(f"hfbatch {' '.join(map(str, args))} failed ({measured.done.returncode}):\n"
                         f"{measured.done.stderr[-3000:]}")
    return measured


def wall_and_cpu(args: list, env: dict | None = None) -> tuple[float, float]:
    """(wall, CPU seconds) of `hfbatch ARGS` as its own process."""
    measured = run_hfbatch(args, env)
    return measured.wall_s, measured.cpu_s
