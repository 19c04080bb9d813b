"""faiss is imported with the runtime settings its bundled libraries read only when they load."""

import glob
import os
import subprocess
import sys

import pytest

from hfbatch.faiss_runtime import openblas_coretype, runtime_settings
from hfbatch.models import cpu_flags

CORENAME = """
import ctypes, glob, os, sys
{first}
lib = glob.glob(os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs", "libopenblas*"))
if not lib:
    print("no-bundled-openblas"); sys.exit(0)
blas = ctypes.CDLL(lib[0])
blas.openblas_get_corename.restype = ctypes.c_char_p
print(blas.openblas_get_corename().decode(), "OPENBLAS_CORETYPE" in os.environ, "OMP_WAIT_POLICY" in os.environ)
"""


def corename(first: str, **settings) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OMP_WAIT_POLICY")}
    env.update(settings)
    done = subprocess.run([sys.executable, "-c", CORENAME.format(first=first)], capture_output=True, text=True,
                          env=env, check=True)
    return done.stdout.strip()


def test_kernel_family_follows_the_cpu_flags():
    assert openblas_coretype({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}) == "SKYLAKEX"
    assert openblas_coretype({"avx2", "fma", "avx512f"}) == "HASWELL"  # not the whole AVX-512 set
    assert openblas_coretype({"sse4_2", "avx"}) is None
    assert runtime_settings({}, {"avx2", "fma"}) == {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_CORETYPE": "HASWELL"}
    assert runtime_settings({"OPENBLAS_CORETYPE": "ZEN", "OMP_WAIT_POLICY": "ACTIVE"}, {"avx2", "fma"}) == {}


def test_hfbatch_loads_faiss_blas_with_the_cpus_kernels_and_leaves_the_environment_as_it_was():
    import faiss

    if not glob.glob(os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs", "libopenblas*")):
        pytest.skip("this faiss build bundles no OpenBLAS")
    expected = {"SKYLAKEX": "SkylakeX", "HASWELL": "Haswell"}.get(openblas_coretype(cpu_flags()))
    if expected is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: OpenBLAS's own detection stands")
    name, coretype_left, wait_policy_left = corename("import hfbatch.indexing\nimport faiss").split()
    assert name == expected
    assert (coretype_left, wait_policy_left) == ("False", "False")  # restored: nothing reaches other libraries
    # the user's own setting wins
    assert corename("import hfbatch.indexing\nimport faiss", OPENBLAS_CORETYPE="Haswell") \
        .split()[0] == "Haswell"
