"""Shared pytest hooks.

DIVISION_TEST_TRACEBACKS=1 (scripts/gpu_checks.sh sets it for the GPU tests) prints each failure's
traceback as soon as its test ends, not in the summary at the end of the session: a GPU test step
stopped at its time limit, or killed after a device fault, still shows why every test that failed
before then failed, and the session's one chance to fix it starts from that.
"""

from __future__ import annotations

import os

import pytest

_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed or os.environ.get("DIVISION_TEST_TRACEBACKS") != "1" or _config is None:
        return
    terminal = _config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line("")
        terminal.write_sep("_", f"{report.nodeid} failed ({report.when})")
        terminal.write_line(report.longreprtext)
        terminal.flush()
