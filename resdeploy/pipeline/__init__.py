"""The only place that chains the stages: CLI, reports, parity and latency harnesses."""
