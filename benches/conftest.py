"""pytest hooks for the micro-benchmarks in this directory (bench_*.py)."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    module = sys.modules.get("bench_policy")
    if module is None or not getattr(module, "RESULTS", None):
        return
    terminalreporter.section("policy decision latency (per statement, uncached)")
    for line in module.pytest_terminal_summary_lines():
        terminalreporter.write_line(line)
