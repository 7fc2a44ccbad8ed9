"""The degradation experiment's figure and files: one PNG in the style of He et al. 2015 Fig. 1/6 (plain nets
left, ResNets right; dashed training error, bold test error; the deeper net in red), with the seeds' mean as the
line and their spread (mean ± sample standard deviation) as a band, and the result as JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resdeploy import atomic
from resdeploy.pipeline.degradation import DegradationResult


def curves(result: DegradationResult, net: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Iterations, mean and spread over seeds of ``key`` (train_error | test_error) of ``net``, in percent."""
    runs = result.runs_of(net)
    values = 100 * np.asarray([getattr(r, key) for r in runs], dtype=float)
    sd = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(values.shape[1])
    return np.asarray(runs[0].iterations), values.mean(axis=0), sd


def plot_degradation(result: DegradationResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90, sharey=True)
    for ax, family, title in ((axes[0], "plain", "plain"), (axes[1], "resnet", "ResNet")):
        nets = sorted((n for n in result.config.nets if n.startswith(family) and n[len(family):].isdigit()),
                      key=lambda n: int(n[len(family):]))
        for k, net in enumerate(nets):
            c = plt.get_cmap("autumn_r")(0.35 + 0.65 * k / max(1, len(nets) - 1))
            for key, style, width in (("train_error", "--", 1.0), ("test_error", "-", 2.2)):
                x, m, sd = curves(result, net, key)
                ax.plot(x, m, style, color=c, linewidth=width,
                        label=f"{title}-{net[len(family):]}" if key == "test_error" else None)
                ax.fill_between(x, np.clip(m - sd, 0, 100), np.clip(m + sd, 0, 100), color=c, alpha=0.18, linewidth=0)
        for f in result.config.lr_drops:
            ax.axvline(round(f * result.config.iterations), color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(f"{title} nets")
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if nets:
            ax.legend(loc="upper right", fontsize=9)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, 100)
    v = result.verdict()
    tail = result.preview_line().split(";")[0] if result.config.preview else (
        f"verdict: {v.outcome}" if v else "no verdict")
    fig.suptitle(f"{result.data}; {result.config.seeds} seed(s), band = ± 1 sd; dashed: training, bold: test "
                 f"error; {tail}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_outputs(result: DegradationResult, out_dir: str | Path) -> tuple[Path, Path]:
    """``degradation.json`` and ``degradation.png`` in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = atomic.write_json(out / "degradation.json", result.to_dict())
    return js, plot_degradation(result, out / "degradation.png")
