"""Shared pytest hooks, for the GPU tests step of scripts/gpu_checks.sh.

DIVISION_TEST_TRACEBACKS=1 prints each failure's traceback as soon as its test ends, not in the
summary at the end of the session: a GPU test step stopped at its time limit, or killed after a
device fault, still shows why every test that failed before then failed, and the session's one
chance to fix it starts from that.

A device fault (an illegal address, a misaligned access, a failed launch, a device-side assert)
leaves the CUDA context unusable: every later test would fail with the same error, naming no
kernel. So when a test fails with one, the session stops there, and with DIVISION_FAULT_FILE set
the test's id is written to that file, for gpu_checks.sh to rerun it alone under
compute-sanitizer, which names the kernel and the access.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# what CUDA reports for an error that poisons the context (cudaErrorIllegalAddress,
# cudaErrorMisalignedAddress, cudaErrorLaunchFailure, cudaErrorAssert, cudaErrorIllegalInstruction)
STICKY_CUDA_ERRORS = (
    "illegal memory access", "misaligned address", "unspecified launch failure",
    "device-side assert", "illegal instruction",
)

_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed or _config is None:
        return
    terminal = _config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("DIVISION_TEST_TRACEBACKS") == "1" and terminal is not None:
        terminal.write_line("")
        terminal.write_sep("_", f"{report.nodeid} failed ({report.when})")
        terminal.write_line(report.longreprtext)
        terminal.flush()
    fault = next((e for e in STICKY_CUDA_ERRORS if e in report.longreprtext), None)
    if fault is not None:
        if os.environ.get("DIVISION_FAULT_FILE"):
            Path(os.environ["DIVISION_FAULT_FILE"]).write_text(report.nodeid + "\n")
        pytest.exit(f"CUDA device fault ({fault}) in {report.nodeid}: the CUDA context is lost, so the "
                    "session stops here; rerun that test alone under compute-sanitizer to find the "
                    "kernel", returncode=3)
