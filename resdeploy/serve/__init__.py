"""Serving: runners for every backend, dynamic batching, and the KServe v2 / Triton HTTP server.

Imports neither resdeploy.models nor resdeploy.export: it runs artifacts, it does not make them.
"""
