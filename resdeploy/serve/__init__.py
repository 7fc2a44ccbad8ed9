"""Serving: the KServe v2 / Triton protocol, dynamic batching, and one data plane behind its HTTP and gRPC transports.

Runs artifacts through the engines (``resdeploy.engines.open_runner``); imports neither resdeploy.models nor
resdeploy.export: it runs artifacts, it does not make them.
"""
