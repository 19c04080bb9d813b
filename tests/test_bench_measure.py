"""bench/measure.py: a measured child's peak RSS is its own, not the benchmark process's."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from measure import run_measured  # noqa: E402


def test_child_peak_rss_is_its_own_not_the_parents():
    held = np.ones(400 * 1024 * 1024 // 8)  # this process resident at 400+ MB, as a benchmark holding vectors
    held[::512] = 2.0  # touched: resident
    small = run_measured([sys.executable, "-c", "pass"])
    big = run_measured([sys.executable, "-c", "import numpy as np; a = np.ones(300 * 1024 * 1024 // 8); a[::512] = 2"])
    assert small.done.returncode == 0 and big.done.returncode == 0
    assert small.peak_rss_mb < 150, small.peak_rss_mb  # a bare interpreter, not the 400 MB parent
    assert 300 <= big.peak_rss_mb < 500, big.peak_rss_mb
    assert float(held[1]) == 1.0  # (kept alive to here)


def test_exit_code_and_output_come_back():
    done = run_measured([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (done.done.returncode, done.done.stdout, done.done.stderr) == (3, "out\n", "err\n")
    assert done.wall_s > 0 and done.cpu_s > 0
