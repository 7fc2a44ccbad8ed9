"""benchmarks/RESULTS.md is what `python3 benchmarks/results_md.py` makes of benchmarks/results/ (so it cannot go
stale), and the page shows the latest run per machine kind, never a date, machine or command a file lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import results_md  # noqa: E402


def test_committed_results_md_is_what_the_result_files_give() -> None:
    committed = results_md.OUTPUT.read_text(encoding="utf-8")
    assert results_md.render(results_md.read_runs()) == committed, (
        "benchmarks/RESULTS.md is stale: run `python3 benchmarks/results_md.py` and commit it")


def test_check_mode_runs_with_the_system_python_and_agrees() -> None:
    """The script is stdlib only (it runs with no site-packages at all), and --check says up to date."""
    r = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "benchmarks" / "results_md.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout


def vs_triton(machine_time: str | None, model: str = "resnet20", cpu: str = "Intel(R) Xeon(R) Processor",
              core: str | None = "Intel Xeon with AMX (Sapphire Rapids or later)", rps: float = 100.0) -> dict:
    isa = {"core": core, "int8": "AMX int8", "bf16": "AMX bf16"} if core else {}
    info = {"cpu_model": cpu, "usable_cpus": 2, "isa": isa}
    if machine_time:
        info["time_utc"] = machine_time
    case = {"resdeploy": {"rps": rps, "p50_ms": 1.0}, "triton": {"rps": 50.0, "p50_ms": 2.0},
            "ratio": {"rps": rps / 50}}
    return {"runs": {}, "summary": {"HTTP, 1 client": case}, "machine": "line", "machine_info": info,
            "server_cpus": "all", "rounds": 3, "seconds": 5.0, "loadavg_at_end": ["1.00", "0.50", "0.25"],
            "server_args": [], "model": model, "ab_against": None, "errors": 0}


def write(folder: Path, name: str, data: dict) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_latest_run_per_machine_kind_and_configuration(tmp_path: Path) -> None:
    write(tmp_path, "vs-triton/xeon-old.json", vs_triton("2026-12-01T10:00:00Z", rps=111))
    write(tmp_path, "vs-triton/xeon-new.json", vs_triton("2026-12-06T10:00:00Z", rps=222))
    # another configuration on the same machine kind, and another machine kind
    write(tmp_path, "vs-triton/xeon-r50.json", vs_triton("2026-12-02T10:00:00Z", model="resnet50"))
    write(tmp_path, "vs-triton/zen-old.json", vs_triton("2026-11-01T10:00:00Z", cpu="AMD EPYC", core="AMD Zen 4"))
    write(tmp_path, "vs-triton/zen-undated.json", vs_triton(None, cpu="AMD EPYC", core="AMD Zen 4", rps=444))
    runs = results_md.read_runs(tmp_path)
    chosen, left = results_md.latest_per_machine_kind(runs)
    assert sorted(r.path for r in chosen) == ["vs-triton/xeon-new.json", "vs-triton/xeon-r50.json",
                                              "vs-triton/zen-old.json"]
    why = {r.path: reason for r, reason in left}
    assert why == {"vs-triton/xeon-old.json": "older than vs-triton/xeon-new.json",
                   "vs-triton/zen-undated.json": "undated; vs-triton/zen-old.json is dated"}


def test_undated_runs_are_shown_alone_and_never_ordered_by_guess(tmp_path: Path) -> None:
    write(tmp_path, "a.json", vs_triton(None, cpu="", core=None))
    write(tmp_path, "b.json", vs_triton(None, cpu="", core=None))
    write(tmp_path, "c.json", vs_triton(None, model="resnet50", cpu="", core=None))
    chosen, left = results_md.latest_per_machine_kind(results_md.read_runs(tmp_path))
    assert [r.path for r in chosen] == ["c.json"]  # the only run of its configuration
    assert sorted(r.path for r, _ in left) == ["a.json", "b.json"]
    assert all("no latest can be chosen" in reason for _, reason in left)


def test_the_page_says_not_recorded_instead_of_inventing(tmp_path: Path) -> None:
    undated = vs_triton(None, cpu="", core=None)
    undated["machine"] = "vm, 2 CPUs, x86_64"
    del undated["machine_info"]
    write(tmp_path, "vs-triton/old.json", undated)
    zoo_machine = "AMD EPYC (AMD Zen 5, int8 AVX-512 VNNI, bf16 AVX-512 BF16), 2 of 2 CPUs usable"
    write(tmp_path, "zoo.json", {"machine": zoo_machine, "load_average": [1.0, 1.0, 1.0], "versions": {},
                                 "wall_s": 3.0, "networks": []})
    runs = results_md.read_runs(tmp_path)
    page = results_md.render(runs)
    assert "- date: not recorded" in page
    assert "CPU model not recorded; the file says: vm, 2 CPUs, x86_64" in page
    assert "### Machine: AMD EPYC, AMD Zen 5" in page  # parsed from the machine line, not guessed
    zoo = next(r for r in runs if r.kind == "zoo")
    assert results_md.command_of(zoo) == "not recorded"
    vs = next(r for r in runs if r.kind == "vs-triton")
    assert results_md.command_of(vs).startswith("`python benchmarks/serve_bench.py --vs-triton --rounds 3 --seconds 5`")
    assert "rebuilt from the options the file records" in results_md.command_of(vs)


def test_a_recorded_command_is_used_verbatim(tmp_path: Path) -> None:
    data = vs_triton("2026-12-06T10:00:00Z")
    data["command"] = "python benchmarks/serve_bench.py --vs-triton --out runs/x --only gRPC"
    write(tmp_path, "x.json", data)
    (run,) = results_md.read_runs(tmp_path)
    assert results_md.command_of(run) == "`python benchmarks/serve_bench.py --vs-triton --out runs/x --only gRPC`"


def test_a_broken_result_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SystemExit, match="bad.json cannot be read as JSON"):
        results_md.read_runs(tmp_path)
