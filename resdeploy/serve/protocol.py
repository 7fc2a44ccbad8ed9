"""Open Inference Protocol v2 (KServe) REST messages, with Triton's binary-tensor and classification extensions.

Parsing and encoding only; no I/O. A request body is either all JSON, or (binary tensor extension) a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors in input order, each input
saying its size in ``parameters.binary_data_size``. Responses mirror that: outputs asked for with
``parameters.binary_data: true`` (or every output when the request sets ``binary_data_output: true``, as
tritonclient does when it names no outputs) are appended raw after the JSON header.

Every error is a :class:`ServeError` whose ``status`` is the HTTP status and whose message names the tensor,
what came and what was expected. Requests are untrusted: every count a request claims is checked against the
bytes it actually carries *before* anything is allocated, so no request makes the decoder allocate more than a
small multiple of its body (see ``MAX_DIMS`` and :func:`decode_bytes_tensor`).

Non-finite floats in JSON responses: RFC 8259 has no NaN or Infinity, so a NaN/Inf output value is written as
the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (protobuf's JSON mapping). tritonclient's
``as_numpy`` turns those strings back into the float exactly (``np.array(data, dtype)``); binary outputs
(``binary_data: true``, tritonclient's default) carry the IEEE bits unchanged.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resdeploy.errors import InputError, ResdeployError


# -- errors -----------------------------------------------------------------------------------------------
class ServeError(ResdeployError):
    """A request the server answers with an error; ``status`` is the HTTP status, the body ``{"error": msg}``."""

    status: int = 500


class BadRequest(ServeError, InputError):
    status = 400


class NotFound(ServeError, InputError):
    status = 404


class PayloadTooLarge(ServeError, InputError):
    status = 413


class RequestTimeout(ServeError, InputError):
    """The client did not send its request in time; the connection is closed after the answer."""

    status = 408


class UnsupportedMediaType(ServeError, InputError):
    status = 415


class Unavailable(ServeError):
    """Not ready, shutting down, queue full or timed out: the client may retry later."""

    status = 503


class DeadlineExceeded(Unavailable):
    """The caller's own deadline (gRPC's ``grpc-timeout``) passed before the answer was ready."""


class InternalError(ServeError):
    """A bug (an exception that is not a ServeError) met while serving a request; the message names it."""

    status = 500


def json_error(message: str) -> bytes:
    """An error response body, ``{"error": message}`` (RFC 8259 JSON, the form Triton's HTTP errors take)."""
    return json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")


# -- datatypes --------------------------------------------------------------------------------------------
# Triton wire datatype -> numpy dtype. BYTES travels as 4-byte little-endian length + bytes per element.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NP_TO_TRITON = {v.name: k for k, v in DATATYPES.items() if k != "BYTES"}
_DTYPE_NAMES = {v: k for k, v in DATATYPES.items() if k != "BYTES"}  # np.dtype -> wire name (native byte order)

# Request limits. numpy 1.x allows 32 dims (2.x: 64); no model here has more than a handful, so 32 is the
# portable ceiling and a deeper claim is a 400 instead of numpy's ValueError deep inside reshape.
MAX_DIMS = 32
MAX_ELEMENTS = 1 << 62  # product of the non-zero dims; numpy's intp overflows past 2**63
MAX_TIMEOUT_US = 24 * 3600 * 10**6  # a day: larger deadlines overflow asyncio timers and are never meant


def triton_dtype(numpy_dtype: str | np.dtype) -> str:
    """'float32' -> 'FP32'. Object/bytes/str arrays are BYTES."""
    if numpy_dtype.__class__ is not str:  # a dtype: a dict hit per tensor on the hot path
        hit = _DTYPE_NAMES.get(numpy_dtype)
        if hit is not None:
            return hit
    dt = np.dtype(numpy_dtype)
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _NP_TO_TRITON[dt.name]
    except KeyError:
        raise BadRequest(f"numpy dtype {dt.name} has no KServe v2 datatype; supported: {', '.join(_NP_TO_TRITON)}") from None


def config_dtype_to_triton(name: str) -> str:
    """Model config enum name -> wire datatype: 'TYPE_FP32' -> 'FP32', 'TYPE_STRING' -> 'BYTES'."""
    short = name.removeprefix("TYPE_")
    return "BYTES" if short == "STRING" else short


def triton_to_config_dtype(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


# -- tensor specs the server validates against ----------------------------------------------------------
@dataclass(frozen=True)
class IOSpec:
    """An input or output as the server publishes it: wire datatype and full shape (-1 = any, batch included)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def __str__(self) -> str:
        return f"{self.name}: {self.datatype}[{','.join('?' if d < 0 else str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    class_count: int = 0  # >0: return the top-k classes as BYTES "value:index[:label]" instead of the tensor


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: every output, binary per ``binary_data_output``
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def timeout_us(self) -> int | None:
        """The request's ``timeout`` parameter (microseconds, checked finite and in range by the parser)."""
        t = self.parameters.get("timeout")
        return int(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= MAX_TIMEOUT_US else None


# -- request parsing --------------------------------------------------------------------------------------
def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int within the body, or None when absent."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length is {value!r}; expected the byte length of the JSON header") from None
    if n < 0 or n > body_size:
        raise BadRequest(f"Inference-Header-Content-Length is {n} but the body has {body_size} bytes; "
                         "expected the JSON header's length, at most the body size")
    return n


def _loads(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except RecursionError:  # the C decoder refuses nesting past the interpreter's recursion limit
        raise BadRequest("malformed JSON in the request: nested too deeply; a KServe v2 request needs only a few "
                         "levels (nest 'data' by the shape at most, or send it flat)") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, and integers over Python's 4,300-digit limit
        raise BadRequest(f"malformed JSON in the request: {exc}; expected a KServe v2 inference request object") from None


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """``obj['parameters']``: absent/null is {}, anything else must be a JSON object."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' is {_kind(params)}; expected a JSON object")
    return params


def _kind(value: Any) -> str:
    """A JSON type name for error messages (never the value itself, which may be huge)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        shown = repr(shape) if len(repr(shape)) < 200 else f"{_kind(shape)} of {len(shape) if isinstance(shape, list) else '?'} items"
        raise BadRequest(f"input '{name}': shape {shown} is not a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"input '{name}': shape has {len(shape)} dims; at most {MAX_DIMS} are supported")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise BadRequest(f"input '{name}': shape {shape} has more than 2**62 elements; no tensor is that large")
    return tuple(shape)


def decode_bytes_tensor(raw: memoryview, count: int, name: str) -> np.ndarray:
    # Every element takes at least its 4-byte length prefix, so a count the bytes cannot hold is refused before
    # the object array (8 bytes per element) is allocated: 113 bytes claiming 2e8 elements must not cost 1.6 GB.
    if count * 4 > len(raw):
        raise BadRequest(f"input '{name}': shape claims {count} BYTES elements but binary_data_size is {len(raw)} bytes; "
                         f"each element needs at least 4 (its length prefix), so at most {len(raw) // 4} fit")
    out = np.empty(count, dtype=np.object_)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise BadRequest(f"input '{name}': BYTES data ends after {i} of {count} elements; "
                             "each element is a 4-byte little-endian length followed by the bytes")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(f"input '{name}': BYTES element {i} says {n} bytes but only {len(raw) - pos} remain")
        out[i] = bytes(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise BadRequest(f"input '{name}': BYTES data has {len(raw) - pos} bytes after the last of {count} elements")
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for x in arr.ravel():
        b = x if isinstance(x, bytes) else str(x).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _json_data(data: Any, dtype: np.dtype, datatype: str, count: int, name: str, ndim: int = 1) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input '{name}': 'data' is a {type(data).__name__}; expected a list (flat or nested) of {count} values")
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:  # before allocating anything sized by the claim
            raise BadRequest(f"input '{name}': 'data' has {len(flat)} values but shape needs {count}")
        arr = np.empty(len(flat), dtype=np.object_)
        for i, s in enumerate(flat):
            if not isinstance(s, str):
                raise BadRequest(f"input '{name}': BYTES element {i} is {s!r}; expected a string")
            arr[i] = s.encode("utf-8")
    else:
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError, OverflowError, RecursionError):  # ragged or too-deep nesting, odd values
            raise BadRequest(f"input '{name}': 'data' is a ragged or too deeply nested list; expected {count} "
                             "values, flat or nested by the shape") from None
        if arr.ndim > max(1, ndim):
            raise BadRequest(f"input '{name}': 'data' is nested {arr.ndim} levels deep but the shape has {ndim} dims; "
                             "send it flat or nested by the shape")
        if arr.dtype.kind == "O" or arr.dtype.kind in "SU":
            raise BadRequest(f"input '{name}': 'data' holds non-numeric values; expected {count} {datatype} numbers")
        if dtype.kind in "iu" and arr.size and arr.dtype.kind not in "iub":
            raise BadRequest(f"input '{name}': 'data' holds non-integer values for datatype {datatype}; expected integers")
        if dtype.kind == "b" and arr.size and arr.dtype.kind != "b":
            raise BadRequest(f"input '{name}': 'data' must hold true/false for datatype BOOL")
        if dtype.kind in "iu" and arr.size:
            info = np.iinfo(dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise BadRequest(f"input '{name}': values {lo}..{hi} do not fit {datatype} ({info.min}..{info.max})")
        arr = arr.astype(dtype, copy=False).ravel()
    if arr.size != count:
        raise BadRequest(f"input '{name}': 'data' has {arr.size} values but shape needs {count}")
    return arr


def _flatten(data: list) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a v2 infer request (all-JSON when ``header_length`` is None) into numpy inputs. Not yet model-checked."""
    view = memoryview(body)
    header = _loads(view if header_length is None else view[:header_length])
    if not isinstance(header, dict):
        raise BadRequest(f"request JSON is a {type(header).__name__}; expected an object with an 'inputs' list")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request has no 'inputs' list; expected [{\"name\", \"datatype\", \"shape\", \"data\"}, ...]")
    offset = header_length or 0
    binary_total = len(body) - offset
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise BadRequest(f"inputs[{i}] has no 'name'; each input needs name, datatype, shape and data")
        name = t["name"]
        if name in feeds:
            raise BadRequest(f"input '{name}' appears twice in the request")
        datatype = t.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list/object is unhashable: check first
            shown = repr(datatype) if isinstance(datatype, str) and len(datatype) < 64 else f"{_kind(datatype)}"
            raise BadRequest(f"input '{name}': datatype {shown} unknown; expected a string, one of {', '.join(DATATYPES)}")
        dtype = DATATYPES[datatype]
        shape = _shape(t, name)
        count = math.prod(shape)
        params = _parameters(t, f"input '{name}'")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise BadRequest(f"input '{name}' has both 'data' and binary_data_size; send one")
            if header_length is None:
                raise BadRequest(f"input '{name}' has binary_data_size but the request has no Inference-Header-Content-Length header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size {size!r} is not a non-negative integer")
            if offset + size > len(body):
                raise BadRequest(f"input '{name}': binary_data_size {size} runs past the end of the body "
                                 f"({len(body) - offset} bytes left after the earlier tensors)")
            raw = view[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                arr = decode_bytes_tensor(raw, count, name)
            else:
                if size != count * dtype.itemsize:
                    raise BadRequest(f"input '{name}': binary_data_size is {size} bytes; shape {list(shape)} of {datatype} "
                                     f"needs {count * dtype.itemsize}")
                if (offset - size) % dtype.itemsize:  # unaligned in the body: copy rather than hand a backend an odd pointer
                    arr = np.frombuffer(bytes(raw), dtype=dtype)
                else:
                    arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset - size)
        elif "data" in t:
            arr = _json_data(t["data"], dtype, datatype, count, name, len(shape))
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        feeds[name] = arr.reshape(shape)
    if header_length is not None and offset != len(body):
        raise BadRequest(f"request body has {len(body) - offset} bytes after the binary tensors "
                         f"(header {header_length} + declared binary_data_size {offset - header_length} of {binary_total}); "
                         "binary_data_size values must add up to the bytes after the JSON header")
    outputs = None
    if "outputs" in header:
        raw_outputs = header["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list of {\"name\", \"parameters\"} objects")
        outputs = []
        for o in raw_outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest(f"a requested output ({_kind(o)}) has no 'name'; expected {{\"name\": ..., \"parameters\": {{...}}}}")
            p = _parameters(o, f"output '{o['name']}'")
            k = p.get("classification", 0)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise BadRequest(f"output '{o['name']}': classification {k!r} must be a non-negative integer")
            binary = p.get("binary_data", False)
            if not isinstance(binary, bool):
                raise BadRequest(f"output '{o['name']}': binary_data is {_kind(binary)}; expected true or false")
            outputs.append(RequestedOutput(o["name"], binary, k))
    params = _parameters(header, "request")
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                or not math.isfinite(timeout) or timeout < 0 or timeout > MAX_TIMEOUT_US):
        shown = repr(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else f"{_kind(timeout)}"
        raise BadRequest(f"request parameter 'timeout' is {shown}; expected microseconds, a finite number from 0 "
                         f"(no deadline) to {MAX_TIMEOUT_US} (a day)")
    bdo = params.get("binary_data_output", False)
    if not isinstance(bdo, bool):
        raise BadRequest(f"request parameter 'binary_data_output' is {_kind(bdo)}; expected true or false")
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):  # Triton's id is a string; str() of a deep object recurses
        raise BadRequest(f"request 'id' is {_kind(rid)}; expected a string")
    return InferRequest(id=rid, inputs=feeds, outputs=outputs, binary_data_output=bdo, parameters=params)


def parse_raw_request(body: bytes, spec: IOSpec, model: str, max_batch_size: int) -> InferRequest:
    """Triton's raw binary request (``Inference-Header-Content-Length: 0``): the whole body is the model's one
    input, its shape taken from the config (batch 1 when the model batches; one -1 dim deduced from the size),
    every output returned as binary tensors."""
    dims = list(spec.shape[1:] if max_batch_size > 0 else spec.shape)
    shape = ([1] if max_batch_size > 0 else []) + dims
    wild = [i for i, d in enumerate(shape) if d < 0]
    if len(wild) > 1:
        raise BadRequest(f"model '{model}': the shape of the raw input '{spec.name}' can not be deduced because there "
                         f"are more than one variable-sized dimension ({spec}); send a JSON header with its shape")
    dtype = DATATYPES[spec.datatype]
    known = math.prod(d for d in shape if d >= 0)
    if spec.datatype == "BYTES":
        if wild or known != 1:
            raise BadRequest(f"model '{model}': for BYTES raw input '{spec.name}' the model must have input shape [1] "
                             f"(it has {spec}); send a JSON header")
        arr = np.empty(1, dtype=np.object_)
        arr[0] = bytes(body)
        return InferRequest(None, {spec.name: arr.reshape(shape)}, None, binary_data_output=True)
    if wild:
        shape[wild[0]] = len(body) // dtype.itemsize // known if known else 0
    want = math.prod(shape) * dtype.itemsize
    if want != len(body):
        raise BadRequest(f"model '{model}': raw input '{spec.name}' (Inference-Header-Content-Length: 0, the body is "
                         f"the whole input) has {len(body)} bytes; expected {want} for shape {shape} {spec.datatype}")
    arr = np.frombuffer(body, dtype=dtype).reshape(shape)
    return InferRequest(None, {spec.name: arr}, None, binary_data_output=True)


def parse_http_infer(model: Any, body: bytes, header_length: str | None) -> InferRequest:
    """An HTTP infer request to ``model`` (a served version: ``name``, ``inputs``, ``max_batch_size``): JSON with
    binary tensors after ``Inference-Header-Content-Length`` bytes, or, when that header is 0, Triton's raw binary
    request (the body is the model's one input)."""
    hlen = parse_header_length(header_length, len(body))
    if hlen != 0:
        return parse_infer_request(body, hlen)
    if len(model.inputs) != 1:
        raise BadRequest(f"model '{model.name}' has {len(model.inputs)} inputs; a raw binary request "
                         "(Inference-Header-Content-Length: 0) needs a model with exactly one. Send a JSON header")
    return parse_raw_request(body, model.inputs[0], model.name, model.max_batch_size)


def check_inputs(request: InferRequest, specs: list[IOSpec], model: str, max_batch_size: int) -> int:
    """Check the request's inputs against the model's; returns the request's batch size (1 for non-batching models)."""
    expected = {s.name: s for s in specs}
    unknown = sorted(set(request.inputs) - set(expected))
    missing = sorted(set(expected) - set(request.inputs))
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown inputs {unknown}" if unknown else "", f"missing inputs {missing}" if missing else "") if x)
        raise BadRequest(f"model '{model}': {what}; expected {', '.join(str(s) for s in specs)}")
    batch = None
    for name, arr in request.inputs.items():
        spec = expected[name]
        got = triton_dtype(arr.dtype)
        if got != spec.datatype:
            raise BadRequest(f"model '{model}': input '{name}' has datatype {got}; expected {spec.datatype} ({spec})")
        if arr.ndim != len(spec.shape) or any(d >= 0 and d != n for d, n in zip(spec.shape, arr.shape)):
            raise BadRequest(f"model '{model}': input '{name}' has shape {list(arr.shape)}; expected {spec}")
        if max_batch_size > 0:
            b = arr.shape[0]
            if b < 1 or b > max_batch_size:
                raise BadRequest(f"model '{model}': input '{name}' has batch {b}; expected 1..{max_batch_size} (max_batch_size)")
            if batch is not None and b != batch:
                raise BadRequest(f"model '{model}': input '{name}' has batch {b} but another input has {batch}; all must agree")
            batch = b
    return batch or 1


# -- response encoding ------------------------------------------------------------------------------------
def classify(arr: np.ndarray, k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    """Triton's classification extension: top-k per batch item as b'value:index[:label]', best first."""
    rows = arr.reshape(arr.shape[0], -1) if batched else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r in range(rows.shape[0]):
        for j, c in enumerate(idx[r]):
            label = labels[c] if labels and c < len(labels) else ""
            out[r, j] = f"{float(rows[r, c]):f}:{int(c)}{':' + label if label else ''}".encode("utf-8")
    return out if batched else out.reshape(k)


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None  # set when binary tensors follow the JSON header


def encode_infer_response(model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                          labels: dict[str, list[str]] | None = None, batched: bool = True) -> EncodedResponse:
    """Encode the model's outputs as the request asked: which outputs, JSON or binary, classification."""
    if request.outputs is None:
        wanted = [RequestedOutput(n, request.binary_data_output) for n in outputs]
    else:
        wanted = request.outputs
    entries, blobs = [], []
    for w in wanted:
        arr = outputs[w.name]
        if w.class_count:
            arr = classify(arr, w.class_count, (labels or {}).get(w.name), batched)
        datatype = triton_dtype(arr.dtype)
        entry: dict[str, Any] = {"name": w.name, "datatype": datatype, "shape": list(arr.shape)}
        if w.binary:
            raw = encode_bytes_tensor(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.ravel()]
        else:
            entry["data"] = _json_values(arr)
        entries.append(entry)
    resp: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        resp["id"] = request.id
    resp["outputs"] = entries
    header = json.dumps(resp, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if not blobs:
        return EncodedResponse(header, None)
    return EncodedResponse(b"".join([header, *blobs]), len(header))


def encode_http_infer(model: Any, request: InferRequest, outputs: dict[str, np.ndarray]) -> EncodedResponse:
    """:func:`encode_infer_response` for a served version (``name``, ``version``, ``labels``, ``max_batch_size``)."""
    return encode_infer_response(model.name, model.version, request, outputs, model.labels,
                                 batched=model.max_batch_size > 0)


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _json_values(arr: np.ndarray) -> list[Any]:
    """A tensor's values for JSON: numbers, with NaN/Inf as the strings "NaN"/"Infinity"/"-Infinity" (RFC 8259
    has no such numbers; these are protobuf's JSON spellings and tritonclient's as_numpy parses them back)."""
    values = arr.ravel().tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        values = [v if math.isfinite(v) else _NON_FINITE[repr(v)] for v in values]
    return values


def check_outputs(request: InferRequest, names: list[str], model: str) -> None:
    if request.outputs is None:
        return
    for o in request.outputs:
        if o.name not in names:
            raise BadRequest(f"model '{model}': requested output '{o.name}' unknown; expected one of {names}")


__all__ = ["BadRequest", "DATATYPES", "DeadlineExceeded", "EncodedResponse", "IOSpec", "InferRequest", "InternalError",
           "MAX_DIMS", "MAX_TIMEOUT_US", "NotFound", "PayloadTooLarge", "RequestTimeout", "RequestedOutput", "ServeError",
           "Unavailable", "UnsupportedMediaType", "check_inputs", "check_outputs", "classify", "config_dtype_to_triton",
           "decode_bytes_tensor", "encode_bytes_tensor", "encode_http_infer", "encode_infer_response", "json_error",
           "parse_header_length", "parse_http_infer", "parse_infer_request", "parse_raw_request", "triton_dtype",
           "triton_to_config_dtype"]
