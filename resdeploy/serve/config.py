"""The server's options, in one place: :class:`ServerConfig`'s fields are the ``resdeploy serve`` flags.

Each field carries its flag, help and (where the flag's unit or sense differs from the field's) a conversion in
its ``metadata``; :func:`add_arguments` builds the argparse options from them and :func:`from_arguments` turns the
parsed namespace back into a config, so a default or a help text is written once, next to the field it
describes. Fields without a flag (``reuse_port``) are set by the server itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resdeploy.errors import InputError

MODEL_CONTROL_MODES = ("none", "explicit")
GRPC_TRANSPORTS = ("native", "grpcio")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
MIB = 1 << 20


def option(default: Any, help: str, *, flag: str | None = None, off: str | None = None, off_help: str = "",
           to_field: Callable[[Any], Any] | None = None, to_flag: Callable[[Any], Any] | None = None,
           **argparse_kwargs: Any) -> Any:
    """A config field that is also a ``resdeploy serve`` option.

    ``flag``: the option's name (default: ``--`` + the field name with dashes). ``off``: a second flag that sets
    the field to False (booleans: the only flag) or None. ``to_field`` / ``to_flag`` convert between the flag's
    value and the field's (MiB to bytes); further keywords go to ``add_argument`` (choices, metavar, action)."""
    meta = {"help": help, "flag": flag, "off": off, "off_help": off_help, "to_field": to_field, "to_flag": to_flag,
            "argparse": argparse_kwargs}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_workers(value: str | int, model_control_mode: str = "none") -> int:
    """``--workers``: a count, or ``auto`` = one per core this process may run on (``sched_getaffinity``, so a
    container's or taskset's limit counts, not the host's cores). One process is one event loop under one GIL, so
    it uses about one core of Python. Explicit model control keeps 1 (a load/unload reaches one worker only)."""
    if str(value).strip().lower() == "auto":
        return 1 if model_control_mode == "explicit" else usable_cores()
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--workers is {str(value)[:40]!r}; give a number of processes or 'auto' (one per core)") from None


@dataclass
class ServerConfig:
    """Everything ``resdeploy serve`` can be told; the defaults are Triton's where Triton has the same setting."""

    host: str = option("127.0.0.1", "address to bind (0.0.0.0 for every interface)")
    port: int = option(8000, "HTTP port (0 = any free port, printed in the log)", type=int)
    grpc_port: int | None = option(8001, "gRPC port (KServe v2 GRPCInferenceService, as Triton's; 0 = any free port, "
                                   "printed in the log)", type=int, off="--no-grpc", off_help="serve HTTP only")
    model_control_mode: str = option("none", "none: every model loads at start and load/unload answer 503 (Triton's "
                                     "default); explicit: /v2/repository/models/<m>/load and /unload work, "
                                     "--load-model picks what loads at start", choices=MODEL_CONTROL_MODES)
    load_models: tuple[str, ...] = option((), "with --model-control-mode explicit: load MODEL at start (repeat it; "
                                          "'*' = every model)", flag="--load-model", action="append", metavar="MODEL",
                                          to_field=tuple, to_flag=list)
    max_body_bytes: int = option(64 * MIB, "request bodies (and gRPC messages) above this many MiB get 413 "
                                 "(RESOURCE_EXHAUSTED)", flag="--max-body-mb", type=float,
                                 to_field=lambda mb: int(mb * MIB), to_flag=lambda b: b / MIB)
    request_timeout_s: float = option(30.0, "seconds a request may take when it sets no timeout",
                                      flag="--request-timeout", type=float)
    shutdown_timeout_s: float = option(30.0, "seconds SIGTERM waits for the requests accepted before it",
                                       flag="--shutdown-timeout", type=float)
    threads: int | None = option(None, "ONNX Runtime threads per instance (default: usable cores / the model's "
                                 "instances / workers)", type=int)
    workers: int = option(1, "server processes sharing the ports (SO_REUSEPORT), each with its own models and "
                          "batchers (model control mode none only; statistics and metrics are per worker); "
                          "'auto' = one per core this process may use (1 with --model-control-mode explicit)",
                          metavar="N|auto", to_flag=str)
    backend: str = option("auto", "what runs the models (auto: by file type and device)", choices=BACKENDS)
    strict_readiness: bool = option(True, "ready once loading ends even if a model failed (default: like Triton, "
                                    "ready only when every model loaded)", off="--no-strict-readiness")
    warmup: bool = option(True, "skip the warm-up inferences before ready (default: one at batch 1 and at max batch "
                          "per instance)", off="--no-warmup")
    header_timeout_s: float = option(10.0, "seconds a connection has to send a complete request head (else 408 and "
                                     "closed)", flag="--header-timeout", type=float)
    body_timeout_s: float = option(60.0, "seconds to send a request body after its head (else 408)",
                                   flag="--body-timeout", type=float)
    keepalive_timeout_s: float = option(75.0, "idle keep-alive connections are closed after this many seconds",
                                        flag="--keepalive-timeout", type=float)
    max_connections: int = option(1024, "open connections (and gRPC RPCs at once); more get 503 "
                                  "(RESOURCE_EXHAUSTED) and are closed", type=int)
    max_inflate_ratio: float = option(32.0, "a gzip/deflate request body may inflate to at most this many times its "
                                      "size (else 413)", type=float)
    follow_symlinks: bool = option(False, "follow repository symlinks that leave a model's folder (refused by "
                                   "default; logged when followed)", action="store_true")
    http_fast_path: bool = option(True, "every HTTP request through aiohttp (the fast path answers whole plain infer "
                                  "requests itself; this is for A/B runs and as an escape hatch)",
                                  off="--no-http-fast-path")
    grpc_transport: str = option("native", "native: gRPC on resdeploy's own HTTP/2 connection (fast, the default); "
                                 "grpcio: grpc.aio (for A/B runs and as an escape hatch)", choices=GRPC_TRANSPORTS)
    reuse_port: bool = False  # set in each worker of --workers N (not a user setting)

    def __post_init__(self) -> None:
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise InputError(f"model control mode {self.model_control_mode!r} is unknown; expected one of "
                             f"{', '.join(MODEL_CONTROL_MODES)}")
        if self.load_models and self.model_control_mode != "explicit":
            raise InputError("--load-model needs --model-control-mode explicit (in mode none every model loads at start)")
        if isinstance(self.workers, str):
            self.workers = parse_workers(self.workers, self.model_control_mode)
        if self.workers < 1:
            raise InputError(f"--workers is {self.workers}; give at least 1")
        if self.grpc_transport not in GRPC_TRANSPORTS:
            raise InputError(f"gRPC transport {self.grpc_transport!r} is unknown; expected one of {', '.join(GRPC_TRANSPORTS)}")
        if self.workers > 1 and self.model_control_mode == "explicit":
            raise InputError("--workers > 1 needs --model-control-mode none: a load/unload request reaches one worker "
                             "process only, so the workers would serve different models")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name[:-2].replace('_', '-')} is {getattr(self, name)}; give a positive number of seconds")
        if self.max_connections < 1:
            raise InputError(f"--max-connections is {self.max_connections}; give at least 1")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`ServerConfig` field that has help (two where it has an ``off`` flag)."""
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        if "help" not in meta:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = meta["to_flag"](default) if meta["to_flag"] and default is not None else default
        if isinstance(default, bool) and meta["off"]:  # a default-on switch: only its --no- flag exists
            parser.add_argument(meta["off"], dest=f.name, action="store_false", help=meta["help"])
            continue
        kwargs = dict(meta["argparse"])
        if kwargs.get("action") != "store_true" and "choices" not in kwargs:
            kwargs.setdefault("metavar", _flag(f)[2:].upper().replace("-", "_"))
        if kwargs.get("action") != "store_true":
            kwargs.setdefault("default", shown)
            if shown not in (None, [], ()) and kwargs.get("action") != "append":
                kwargs["help"] = f"{meta['help']} (default: {shown})"
        parser.add_argument(_flag(f), dest=f.name, help=kwargs.pop("help", meta["help"]), **kwargs)
        if meta["off"]:
            parser.add_argument(meta["off"], dest=f.name, action="store_const", const=None, help=meta["off_help"])


def from_arguments(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of parsed :func:`add_arguments` options."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        if "help" not in f.metadata or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        convert = f.metadata["to_field"]
        values[f.name] = convert(value) if convert and value is not None else value
    return ServerConfig(**values)


__all__ = ["GRPC_TRANSPORTS", "MODEL_CONTROL_MODES", "ServerConfig", "add_arguments", "from_arguments", "option",
           "parse_workers", "usable_cores"]
