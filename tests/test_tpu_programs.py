"""Runs tests/tpu/ (ahead-of-time compiles for TPU slices, the Pallas attention kernel in TPU interpret mode) in a
pytest process of their own: they load libtpu and Mosaic, which the rest of the suite keeps out of its process."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_tpu_program_tests_pass_in_their_own_process():
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(ROOT / "tests" / "tpu")]
    done = subprocess.run(command,
                          env={**os.environ, "ATP_JAX_TPU_TESTS": "1"}, capture_output=True, text=True, cwd=ROOT,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # every test ran: pytest's result line names passed tests and nothing skipped or deselected
    assert re.search(r"\b\d+ passed\b", done.stdout + done.stderr), done.stdout[-2000:]
    assert not re.search(r"\b\d+ (skipped|deselected|xfailed)\b", done.stdout + done.stderr), done.stdout[-2000:]
