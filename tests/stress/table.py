"""The stress table's rows. Its own module so the tests and conftest.py's summary hook share one list (pytest
loads conftest.py under another module name than ``tests.stress.conftest``)."""

from __future__ import annotations

ROWS: list[tuple[str, str, str, bool]] = []  # (check, figures, criterion, passed)


def record(check: str, figures: str, criterion: str, passed: bool) -> None:
    ROWS.append((check, figures, criterion, passed))
