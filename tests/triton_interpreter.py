"""What the fused ops' tests share to run Triton kernels on the CPU: a skip without triton, and a fresh process with
TRITON_INTERPRET set (it must be set before triton is imported)."""

import importlib.util
import os
import subprocess
import sys
import time

import pytest

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)


def run_in_interpreter(script: str, timeout: int = 300) -> str:
    """Run ``script`` under Triton's interpreter; it must end by printing "interpreter check passed". Returns its
    stdout, and prints how long it took."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "interpreter check passed" in run.stdout
    print(f"interpreter check: {time.perf_counter() - t0:.1f} s")
    return run.stdout
