"""The stress suite: marked `stress`, excluded from the default run. One command (see docs/serving.md):

    python -m pytest tests/stress -m stress -q

Each test adds a row to one table, printed once at the end of the session (pytest_terminal_summary).
The serving fixtures (the resnet20 repository, server subprocesses) are the ones tests/serve uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.serve.conftest import (free_port, mnist_images, mnist_raw, model_repo,  # noqa: E402,F401
                                  resnet20_uint8_onnx, server, spawn_server, start_server, stop_server)

from tests.stress.table import ROWS  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 - pytest hook
    if not ROWS:
        return
    w = [max(len(r[i]) for r in ROWS + [("check", "figures", "criterion", True)]) for i in range(3)]
    tr = terminalreporter
    tr.write_sep("=", "resdeploy stress table")
    tr.write_line(f"{'check':<{w[0]}} | {'figures':<{w[1]}} | {'criterion':<{w[2]}} | result")
    tr.write_line("-" * (sum(w) + 17))
    for check, figures, criterion, ok in ROWS:
        tr.write_line(f"{check:<{w[0]}} | {figures:<{w[1]}} | {criterion:<{w[2]}} | {'PASS' if ok else 'FAIL'}")
