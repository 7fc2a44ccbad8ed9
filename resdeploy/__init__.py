"""resdeploy: a deployment pipeline for residual networks.

The package root stays light on purpose: ``import resdeploy`` must never pull in torch,
onnxruntime, TensorRT or CUDA. Subpackages import what they need.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
