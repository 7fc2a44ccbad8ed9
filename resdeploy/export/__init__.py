"""PyTorch -> ONNX export that verifies itself, and the skip-add graph check (generalised: the short-path check).

This package never imports ``resdeploy.models``: callers hand in an ``nn.Module`` plus plain metadata.
"""

from resdeploy.export.onnx_export import ExportConfig, ExportReport, Parity, check_parity, export_onnx, fold_batchnorm
from resdeploy.export.skipadd import (
    Defect,
    ResidualAdd,
    SkipAddReport,
    SkipAddRow,
    check_skip_adds,
    find_residual_adds,
    load_onnx,
    require_pass,
)
from resdeploy.export.shortpath import (
    ShortPath,
    ShortPathReport,
    check_short_paths,
    find_short_paths,
    require_short_paths_pass,
    trace_short_paths,
)
from resdeploy.export.torch_structure import TorchResidualAdd, trace_residual_adds

__all__ = [
    "Defect", "ExportConfig", "ExportReport", "Parity", "ResidualAdd", "SkipAddReport", "SkipAddRow", "TorchResidualAdd",
    "check_parity", "check_skip_adds", "export_onnx", "find_residual_adds", "fold_batchnorm", "load_onnx",
    "require_pass", "trace_residual_adds",
    "ShortPath", "ShortPathReport", "check_short_paths", "find_short_paths", "require_short_paths_pass", "trace_short_paths",
]
