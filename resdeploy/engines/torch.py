"""The PyTorch reference runner: an ``nn.Module`` in eval mode, FP32 on the CPU unless told otherwise.

Options for the latency anchors: ``compile=True`` wraps the module in ``torch.compile`` (compiled on first use
of each batch size), and on a CUDA device ``half=True`` runs it in FP16 and ``cuda_graphs=True`` captures one
CUDA graph per input shape and replays it (the GPU baseline: PyTorch eager FP16 with CUDA graphs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from resdeploy.artifact import ArtifactMetadata, InputSpec
from resdeploy.errors import BackendUnavailable, InputError
from resdeploy.engines.base import Runner, TensorSpec


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, module: Any, input_shape: tuple[int, ...] | None = None, input_name: str = "input",
                 output_name: str = "logits", device: str = "cpu", name: str = "", compile: bool = False,
                 compile_mode: str | None = None, half: bool = False, cuda_graphs: bool = False) -> None:
        super().__init__(name)
        self.module = module
        spec = getattr(module, "input_spec", None)
        self.input_shape = tuple(input_shape) if input_shape else (tuple(spec.shape) if spec is not None else None)
        if self.input_shape is None:
            raise InputError("TorchRunner needs input_shape (C, H, W) when the module has no input_spec")
        self.input_name, self.output_name, self.device = input_name, output_name, device
        if cuda_graphs and not str(device).startswith("cuda"):
            raise InputError(f"torch runner: cuda_graphs needs a CUDA device, got device={device!r}; pass device='cuda'")
        if cuda_graphs and compile:
            raise InputError("torch runner: choose compile or cuda_graphs, not both (torch.compile mode='reduce-overhead' uses CUDA graphs itself)")
        self.compile, self.compile_mode, self.half, self.cuda_graphs = compile, compile_mode, half, cuda_graphs
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    def _activate(self) -> None:
        import torch

        self._torch = torch
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"torch {torch.__version__} sees no CUDA device for device={self.device!r}; "
                                     "install a CUDA build of torch on a machine with a GPU")
        self.module = self.module.eval().to(self.device)
        self._dtype = torch.float16 if self.half else torch.float32
        if self.half:
            self.module = self.module.half()
        self._fn = torch.compile(self.module, mode=self.compile_mode) if self.compile else self.module
        self._inputs = [TensorSpec(self.input_name, "float32", (None, *self.input_shape))]
        with torch.inference_mode():
            out = self._fn(torch.zeros(1, *self.input_shape, device=self.device, dtype=self._dtype))
        self._outputs = [TensorSpec(self.output_name, "float32", (None, *out.shape[1:]))]
        mode = "compile" + (f"({self.compile_mode})" if self.compile_mode else "") if self.compile else "eager"
        extras = (" fp16" if self.half else "") + (" cuda-graphs" if self.cuda_graphs else "")
        self.description = f"torch {torch.__version__} {mode} {self.device}{extras}"
        self.providers = (f"torch {self.device}",)
        labels = tuple(getattr(self.module, "labels", ()) or ())
        spec = getattr(self.module, "input_spec", None)
        self.artifact_metadata = ArtifactMetadata(architecture=str(getattr(self.module, "arch", "") or ""), labels=labels,
                                                  input_spec=spec if isinstance(spec, InputSpec) else None)

    def _deactivate(self) -> None:
        self._graphs.clear()

    def _graph(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        """(graph, static input, static output) for ``shape``, captured on first use after a side-stream warm-up."""
        torch = self._torch
        if shape not in self._graphs:
            static_in = torch.zeros(shape, device=self.device, dtype=self._dtype)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(feed[self.input_name])
        with torch.inference_mode():
            if self.cuda_graphs:
                graph, static_in, static_out = self._graph(tuple(x.shape))
                static_in.copy_(x)
                graph.replay()
                y = static_out
            else:
                y = self._fn(x.to(self.device, dtype=self._dtype))
        return {self.output_name: y.float().cpu().numpy()}
