"""Regenerate the report test fixture ``tests/data/run-summary/`` (run.json + bench/bench.png) from real stages.

    PYTHONPATH=$PWD python tests/pipeline/make_report_fixture.py            # ~2-3 minutes on 2 cores
    PYTHONPATH=$PWD python tests/pipeline/make_report_fixture.py --keep runs/fixture   # keep the run folder

It runs the real library stages once on the committed checkpoint ``tests/data/resnet20-mnist`` into a scratch run
folder (export -> skip-add check -> FP16/INT8 variants -> ONNX Runtime engines -> parity on 200 test images ->
a 40 s batch-1 bench -> Triton repository) and writes the run summary in the schema of
:mod:`resdeploy.pipeline.report`, i.e. what ``resdeploy run`` writes as ``run.json``. Only run.json and the plot
are kept: the ONNX files and engines are too big to commit, and the report needs only their sha256s and sizes.
Not a test (no ``test_`` prefix): ``tests/pipeline/test_report.py`` reads its output.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = Path("tests/data/resnet20-mnist")  # relative: the report shows it as a user would type it
OUT = ROOT / "tests" / "data" / "run-summary"


def _key(*parts: Any) -> str:
    """A stand-in for the pipeline's cache key: sha256 over the stage's inputs and options."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _kind(rel: Path) -> str:
    top = rel.parts[0]
    return {"onnx": "onnx", "engines": "engine", "model_repository": "repository", "bench": "bench"}.get(top, "report")


def generate(run_dir: Path) -> dict[str, Any]:
    import resdeploy
    from resdeploy import atomic
    from resdeploy.models import load_checkpoint
    from resdeploy.pipeline.bench import BenchConfig, run_bench
    from resdeploy.pipeline.machine import machine_info
    from resdeploy.pipeline.building import BuildConfig, build
    from resdeploy.pipeline.exporting import check_onnx, export_checkpoint
    from resdeploy.pipeline.parity import ParityConfig, run_parity
    from resdeploy.pipeline.quantizing import QuantizeConfig, quantize_model
    from resdeploy.pipeline.repository import make_model_repository

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_run = time.perf_counter()
    stages: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], Any], summary: Callable[[Any], str], *key: Any) -> Any:
        print(f"[fixture] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        stages.append({"name": name, "status": "ran", "seconds": round(time.perf_counter() - t0, 2),
                       "summary": summary(result), "key": _key(name, *key)})
        print(f"[fixture] {name}: {stages[-1]['summary']} ({stages[-1]['seconds']} s)", flush=True)
        return result

    model, info = load_checkpoint(CHECKPOINT)
    ck_sha = atomic.sha256_file(CHECKPOINT / "model.safetensors")
    acc = info.metrics
    stages.append({"name": "train", "status": "cached", "seconds": 0.0,
                   "summary": f"checkpoint {CHECKPOINT} (test accuracy {acc['test_accuracy']:.2%})",
                   "key": _key("train", ck_sha)})
    onnx_dir = run_dir / "onnx"
    fp32 = onnx_dir / "fp32.onnx"
    stage("export", lambda: export_checkpoint(CHECKPOINT, fp32, check=False),
          lambda r: f"{fp32.relative_to(run_dir)}: opset {r.export.opset}, {r.export.nodes} nodes, {r.export.parity}", ck_sha)
    skip = {"fp32": stage("check", lambda: check_onnx(fp32, CHECKPOINT),
                          lambda r: f"{r.to_dict()['residual_adds']} residual adds, {'passed' if r else 'FAILED'}",
                          atomic.sha256_file(fp32))}
    variants = {"fp32": fp32}
    for prec in ("fp16", "int8"):
        out = onnx_dir / f"{prec}.onnx"
        res = stage(f"quantize-{prec}",
                    lambda p=prec, o=out: quantize_model(fp32, o, config=QuantizeConfig(precision=p), reference=CHECKPOINT),
                    lambda r: f"{r.path.relative_to(run_dir)}: {r.accuracy}", atomic.sha256_file(fp32), prec)
        skip[prec] = res.skipadd
        variants[prec] = out
    fusion: dict[str, Any] = {}
    for prec, path in variants.items():
        name = f"onnxruntime-{prec}"
        rep = stage(f"build-{name}",
                    lambda p=path, n=name, pr=prec: build(p, run_dir / "engines" / n,
                                                          config=BuildConfig(rewrite_option_a=pr == "fp32")),
                    lambda r: f"{r.fusion.fused}/{len(r.fusion.adds)} residual Adds fused, optimised vs reference "
                              f"max |diff| {r.max_abs_diff:.2g}", atomic.sha256_file(path))
        fusion[name] = rep.fusion.to_dict()
    shas = {k: atomic.sha256_file(v) for k, v in variants.items()}
    parity = stage("parity", lambda: run_parity(CHECKPOINT, variants=variants, backends=("onnxruntime",),
                                                config=ParityConfig(limit=200), progress=lambda _m: None),
                   lambda r: f"{len(r.rows)} variants, {'all gates passed' if r else 'FAILED: ' + '; '.join(map(str, r.failures()))}",
                   shas)
    atomic.write_json(run_dir / "parity.json", parity.to_dict())
    bench = stage("bench", lambda: run_bench(BenchConfig(checkpoint=str(CHECKPOINT), batches=(1,), max_seconds=40,
                                                         backends=("onnxruntime",), anchors=("eager",),
                                                         variants={k: str(v) for k, v in variants.items()}),
                                             run_dir / "bench", stream=io.StringIO()),
                  lambda r: (r.summary() or ["nothing measured"])[0], shas)
    stage("repository", lambda: make_model_repository(variants["int8"], run_dir / "model_repository",
                                                      model_name="resnet20", overwrite=True),
          lambda r: str(r).replace(str(run_dir) + "/", ""), shas["int8"])
    artifacts = []
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(run_dir)
            artifacts.append({"name": "/".join(rel.parts[1:]) or rel.name, "path": str(rel), "sha256": atomic.sha256_file(p),
                              "bytes": p.stat().st_size, "kind": _kind(rel)})
    m = machine_info()
    versions = {k: m["versions"].get(k) for k in ("torch", "onnx", "onnxruntime", "openvino")}
    passed = bool(parity) and all(bool(s) for s in skip.values())
    failed = None if passed else next((str(g) for g in parity.failures()), "skip-add check")
    return {
        "resdeploy_version": resdeploy.__version__, "started": started,
        "wall_seconds": round(time.perf_counter() - t_run, 2), "passed": passed, "failed_gate": failed,
        "run_dir": str(run_dir),
        "config": {"model": {"checkpoint": str(CHECKPOINT)},
                   "quantize": {"precisions": ["fp16", "int8"], "int8_backend": "onnxruntime"},
                   "build": {"backends": ["onnxruntime"], "rewrite_option_a": True},
                   "parity": {"backends": ["onnxruntime"], "limit": 200},
                   "bench": {"batches": [1], "max_seconds": 40, "backends": ["onnxruntime"], "anchors": ["eager"]},
                   "repository": {"model_name": "resnet20", "variant": "int8"}},
        "machine": {"cpu": m["cpu_model"], "isa": m["simd"], "cores": os.cpu_count() or 1,
                    "python": platform.python_version(), "versions": versions},
        "model": {"architecture": info.arch, "parameters": int(sum(p.numel() for p in model.parameters())),
                  "data": str(acc.get("data", "mnist")), "data_fingerprint": info.data_fingerprint or "",
                  "accuracy": {"test": acc["test_accuracy"], "val": acc["val_accuracy"]},
                  "labels": list(info.labels), "checkpoint": str(CHECKPOINT)},
        "stages": stages,
        "skipadd": {k: v.to_dict() for k, v in skip.items()},
        "fusion": fusion,
        "parity": parity.to_dict(),
        "bench": bench.to_dict(),
        "bench_plot": "bench/bench.png",
        "artifacts": artifacts,
        "repository": {"path": "model_repository", "model_name": "resnet20"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"where run.json and bench/bench.png go (default {OUT})")
    ap.add_argument("--keep", type=Path, default=None, help="build the run folder here and keep it (default: a temp folder)")
    args = ap.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="resdeploy-fixture-")
    run_dir = (args.keep or Path(tmp.name)).resolve()
    out_dir = args.out.resolve()
    os.chdir(ROOT)
    try:
        summary = generate(run_dir)
        (out_dir / "bench").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "bench" / "bench.png", out_dir / "bench" / "bench.png")
        (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[fixture] wrote {out_dir / 'run.json'} and {out_dir / 'bench' / 'bench.png'} "
              f"({(out_dir / 'bench' / 'bench.png').stat().st_size // 1024} KB); passed={summary['passed']}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
