"""The one exception family of resdeploy.

Every stage raises :class:`ResdeployError` (or a subclass) with a message that names the thing that
is wrong and says how to fix it. The CLI maps ``exit_code`` straight to the process exit status, so CI
can tell "a check failed" (1) from "bad usage or unreadable input" (2).
"""

from __future__ import annotations


class ResdeployError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


class InputError(ResdeployError):
    """Bad usage or unreadable/untrusted input: a file, an argument, a request. Exit code 2."""

    exit_code = 2


class CheckFailed(ResdeployError):
    """A verification ran and found a defect (parity, graph check, gate). Exit code 1."""

    exit_code = 1


class BackendUnavailable(ResdeployError):
    """An optional backend (TensorRT, CUDA, OpenVINO...) is not installed or has no device. Exit code 2."""

    exit_code = 2
