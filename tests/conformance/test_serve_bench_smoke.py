"""The side-by-side benchmark's smoke run (`benchmarks/serve_bench.py --smoke`): it runs against resdeploy serve and the
real Triton, over HTTP and gRPC, and every answer it got was right (status and output size). Never a speed threshold.

Real Triton is mandatory in CI (the ``triton_install`` fixture fails there and skips elsewhere, with the reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_bench_runs_and_every_answer_is_right(triton_install, resnet20_onnx, tmp_path):
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RESDEPLOY_TRITON_CACHE": str(triton_install.venv.parent)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--smoke", "--out", str(out),
                        "--onnx", str(resnet20_onnx)], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "vs_triton.json").read_text())
    assert res["errors"] == 0
    assert set(res["summary"]) == {"HTTP, 4 clients", "gRPC, 4 clients"}
    for label, row in res["summary"].items():
        for server in ("resdeploy", "triton"):
            assert row[server]["errors"] == 0, (label, server, res["runs"][label][server])
            assert row[server]["ok"] > 0, (label, server)
            # both servers' statistics answered: each execution ran 1..max_batch_size (32) samples
            assert 1.0 <= row[server]["mean_batch"] <= 32.0, (label, server, row[server]["mean_batch"])
    assert "| HTTP, 4 clients |" in (out / "vs_triton.md").read_text()
