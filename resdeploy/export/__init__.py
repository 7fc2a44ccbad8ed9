"""PyTorch -> ONNX export that verifies itself, and the short-path check (residual adds and every other kind).

The check is one engine (:mod:`resdeploy.export.engine`): discover (:mod:`~resdeploy.export.discover`, on the
DataGraph of :mod:`~resdeploy.export.onnx_graph` or :mod:`~resdeploy.export.torch_graph`) -> align
(:mod:`~resdeploy.export.align`) -> diff the structure (:mod:`~resdeploy.export.structure`) -> compare numbers
(:mod:`~resdeploy.export.numeric`). :func:`check_skip_adds` and :func:`check_short_paths` are its two views;
:func:`build_probe` (:mod:`~resdeploy.export.probe`) exposes each short path's output for tools such as Polygraphy.

This package never imports ``resdeploy.models``: callers hand in an ``nn.Module`` plus plain metadata.
"""

from resdeploy.export.check_report import Defect, ShortPathReport, SkipAddReport, SkipAddRow, require_pass
from resdeploy.export.discover import KINDS, ResidualAdd, ShortPath
from resdeploy.export.onnx_export import ExportConfig, ExportReport, Parity, check_parity, export_onnx, fold_batchnorm
from resdeploy.export.probe import Probe, ProbeGraph, ProbeReference, build_probe, probe_reference
from resdeploy.export.shortpath import (
    check_short_paths,
    find_short_paths,
    require_short_paths_pass,
    trace_short_paths,
)
from resdeploy.export.skipadd import (
    TorchResidualAdd,
    check_skip_adds,
    find_residual_adds,
    load_onnx,
    trace_residual_adds,
)

__all__ = [
    "Defect", "ExportConfig", "ExportReport", "KINDS", "Parity", "ResidualAdd", "SkipAddReport", "SkipAddRow",
    "TorchResidualAdd", "check_parity", "check_skip_adds", "export_onnx", "find_residual_adds", "fold_batchnorm",
    "load_onnx", "require_pass", "trace_residual_adds",
    "ShortPath", "ShortPathReport", "check_short_paths", "find_short_paths", "require_short_paths_pass", "trace_short_paths",
    "Probe", "ProbeGraph", "ProbeReference", "build_probe", "probe_reference",
]
