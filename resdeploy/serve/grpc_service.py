"""The KServe v2 gRPC protocol: Triton's ``inference.GRPCInferenceService`` over the HTTP server's models, batchers,
statistics and limits, on the server's event loop. Two transports carry it: resdeploy's own HTTP/2 connection
(:mod:`resdeploy.serve.grpc_native`, the default, which subclasses this service) and ``grpc.aio``
(``--grpc-transport grpcio``: :meth:`GrpcService.start` / :meth:`GrpcService.drain` below).

The messages and the service are tritonclient's own (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``),
so ``tritonclient.grpc`` works unchanged. Imported only when the server starts gRPC (``import resdeploy.serve``
does not import grpc).

Endpoints: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (inputs
in ``raw_input_contents`` or typed ``contents``; outputs always in ``raw_output_contents``, as Triton answers;
classification), ModelStatistics, RepositoryIndex, RepositoryModelLoad/Unload (by model control mode). The rest
of Triton's service (streaming, shared memory, trace, logging) answers UNIMPLEMENTED.

Errors are gRPC status codes as Triton uses them: a bad request INVALID_ARGUMENT, an unknown (or failed, or
unloaded) model NOT_FOUND, statistics of an unavailable model INVALID_ARGUMENT, not ready / overloaded / timed
out / shutting down / load-unload without explicit model control UNAVAILABLE; the message is the HTTP error's.

Limits (issue 10's, shared with HTTP): a message larger than ``max_body_bytes`` is refused by gRPC itself
(RESOURCE_EXHAUSTED), after decompression; every tensor's element count is checked against the bytes it carries
before anything is allocated; a request's deadline is the smallest of its gRPC deadline, its ``timeout``
parameter and the model's or server's default; at most ``max_connections`` RPCs run at once (more get
RESOURCE_EXHAUSTED); idle connections close after ``keepalive_timeout_s``. On SIGTERM new RPCs get UNAVAILABLE
while the ones in progress finish (see :meth:`GrpcService.drain`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from resdeploy.serve.metrics import stats_json
from resdeploy.serve.protocol import (DATATYPES, MAX_DIMS, MAX_ELEMENTS, MAX_TIMEOUT_US, BadRequest, InferRequest,
                                      RequestedOutput, ServeError, Unavailable, _decode_bytes_tensor, classify,
                                      encode_bytes_tensor, triton_dtype)

log = logging.getLogger("resdeploy.serve")

# HTTP status of a ServeError -> gRPC status code (Triton's mapping of its error kinds)
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}
# typed InferTensorContents field per datatype (FP16/BF16 have none: raw_input_contents only)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _param(p: Any) -> Any:
    """An InferParameter's value (bool, int, str, float, ...)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _shape(tensor: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise BadRequest(f"input '{tensor.name}': shape {list(shape)} has a negative dim")
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"input '{tensor.name}': shape has {len(shape)} dims; at most {MAX_DIMS} are supported")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise BadRequest(f"input '{tensor.name}': shape {list(shape)} has more than 2**62 elements")
    return shape


def parse_request(msg: Any) -> InferRequest:
    """A ModelInferRequest as an InferRequest (numpy inputs), every size checked before anything is allocated."""
    if not len(msg.inputs):
        raise BadRequest("request has no inputs; expected at least one InferInputTensor")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(f"request has {len(msg.inputs)} inputs but {len(raw)} raw_input_contents; send one per input, "
                         "in input order (or typed contents for every input)")
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(msg.inputs):
        name = t.name
        if name in feeds:
            raise BadRequest(f"input '{name}' appears twice in the request")
        if t.datatype not in DATATYPES:
            raise BadRequest(f"input '{name}': datatype {t.datatype[:40]!r} unknown; expected one of {', '.join(DATATYPES)}")
        dtype = DATATYPES[t.datatype]
        shape = _shape(t)
        count = math.prod(shape)
        has_contents = t.HasField("contents") and t.contents.ByteSize() > 0
        if raw:
            if has_contents:
                raise BadRequest(f"input '{name}': contents must not be given when the request uses raw_input_contents")
            data = memoryview(raw[i])
            if t.datatype == "BYTES":
                arr = _decode_bytes_tensor(data, count, name)
            else:
                if len(data) != count * dtype.itemsize:
                    raise BadRequest(f"input '{name}': raw_input_contents has {len(data)} bytes but shape {list(shape)} "
                                     f"{t.datatype} needs {count * dtype.itemsize}")
                arr = np.frombuffer(data, dtype=dtype)
        else:
            field = CONTENTS.get(t.datatype)
            if field is None:
                raise BadRequest(f"input '{name}': datatype {t.datatype} has no typed contents; send it in raw_input_contents")
            values = getattr(t.contents, field)
            if len(values) != count:
                raise BadRequest(f"input '{name}': contents.{field} has {len(values)} values but shape {list(shape)} needs {count}")
            if t.datatype == "BYTES":
                arr = np.empty(count, dtype=np.object_)
                for k, v in enumerate(values):
                    arr[k] = bytes(v)
            else:
                arr = np.asarray(values)
                if dtype.kind in "iu" and arr.size:
                    info = np.iinfo(dtype)
                    if arr.min() < info.min or arr.max() > info.max:
                        raise BadRequest(f"input '{name}': values {arr.min()}..{arr.max()} do not fit {t.datatype}")
                arr = arr.astype(dtype)
        feeds[name] = arr.reshape(shape)
    outputs = None
    if len(msg.outputs):
        outputs = []
        for o in msg.outputs:
            k = _param(o.parameters["classification"]) if "classification" in o.parameters else 0
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise BadRequest(f"output '{o.name}': classification {k!r} is not a non-negative integer")
            outputs.append(RequestedOutput(o.name, True, int(k)))
    params: dict[str, Any] = {}
    if "timeout" in msg.parameters:
        timeout = _param(msg.parameters["timeout"])
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_TIMEOUT_US:
            raise BadRequest(f"request parameter 'timeout' is {timeout!r}; expected microseconds from 0 to {MAX_TIMEOUT_US}")
        params["timeout"] = timeout
    return InferRequest(id=msg.id or None, inputs=feeds, outputs=outputs, binary_data_output=True, parameters=params)


def encode_response(model: str, version: str, req: InferRequest, outputs: dict[str, np.ndarray],
                    labels: dict[str, list[str]], batched: bool) -> Any:
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=req.id or "")
    wanted = req.outputs if req.outputs is not None else [RequestedOutput(n, True) for n in outputs]
    for w in wanted:
        arr = outputs[w.name]
        if w.class_count:
            arr = classify(arr, w.class_count, labels.get(w.name), batched)
        datatype = triton_dtype(arr.dtype)
        resp.outputs.add(name=w.name, datatype=datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(encode_bytes_tensor(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes())
    return resp


class RpcAbort(Exception):
    """``context.abort`` of resdeploy's own gRPC transport (resdeploy/serve/grpc_native.py): the RPC ends with
    ``code`` (a gRPC status number) and ``details``."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _rpc(method: Any) -> Any:
    """Count the RPC in flight, refuse new ones while draining, and turn ServeErrors into status codes."""

    @functools.wraps(method)
    async def wrapper(self: "GrpcService", request: Any, context: Any) -> Any:
        if self.server.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")
        self.inflight += 1
        self.idle.clear()
        try:
            return await method(self, request, context)
        except ServeError as exc:
            await context.abort(CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server down; the client gets the reason
            if isinstance(exc, (grpc.aio.AbortError, RpcAbort)):
                raise
            log.exception("internal error in gRPC %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    return wrapper


class GrpcService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer over a :class:`resdeploy.serve.server.ModelServer`."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.grpc_server: Any = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        c = self.server.config
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
            from resdeploy.errors import InputError

            raise InputError(f"cannot listen for gRPC on {address}: {why}; pick a free port with --grpc-port "
                             "(0 = any free port) or turn gRPC off with --no-grpc")
        await self.grpc_server.start()
        self.port = bound
        return bound

    async def drain(self, deadline: float) -> int:
        """After SIGTERM (``server.draining`` is set, so new RPCs get UNAVAILABLE): wait for the RPCs in progress
        until ``deadline`` (monotonic), then stop. Returns how many were still running (abandoned)."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                await asyncio.wait_for(self.idle.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        abandoned = self.inflight
        if self.grpc_server is not None:
            await self.grpc_server.stop(0.2)
        return abandoned

    # -- health and metadata ---------------------------------------------------------------------------
    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.server.ready)

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.server.model_ready(request.name, request.version)[0])

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(**self.server.server_metadata())

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        md = self.server.model_metadata(request.name, request.version)
        resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for key in ("inputs", "outputs"):
            for t in md[key]:
                getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        m = self.server.available(request.name, request.version)
        resp = pb.ModelConfigResponse()
        resp.config.CopyFrom(m.entry.config)
        return resp

    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = self.server.stats(request.name, request.version)
        return json_format.ParseDict(stats_json(stats), pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    # -- repository ------------------------------------------------------------------------------------
    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        resp = pb.RepositoryIndexResponse()
        for row in self.server.index(ready_only=request.ready):
            resp.models.add(**row)
        return resp

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        params = {k: _param(v) for k, v in request.parameters.items()}
        if isinstance(params.get("config"), bytes):
            params["config"] = params["config"].decode("utf-8", "replace")
        await self.server.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        from resdeploy.serve.server import CONTROL_OFF

        if self.server.config.model_control_mode != "explicit":
            raise Unavailable(CONTROL_OFF)
        await self.server.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------------
    @_rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        t0 = time.perf_counter_ns()
        server = self.server
        m = server.infer_target(request.model_name, request.model_version)
        server.inflight += 1
        try:
            req = parse_request(request)
            remaining = context.time_remaining()
            deadline_us = int(remaining * 1e6) if remaining is not None else None
            try:
                return await server.execute(m, req, t0, lambda outputs: encode_response(
                    m.name, m.version, req, outputs, m.labels, batched=m.max_batch_size > 0), deadline_us)
            except Unavailable as exc:
                left = context.time_remaining()
                if left is not None and left <= 0:  # the client's own deadline passed: gRPC's code for it
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"gRPC deadline exceeded: {exc}")
                raise
        finally:
            server.inflight -= 1


__all__ = ["CODES", "GrpcService", "RpcAbort", "encode_response", "parse_request"]
