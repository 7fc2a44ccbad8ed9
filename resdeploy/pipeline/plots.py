"""The latency plot: p50 latency with its p50..p99 spread, and throughput, against batch size (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resdeploy import atomic


def plot_bench(result: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG from a bench result dict (``BenchResult.to_dict()``): left latency, right throughput.

    Anchors are dashed, resdeploy engines solid; a case that failed its parity gate is drawn with crosses and
    marked "parity FAIL" in the legend, so a fast but wrong engine cannot pass for a good one.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(13, 5.2), dpi=110)
    cases = [c for c in result["cases"] if c["stats"]]
    cmap = plt.get_cmap("tab10" if len(cases) <= 10 else "tab20")
    for i, case in enumerate(cases):
        rows = sorted(case["stats"].values(), key=lambda s: s["batch"])
        b = [s["batch"] for s in rows]
        p50 = [s["p50_ms"] for s in rows]
        lo = [s["p50_ms"] - s["min_ms"] for s in rows]
        hi = [s["p99_ms"] - s["p50_ms"] for s in rows]
        tp = [s["throughput"] for s in rows]
        failed = case.get("parity") and case["parity"].get("passed") is False
        style = dict(color=cmap(i % cmap.N), linestyle="--" if case["kind"] != "engine" else "-",
                     marker="x" if failed else "o", markersize=6, linewidth=1.6)
        label = case["name"] + (" (parity FAIL)" if failed else "") + (" [anchor]" if case["kind"] == "anchor" else "")
        dodge = 2 ** ((i - (len(cases) - 1) / 2) * 0.035)  # spread the cases sideways so their bars do not overlap
        ax_lat.errorbar([x * dodge for x in b], p50, yerr=[lo, hi], capsize=2, elinewidth=0.9, label=label, **style)
        ax_tp.plot(b, tp, label=label, **style)
    batches = sorted({s["batch"] for c in cases for s in c["stats"].values()})
    for ax in (ax_lat, ax_tp):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches or [1])
        ax.set_xticklabels([str(x) for x in batches] or ["1"])
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    ax_lat.set_ylabel("latency per batch, ms (p50; bars: min .. p99)")
    ax_lat.set_title("latency (lower is better)")
    ax_tp.set_ylabel("throughput, images/s")
    ax_tp.set_title("throughput (higher is better)")
    m = result.get("machine", {})
    fig.suptitle(f"{result.get('model', '')}: {m.get('cpu_model', '?')}, {result.get('config', {}).get('threads', '?')} threads, "
                 f"load avg {m.get('load_average_start', ['?'])[0]}", fontsize=10)
    handles, labels = ax_lat.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 4), 1, 0.95))
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
