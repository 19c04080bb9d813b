"""Logging to stderr: structured `key=value` lines, and tqdm bars only when stderr is a terminal."""

from __future__ import annotations

import logging
import sys
import time

_LOGGER = logging.getLogger("hfbatch")


def setup(verbose: bool = False) -> None:
    if _LOGGER.handlers:  # set up already: follow the current stderr (tests swap it)
        _LOGGER.handlers[0].setStream(sys.stderr)
        _LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    _LOGGER.propagate = False


def _fmt(value) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def event(job: str, msg: str, level: int = logging.INFO, **fields) -> None:
    """One structured line: `job=embed msg=shard_done shard=3 rows=10000`."""
    parts = [f"job={job}", f"msg={_fmt(msg)}"] + [f"{k}={_fmt(v)}" for k, v in fields.items()]
    _LOGGER.log(level, " ".join(parts))


def warn(job: str, msg: str, **fields) -> None:
    event(job, msg, logging.WARNING, **fields)


class Progress:
    """A tqdm bar on a TTY; otherwise a log line at most every `every` seconds (cron logs stay small)."""

    def __init__(self, job: str, total: int | None, unit: str = "rows", every: float = 30.0):
        self.job, self.total, self.unit, self.every = job, total, unit, every
        self.done = 0
        self._bar = None
        self._start = self._last = time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=job, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            rate = self.done / max(now - self._start, 1e-9)
            event(self.job, "progress", done=self.done, total=self.total, unit=self.unit, per_s=f"{rate:.1f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
