"""Sizes with explicit units (`128MB`, `1.5GiB`, `4000000`): the one parser behind every size option, for the
CLI (`hfbatch.cli.SizeType`) and for Python callers alike."""

from __future__ import annotations

import decimal
import re

from .errors import InputError

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ByteSize(int):
    """A number of bytes that remembers how it was written: a manifest records `--shard-size 128MB` as the
    user wrote it, so outputs stay up to date across hfbatch versions."""

    text: str

    def __new__(cls, number: int, text: str):
        size = super().__new__(cls, number)
        size.text = text
        return size


def parse_size(value, minimum: int = 1, option: str | None = None) -> ByteSize:
    """KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, B or a bare number is bytes. A bad value
    is an InputError naming `option` (when given) and the units."""
    if isinstance(value, ByteSize):
        return value
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", text)
    unit = match and (match.group(2).upper() or "B")
    prefix = f"{option}: " if option else ""
    if not match or unit not in SIZE_UNITS:
        raise InputError(f"{prefix}{value!r}: give a size like 4GB or 512MiB (KB, MB, GB = 1000s of bytes; KiB, "
                         f"MiB, GiB = 1024s; B or no unit = bytes)")
    size = int(decimal.Decimal(match.group(1)) * SIZE_UNITS[unit])
    if size < minimum:
        raise InputError(f"{prefix}{value!r}: at least {minimum:,} bytes")
    return ByteSize(size, text)
