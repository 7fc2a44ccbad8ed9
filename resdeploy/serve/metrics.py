"""Per-model statistics: Triton's statistics-extension JSON and Prometheus text with Triton's metric names.

All updates happen on the server's event loop (the batcher reports from done-callbacks), so there is no lock.
Durations are kept in nanoseconds (the statistics extension's unit) and exported in microseconds for
Prometheus, as Triton does (``nv_inference_request_duration_us`` and friends are cumulative counters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    """A count and a cumulative duration in ns (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, n: int = 1) -> None:
        self.count += n
        self.ns += int(ns) * n

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


# Reasons a request failed, as Triton labels nv_inference_request_failure.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass
class ModelStats:
    """Counters of one model version; ``stats_json`` / ``prometheus_text`` render them."""

    name: str
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    inference_count: int = 0  # samples (batch items) inferred
    execution_count: int = 0  # model executions (one per dynamic batch)
    last_inference_ms: int = 0
    batch_stats: dict[int, BatchStat] = field(default_factory=dict)
    pending: int = 0  # requests queued or executing now (nv_inference_pending_request_count)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution of ``batch_size`` samples (several requests merged by the batcher)."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.last_inference_ms = int(time.time() * 1000)
        b = self.batch_stats.setdefault(batch_size, BatchStat())
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def record_request_compute(self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """Per request (Triton charges each request of a batch the batch's compute time)."""
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_success(self, duration_ns: int) -> None:
        self.success.add(duration_ns)

    def record_failure(self, duration_ns: int, reason: str = "OTHER") -> None:
        self.fail.add(duration_ns)
        self.failures[reason if reason in self.failures else "OTHER"] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(), "fail": self.fail.to_json(), "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(), "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": Duration().to_json(), "cache_miss": Duration().to_json(),
            },
            "response_stats": {},
            "batch_stats": [{"batch_size": bs, "compute_input": s.compute_input.to_json(),
                             "compute_infer": s.compute_infer.to_json(), "compute_output": s.compute_output.to_json()}
                            for bs, s in sorted(self.batch_stats.items())],
            "memory_usage": [],
        }


def stats_json(stats: list[ModelStats]) -> dict[str, Any]:
    """The body of ``GET /v2/models[/<m>[/versions/<v>]]/stats`` (what tritonclient's get_inference_statistics parses)."""
    return {"model_stats": [s.to_json() for s in stats]}


# name, type, help, getter (value for one ModelStats)
_METRICS: list[tuple[str, str, str, Any]] = [
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (does not include cached requests)",
     lambda s: s.execution_count),
    ("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution per-model.",
     lambda s: s.pending),
    ("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds (includes cached requests)",
     lambda s: (s.success.ns + s.fail.ns) // 1000),
    ("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds (includes cached requests)",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us", "counter", "Cumulative compute input duration in microseconds (does not include cached requests)",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds (does not include cached requests)",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us", "counter", "Cumulative inference compute output duration in microseconds (does not include cached requests)",
     lambda s: s.compute_output.ns // 1000),
]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats: list[ModelStats]) -> str:
    """Prometheus exposition text (format 0.0.4) with Triton's names and labels {model, version}."""
    lines: list[str] = []
    first = _METRICS[0]
    for name, kind, help_, get in [first]:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model="{_esc(s.name)}",version="{_esc(s.version)}"}} {get(s)}' for s in stats]
    name = "nv_inference_request_failure"
    lines += [f"# HELP {name} Number of failed inference requests, all batch sizes", f"# TYPE {name} counter"]
    for s in stats:
        for reason, n in s.failures.items():
            lines.append(f'{name}{{model="{_esc(s.name)}",reason="{reason}",version="{_esc(s.version)}"}} {n}')
    for name, kind, help_, get in _METRICS[1:]:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model="{_esc(s.name)}",version="{_esc(s.version)}"}} {get(s)}' for s in stats]
    return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse exposition text into {(metric, frozenset(labels.items())): value}; for tests and the benchmark."""
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                labels[k] = v.strip('"')
        out[(name, frozenset(labels.items()))] = float(value)
    return out


__all__ = ["BatchStat", "Duration", "FAILURE_REASONS", "ModelStats", "parse_prometheus", "prometheus_text", "stats_json"]
