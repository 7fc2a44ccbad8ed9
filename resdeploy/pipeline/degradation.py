"""The degradation experiment (He et al. 2015, Fig. 1 and Fig. 6): plain and residual nets of two depths, trained
with the paper's CIFAR protocol on packaged data over several seeds; a verdict by a rule fixed in advance.

The claim under test: a deeper *plain* net reaches a higher training error than a shallower one (an optimisation
problem, not overfitting), while the deeper *residual* net does not. The protocol and each default's source are in
:mod:`resdeploy.pipeline.degradation_train`; the verdict rule and its margin in
:mod:`resdeploy.pipeline.degradation_rule`; docs/degradation.md has both, with a full run's result.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from resdeploy.errors import InputError
from resdeploy.pipeline.degradation_rule import MARGIN, Verdict, family_gap, judge, mean, spread
from resdeploy.pipeline.degradation_train import (NETS, DegradationConfig, RunResult, depth, family_ends,
                                                  load_tensors, lr_at, train_one)

PREVIEW_LINE = ("preview: --quick trains {iterations} iterations x {seeds} seed(s), not the protocol; no verdict. "
                "Run without --quick for the verdict")

__all__ = ["NETS", "DegradationConfig", "DegradationResult", "NetSummary", "PREVIEW_LINE", "quick_config",
           "run_degradation"]


@dataclass(frozen=True)
class NetSummary:
    """One net over its seeds: mean and spread (sample standard deviation) of the final errors."""

    net: str
    params: int
    seeds: int
    train_error: float
    train_spread: float
    test_error: float
    test_spread: float
    seconds: float  # mean wall time of one run
    cpu_seconds: float  # mean CPU time of one run


@dataclass(frozen=True)
class DegradationResult:
    config: DegradationConfig
    data: str  # what was trained on, in words
    runs: tuple[RunResult, ...]
    seconds: float  # wall time of the whole experiment
    machine: dict[str, Any] = field(default_factory=dict)

    def runs_of(self, net: str) -> list[RunResult]:
        return [r for r in self.runs if r.net == net]

    def summary(self) -> list[NetSummary]:
        out = []
        for net in self.config.nets:
            rs = self.runs_of(net)
            tr, te = [r.final_train_error for r in rs], [r.final_test_error for r in rs]
            out.append(NetSummary(net, rs[0].params, len(rs), mean(tr), spread(tr), mean(te), spread(te),
                                  mean([r.seconds for r in rs]), mean([r.cpu_seconds for r in rs])))
        return out

    def verdict(self) -> Verdict | None:
        """The rule's verdict; None for a preview or when a family lacks two depths."""
        ends = family_ends(self.config.nets)
        if self.config.preview or set(ends) != {"plain", "resnet"}:
            return None
        gaps = [family_gap(s, d, [r.final_train_error for r in self.runs_of(s)],
                           [r.final_train_error for r in self.runs_of(d)]) for s, d in (ends["plain"], ends["resnet"])]
        return judge(gaps[0], gaps[1], seeds=self.config.seeds, margin=MARGIN)

    def to_dict(self) -> dict[str, Any]:
        v = self.verdict()
        return {"config": asdict(self.config), "data": self.data, "seconds": round(self.seconds, 1),
                "machine": self.machine, "verdict": v.to_dict() if v else None,
                "preview": self.preview_line() if self.config.preview else None,
                "summary": [asdict(s) for s in self.summary()],
                "runs": [{**asdict(r), "final_train_error": r.final_train_error, "final_test_error": r.final_test_error}
                         for r in self.runs]}

    def preview_line(self) -> str:
        return PREVIEW_LINE.format(iterations=self.config.iterations, seeds=self.config.seeds)

    def protocol_line(self) -> str:
        c = self.config
        drops = ", ".join(str(round(f * c.iterations)) for f in c.lr_drops)
        seeds = ", ".join(str(c.seed + k) for k in range(c.seeds))
        warm = f"warm-up lr {c.warmup_lr} until train error < {c.warmup_until:.0%}" if c.warmup else "no warm-up"
        return (f"protocol: {c.iterations} iterations of batch {c.batch_size}, SGD lr {c.lr} (/10 at iterations "
                f"{drops}, final lr {lr_at(c, c.iterations - 1):g}), momentum {c.momentum}, weight decay "
                f"{c.weight_decay:g}, {warm}; seeds {seeds}")

    def machine_line(self) -> str:
        m = self.machine
        start, end = (m.get(k) or ["?"] for k in ("load_average_start", "load_average_end"))
        simd = ", ".join(m.get("simd", [])) or "no SIMD flags"
        return (f"machine: {m.get('cpu_model', '?')} ({m.get('core', '?')}; {simd}), {m.get('usable_cpus', '?')} CPUs; "
                f"load average {start[0]} at start, {end[0]} at end; {m.get('processes', '?')} process(es) x "
                f"{self.config.threads} torch thread(s); wall {self.seconds:.0f} s")

    def __str__(self) -> str:
        lines = [f"degradation experiment on {self.data}", self.protocol_line(), self.machine_line(),
                 f"{'net':<10} {'params':>9} {'final train error':>18} {'final test error':>17} {'s/run':>7} "
                 f"{'cpu s/run':>9}"]
        for s in self.summary():
            lines.append(f"{s.net:<10} {s.params:>9,} {100 * s.train_error:>8.2f} ± {100 * s.train_spread:5.2f} % "
                         f"{100 * s.test_error:>7.2f} ± {100 * s.test_spread:5.2f} % {s.seconds:>7.0f} "
                         f"{s.cpu_seconds:>9.0f}")
        lines.append(f"(mean ± sample standard deviation over {self.config.seeds} seed(s))")
        v = self.verdict()
        if self.config.preview:
            lines.append(self.preview_line())
        elif v is None:
            lines.append("no verdict: the rule compares two depths of plain and of resnet nets (the default --nets)")
        else:
            lines.append(str(v))
        return "\n".join(lines)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def stderr_progress(msg: str) -> None:
    print(f"[degradation] {msg}", file=sys.stderr, flush=True)


def run_all(config: DegradationConfig, tasks: list[tuple[str, int]], jobs: int,
            say: Callable[[str], None] | None) -> list[RunResult]:
    """Every (net, seed) run: in this process with one job, else in ``jobs`` spawned processes."""
    if jobs <= 1 or len(tasks) <= 1:
        return [train_one(config, net, seed, say) for net, seed in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results = []
    worker_say = stderr_progress if say is not None else None  # a worker cannot call back into this process
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_one, config, net, seed, worker_say) for net, seed in tasks]
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            if say:
                say(f"{r.net} seed {r.seed} done: final train error {r.final_train_error:.2%}, test error "
                    f"{r.final_test_error:.2%}, {r.seconds:.0f} s ({r.cpu_seconds:.0f} CPU s)")
    return results


def run_degradation(config: DegradationConfig = DegradationConfig(),
                    progress: Callable[[str], None] | None = None) -> DegradationResult:
    """Train every net in ``config.nets`` with every seed; the result holds the runs, the summary and the verdict."""
    from resdeploy.models.registry import list_models
    from resdeploy.pipeline.machine import machine_info

    config.validate()
    unknown = [n for n in config.nets if n not in list_models()]
    if unknown:
        raise InputError(f"unknown nets {unknown}; the experiment compares plain<depth> with resnet<depth> "
                         "(see `resdeploy models`)")
    if len(set(config.nets)) != len(config.nets):
        raise InputError(f"--nets lists a net twice ({list(config.nets)}); name each once")
    info = machine_info()
    _, tensors = load_tensors(config)  # bad --data fails here, before any process starts
    jobs = config.jobs or usable_cpus()
    # Deepest first: with several processes the long runs start early and the short ones fill in at the end.
    tasks = sorted(((n, config.seed + k) for n in config.nets for k in range(config.seeds)), key=lambda t: -depth(t[0]))
    start = time.perf_counter()
    runs = run_all(config, tasks, jobs, progress)
    order = {n: i for i, n in enumerate(config.nets)}
    runs.sort(key=lambda r: (order[r.net], r.seed))
    machine = {"cpu_model": info.get("cpu_model"), "core": (info.get("isa") or {}).get("core"),
               "simd": info.get("simd", []), "usable_cpus": info.get("usable_cpus"), "processes": min(jobs, len(tasks)),
               "torch_threads": config.threads, "load_average_start": info.get("load_average_start"),
               "load_average_end": list(round(x, 2) for x in os.getloadavg()), "versions": info.get("versions", {})}
    return DegradationResult(config, tensors.described, tuple(runs), time.perf_counter() - start, machine)


def quick_config(nets: Sequence[str] = NETS) -> DegradationConfig:
    """A preview in a few minutes on 2 cores: the same data and schedule, far fewer iterations, 2 seeds."""
    return replace(DegradationConfig(), nets=tuple(nets), iterations=80, seeds=2, curve_points=4, preview=True)
