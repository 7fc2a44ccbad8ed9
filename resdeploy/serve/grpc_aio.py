"""The gRPC adapter on ``grpc.aio`` (``--grpc-transport grpcio``): the A/B baseline and escape hatch of the native
transport, the same service (:mod:`resdeploy.serve.grpc_api`) on the server's event loop.

Limits (shared with HTTP): a message larger than ``max_body_bytes`` is refused by gRPC itself
(RESOURCE_EXHAUSTED), after decompression; at most ``max_connections`` RPCs run at once (more get
RESOURCE_EXHAUSTED); idle connections close after ``keepalive_timeout_s``. On SIGTERM new RPCs get UNAVAILABLE
while the ones in progress finish (:meth:`AioGrpc.drain`). Imported only when this transport is chosen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from resdeploy.errors import InputError
from resdeploy.serve.core import SHUTTING_DOWN, DataPlane
from resdeploy.serve.grpc_api import GrpcApi, encode_infer, parse_request, status_code
from resdeploy.serve.protocol import ServeError

log = logging.getLogger("resdeploy.serve")
STATUS = {c.value[0]: c for c in grpc.StatusCode}


class AioGrpc(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer over a :class:`resdeploy.serve.core.DataPlane`; the RPCs not in ``GrpcApi.SERVED`` keep the
    generated servicer's UNIMPLEMENTED."""

    def __init__(self, core: DataPlane) -> None:
        self.core = core
        self.api = GrpcApi(core)
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.grpc_server: Any = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        c = self.core.config
        options = [("grpc.max_receive_message_length", c.max_body_bytes),
                   ("grpc.max_send_message_length", -1),
                   ("grpc.max_connection_idle_ms", int(c.keepalive_timeout_s * 1000)),
                   ("grpc.so_reuseport", 1 if c.reuse_port else 0)]  # shared only by --workers processes
        self.grpc_server = grpc.aio.server(options=options, maximum_concurrent_rpcs=c.max_connections)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self, self.grpc_server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self.grpc_server.add_insecure_port(address)
        except RuntimeError as exc:
            bound, why = 0, str(exc)
        else:
            why = "the port is in use or the address is not local"
        if not bound:
            raise InputError(f"cannot listen for gRPC on {address}: {why}; pick a free port with --grpc-port "
                             "(0 = any free port) or turn gRPC off with --no-grpc")
        await self.grpc_server.start()
        self.port = bound
        return bound

    async def drain(self, deadline: float, grace_s: float) -> int:
        """After SIGTERM (the core refuses new RPCs): wait for the RPCs in progress, at least ``grace_s`` and
        until ``deadline`` (monotonic) at most, then stop. Returns how many were still running (abandoned)."""
        await asyncio.sleep(grace_s)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                await asyncio.wait_for(self.idle.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        abandoned = self.inflight
        if self.grpc_server is not None:
            # RPCs grpc.aio already took but had not handed over yet are answered (UNAVAILABLE) within the grace,
            # not cancelled; stop returns as soon as none is left
            await self.grpc_server.stop(1.0)
        return abandoned

    async def _rpc(self, name: str, request: Any, context: Any) -> Any:
        """One RPC: refused while draining, counted in flight, ServeErrors turned into status codes."""
        if self.core.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        self.inflight += 1
        self.idle.clear()
        try:
            if name == "ModelInfer":
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                return await self.core.infer_async(request.model_name, request.model_version,
                                                   lambda m: parse_request(request), encode_infer, deadline)
            return await self.api.call(name, request)
        except ServeError as exc:
            await context.abort(STATUS[status_code(exc)], str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server down; the client gets the reason
            log.exception("internal error in gRPC %s", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()


def _method(name: str) -> Any:
    async def method(self: AioGrpc, request: Any, context: Any) -> Any:
        return await self._rpc(name, request, context)

    method.__name__ = name
    return method


for _name in GrpcApi.SERVED:
    setattr(AioGrpc, _name, _method(_name))


__all__ = ["AioGrpc"]
