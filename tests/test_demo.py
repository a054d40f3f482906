"""`phigate demo --check`, the README's main job, works end to end from the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_check_runs_a_query_through_the_gateway():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run(
        [sys.executable, "-m", "phigate.cli", "demo", "--check", "--patients", "50"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "TLS verify-full" in out and "patients=50" in out
    assert "50 of 50 patients masked" in out  # the default identity sees PHI masked
    assert "check passed" in out
