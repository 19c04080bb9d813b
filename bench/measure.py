"""How the benchmarks run a command as its own process and measure it: wall time, CPU time and peak RSS.

The CPU seconds (user + system, all threads) and the peak resident set come from the child's own rusage
(`os.wait4`), so they are the child's alone and exact: no polling of /proc, nothing from other children.

The child is started by a bare launcher interpreter, not by this process: on Linux a process's peak RSS
(ru_maxrss) begins at the peak of the memory map it was forked from, because exec keeps the larger of the two
(`signal->maxrss`) and subprocess's vfork shares this process's map. Started from here, a child of a benchmark
that holds 2 GB of vectors "peaked" at 2 GB before doing anything (measured: `true` reported 2,075 MB). From
the launcher the floor is the launcher's own ~10 MB.
CPU seconds hardly depend on what else runs on a shared machine; CPU seconds / cores is about what the wall
time would be on idle cores, at best.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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


# argv: RESULT_FILE CMD...; writes "wall_s cpu_s maxrss_kb exit_code" (its own start-up is not timed)
LAUNCHER = r"""
import os, sys, time
result, cmd = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(result, "w") as f:
    f.write(f"{wall} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(cmd: list, env: dict | None = None) -> Measured:
    """Run cmd to its end (output kept in temp files, so a chatty child never blocks on a full pipe), started
    by the launcher so that its peak RSS is its own."""
    cmd = [str(part) for part in cmd]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as result:
        launcher = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, result.name, *cmd],
                                  stdout=out, stderr=err, env=env, text=True)
        fields = result.read().split()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if launcher.returncode or len(fields) != 4:  # the command could not be started (not found, ...)
        raise SystemExit(f"could not run {cmd[0]}: {stderr.strip().splitlines()[-1:] or launcher.returncode}")
    wall, cpu, maxrss_kb, code = float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])
    done = subprocess.CompletedProcess(cmd, code, stdout, stderr)
    return Measured(done, wall, cpu, maxrss_kb / 1024)


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
