"""faiss, imported once, with the two settings that its bundled runtimes read only when they load.

Every hfbatch module takes faiss from here (`from hfbatch.faiss_runtime import faiss`), so these hold
whichever module is imported first. Each setting is made for the import only, then restored, so it reaches
no other library; a value the user set in the environment wins.

* ``OMP_WAIT_POLICY=PASSIVE``: faiss ships its own OpenMP runtime, which by default spins at every barrier. On
  a shared 2-core machine a descheduled thread makes the others spin for its whole time slice: a 0.4 s build
  took 13-17 s. Passive waiting costs about nothing on big batches.
* ``OPENBLAS_CORETYPE``: the faiss-cpu wheel bundles OpenBLAS 0.3.15, which does not know newer CPUs and
  falls back to its generic "Prescott" (SSE3) kernels on them, as it did on the 2-core Xeon with AMX
  (numpy's newer OpenBLAS says SkylakeX there). Every IVF build and k-means runs on that BLAS: assigning
  65,536 vectors to 1,024 lists took 1.13 s on Prescott kernels and 0.25 s on SkylakeX ones, the same
  results. So the kernel family is named from the CPU's own flags: SkylakeX where it has AVX-512
  (F/BW/DQ/VL), Haswell where it has AVX2 and FMA, else OpenBLAS's own detection.
"""

from __future__ import annotations

import os
import sys

from hfbatch.models import cpu_flags


def openblas_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family these CPU flags run best, or None to leave it to OpenBLAS."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SKYLAKEX"
    if {"avx2", "fma"} <= flags:
        return "HASWELL"
    return None


def runtime_settings(environ=os.environ, flags: set[str] | None = None) -> dict[str, str]:
    """The settings to make for faiss's import: those the environment does not already hold."""
    settings = {"OMP_WAIT_POLICY": "PASSIVE"}
    coretype = openblas_coretype(cpu_flags() if flags is None else flags)
    if coretype:
        settings["OPENBLAS_CORETYPE"] = coretype
    return {k: v for k, v in settings.items() if k not in environ}


def _import_faiss():
    if "faiss" in sys.modules:  # loaded before hfbatch: its runtimes have read their settings already
        return sys.modules["faiss"]
    settings = runtime_settings()
    os.environ.update(settings)
    try:
        import faiss
    finally:
        for key in settings:
            os.environ.pop(key, None)
    return faiss


faiss = _import_faiss()
