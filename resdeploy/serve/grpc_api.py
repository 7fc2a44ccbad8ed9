"""The KServe v2 gRPC protocol over the core, transport-neutral: Triton's ``inference.GRPCInferenceService``
messages (tritonclient's own ``service_pb2``, so ``tritonclient.grpc`` works unchanged), their conversion, the
status codes, and every RPC but ModelInfer as a coroutine from request message to response message.

Two adapters carry it: :mod:`resdeploy.serve.grpc_native` (resdeploy's HTTP/2 connection, the default) and
:mod:`resdeploy.serve.grpc_aio` (``grpc.aio``, ``--grpc-transport grpcio``). ModelInfer goes through the core's
one inference sequence in both, with :func:`parse_request` and :func:`encode_response`.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (inputs in
``raw_input_contents`` or typed ``contents``; outputs always in ``raw_output_contents``, as Triton answers;
classification), ModelStatistics, RepositoryIndex, RepositoryModelLoad/Unload (by model control mode). The rest
of Triton's service (streaming, shared memory, trace, logging) answers UNIMPLEMENTED.

Errors are gRPC status codes as Triton uses them (:func:`status_code`): a bad request INVALID_ARGUMENT, an
unknown (or failed, or unloaded) model NOT_FOUND, statistics of an unavailable model INVALID_ARGUMENT, not
ready / overloaded / timed out / shutting down / load-unload without explicit model control UNAVAILABLE, the
caller's deadline DEADLINE_EXCEEDED; the message is the HTTP error's. Every tensor's element count is checked
against the bytes it carries before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from resdeploy.serve.core import DataPlane
from resdeploy.serve.metrics import stats_json
from resdeploy.serve.protocol import (DATATYPES, MAX_DIMS, MAX_ELEMENTS, MAX_TIMEOUT_US, BadRequest, DeadlineExceeded,
                                      InferRequest, RequestedOutput, ServeError, classify, decode_bytes_tensor,
                                      encode_bytes_tensor, triton_dtype)

SERVICE = "inference.GRPCInferenceService"
# gRPC status codes (grpc.StatusCode's numbers, without importing grpc)
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14
# HTTP status of a ServeError -> gRPC status code (Triton's mapping of its error kinds)
CODES = {400: INVALID_ARGUMENT, 404: NOT_FOUND, 408: DEADLINE_EXCEEDED, 413: RESOURCE_EXHAUSTED, 415: INVALID_ARGUMENT,
         503: UNAVAILABLE}


def status_code(exc: ServeError) -> int:
    """The gRPC status code of a ServeError."""
    return DEADLINE_EXCEEDED if isinstance(exc, DeadlineExceeded) else CODES.get(exc.status, INTERNAL)


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
                arr = decode_bytes_tensor(data, count, name)
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


def encode_infer(model: Any, req: InferRequest, outputs: dict[str, np.ndarray]) -> Any:
    """:func:`encode_response` for a served version (``name``, ``version``, ``labels``, ``max_batch_size``)."""
    return encode_response(model.name, model.version, req, outputs, model.labels, batched=model.max_batch_size > 0)


class GrpcApi:
    """Every served RPC but ModelInfer: ``await api.call(name, request)`` returns the response message or raises
    a ServeError. ``UNARY``: the served RPCs by name, with their request class."""

    UNARY = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
             "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
    SERVED = (*UNARY, "ModelInfer")

    def __init__(self, core: DataPlane) -> None:
        self.core = core
        self.handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {n: getattr(self, n) for n in self.UNARY}

    async def call(self, name: str, request: Any) -> Any:
        return await self.handlers[name](request)

    async def ServerLive(self, request: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(self, request: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version)[0])

    async def ServerMetadata(self, request: Any) -> Any:
        return pb.ServerMetadataResponse(**self.core.server_metadata())

    async def ModelMetadata(self, request: Any) -> Any:
        md = self.core.model_metadata(request.name, request.version)
        resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for key in ("inputs", "outputs"):
            for t in md[key]:
                getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelConfig(self, request: Any) -> Any:
        m = self.core.available(request.name, request.version)
        resp = pb.ModelConfigResponse()
        resp.config.CopyFrom(m.entry.config)
        return resp

    async def ModelStatistics(self, request: Any) -> Any:
        stats = self.core.stats(request.name, request.version)
        return json_format.ParseDict(stats_json(stats), pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request: Any) -> Any:
        resp = pb.RepositoryIndexResponse()
        for row in self.core.index(ready_only=request.ready):
            resp.models.add(**row)
        return resp

    async def RepositoryModelLoad(self, request: Any) -> Any:
        params = {k: _param(v) for k, v in request.parameters.items()}
        if isinstance(params.get("config"), bytes):
            params["config"] = params["config"].decode("utf-8", "replace")
        await self.core.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any) -> Any:
        await self.core.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


__all__ = ["CODES", "GrpcApi", "SERVICE", "encode_infer", "encode_response", "parse_request", "status_code"]
