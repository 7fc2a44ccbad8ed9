"""A stand-in for Triton's onnxruntime backend, run by Triton's python backend (not part of resdeploy).

PyPI's nvidia-pytriton bundles a real ``tritonserver`` with the python backend only. When
``<backend-directory>/onnxruntime/libtriton_onnxruntime.so`` is absent, Triton runs
``<backend-directory>/onnxruntime/model.py`` as a Python-based backend named ``onnxruntime``; the
harness (benchmarks/triton_harness.py) copies this file there. Everything else is real Triton: config
validation and auto-complete rules, version policies, the dynamic batcher, instance groups, warmup,
classification, statistics and metrics.

The model: the version's ``model.onnx`` (or ``default_model_filename``) with ONNX Runtime on the CPU,
default session options (ONNX Runtime's default threads), each dynamic batch as ONE ``session.run``.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


_ORT_TO_CONFIG = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
                  "tensor(uint8)": "TYPE_UINT8", "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16",
                  "tensor(uint16)": "TYPE_UINT16", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
                  "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64", "tensor(bool)": "TYPE_BOOL",
                  "tensor(string)": "TYPE_STRING", "tensor(bfloat16)": "TYPE_BF16"}


def _validate(ios, model_ios, batching, kind, model_name):
    by_name = {m.name: m for m in model_ios}
    for io in ios:
        m = by_name.get(io["name"])
        if m is None:
            raise pb_utils.TritonModelException(f"unable to load model '{model_name}', configuration expects {kind} "
                                                f"'{io['name']}' but the model has {sorted(by_name)}")
        if _ORT_TO_CONFIG.get(m.type) != io["data_type"]:
            raise pb_utils.TritonModelException(f"unable to load model '{model_name}', configuration expects datatype "
                                                f"{io['data_type']} for {kind} '{io['name']}', model provides {m.type}")
        shape = [d if isinstance(d, int) else -1 for d in m.shape]
        if batching:
            if not shape or shape[0] != -1:
                raise pb_utils.TritonModelException(f"unable to load model '{model_name}', model {kind} '{io['name']}' "
                                                    f"has shape {shape} without a batch dimension but max_batch_size > 0")
            shape = shape[1:]
        dims = [int(d) for d in (io["reshape"]["shape"] if io.get("reshape") else io["dims"])]
        if len(dims) != len(shape) or any(a != b and b != -1 for a, b in zip(dims, shape)):
            raise pb_utils.TritonModelException(f"unable to load model '{model_name}', model {kind} '{io['name']}' has "
                                                f"dims {shape} but the configuration says {dims}")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        model_dir = args["model_repository"]  # the model's folder (REPO/<model>)
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(model_dir, str(args["model_version"]), filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{path} is missing (the onnxruntime stand-in backend loads it)")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [i["name"] for i in config.get("input", [])] or [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Like the real backend's ValidateInputs/ValidateOutputs: config and model must agree at load time.
        _validate(config.get("input", []), self.session.get_inputs(), self.batching, "input", args["model_name"])
        _validate(config.get("output", []), self.session.get_outputs(), self.batching, "output", args["model_name"])

    def execute(self, requests):
        try:
            feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests]
        except AttributeError as exc:  # an input missing from a request (Triton normally refuses it first)
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"missing input: {exc}")) for _ in requests]
        if self.batching and len(feeds) > 1:
            sizes = [f[self.input_names[0]].shape[0] for f in feeds]
            batch = {n: np.concatenate([f[n] for f in feeds]) for n in self.input_names}
            try:
                outs = self.session.run(self.output_names, batch)
            except Exception as exc:  # noqa: BLE001 - reported to the client as Triton does
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))) for _ in requests]
            bounds = np.cumsum([0, *sizes])
            return [self._response(r, [o[bounds[k]:bounds[k + 1]] for o in outs]) for k, r in enumerate(requests)]
        responses = []
        for r, f in zip(requests, feeds):
            try:
                responses.append(self._response(r, self.session.run(self.output_names, f)))
            except Exception as exc:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _response(self, request, outs):
        wanted = set(request.requested_output_names()) or set(self.output_names)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(o))
                                                          for n, o in zip(self.output_names, outs) if n in wanted])

    def finalize(self):
        self.session = None
