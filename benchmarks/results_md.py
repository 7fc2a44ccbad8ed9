"""Write benchmarks/RESULTS.md from the result files in benchmarks/results/ (every ``*.json`` below it).

    python3 benchmarks/results_md.py            # rewrite benchmarks/RESULTS.md
    python3 benchmarks/results_md.py --check    # exit 1 when RESULTS.md is not what the result files give

Standard library only, so it runs without the project's venv. For each kind of benchmark (serving vs Triton,
protocol overhead, latency bench, engine choice, zoo networks, ...) it shows the latest run per machine kind (CPU
model and ISA core) and per configuration (model, server CPUs and arguments, ...), each table with its machine,
date and command. Everything is read from the JSON: what a file does not record is written "not recorded", never
filled in. A command is either the one the file records, or rebuilt from the options it records (said so, with
what could not be rebuilt), or "not recorded". Runs that cannot be ordered (several runs of one configuration on
one machine kind, none dated) and older runs are listed at the end with the reason, so every file is accounted for.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUTPUT = ROOT / "RESULTS.md"
NOT_RECORDED = "not recorded"

# (key, section title, what produces it), in the page's order.
KINDS = [
    ("vs-triton", "resdeploy serve vs NVIDIA Triton", "`benchmarks/serve_bench.py --vs-triton` (Triton 2.51 from "
     "nvidia-pytriton, `benchmarks/triton_harness.py`); how to read it: docs/serving.md"),
    ("overhead", "Protocol overhead at batch 1", "`benchmarks/serve_bench.py --overhead-only`"),
    ("bench", "Latency bench (engines and anchors)", "`resdeploy bench`, or the bench stage of `resdeploy run`"),
    ("engine-choice", "Engine choice",
     "`resdeploy build --backend auto`, or the engine-choice stage of `resdeploy run`"),
    ("engine-config", "The served engine configuration against the anchors", "`benchmarks/engine_config.py`"),
    ("zoo", "Zoo networks: short-path check and graph surgery", "`benchmarks/zoo_networks.py` in `.venv-zoo`"),
    ("ab", "A/B runs of two resdeploy checkouts", "`benchmarks/serve_bench.py --vs-triton --ab-against CHECKOUT`"),
    ("experiment", "Serving experiments (not the default settings)", "`benchmarks/serve_bench.py` with a local change"),
    ("stage", "Pipeline stage records", "a stage of `resdeploy run` (`stages/<name>.json`)"),
    ("other", "Other result files", "unknown to this script"),
]


@dataclass
class Run:
    path: str  # relative to benchmarks/results/
    kind: str
    machine_kind: str  # CPU model and ISA core, or "not recorded (...)"
    machine: str  # the fuller line shown above a table
    date: str | None  # ISO 8601 UTC as recorded, or None
    config: str  # what was measured, within its kind and machine kind
    data: dict[str, Any] = field(repr=False, default_factory=dict)


# --------------------------------------------------------------------------------------------------- reading

def kind_of(d: dict[str, Any]) -> str:
    if "runs" in d and "summary" in d:
        return "experiment" if d.get("experiment") else "ab" if d.get("ab_against") else "vs-triton"
    if "overhead" in d:
        return "overhead"
    if d.get("format") == "resdeploy-bench/1":
        return "bench"
    if d.get("format") == "resdeploy-engine-choice/1":
        return "engine-choice"
    if d.get("format") == "resdeploy-engine-config/1":
        return "engine-config"
    if "networks" in d:
        return "zoo"
    if {"name", "status", "summary"} <= d.keys():
        return "stage"
    return "other"


def machine_info(d: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("machine_info", "machine"):
        if isinstance(d.get(key), dict):
            return d[key]
    return None


# serve_bench.machine_line(): "CPU (core, int8 ..., bf16 ...), U of N CPUs usable"
MACHINE_LINE = re.compile(r"^(?P<cpu>.+?) \((?P<core>[^,()]+), int8 [^)]*\), \d+ of \d+ CPUs usable$")


def machine_of(d: dict[str, Any]) -> tuple[str, str]:
    """(machine kind, machine line): the kind is the CPU model and ISA core, each "not recorded" when absent."""
    info = machine_info(d)
    if info is not None:
        cpu = info.get("cpu_model") or NOT_RECORDED
        isa = info.get("isa") or {}
        core = isa.get("core") or "ISA not recorded"
        line = f"{cpu}, {core}"
        if isa.get("int8"):
            line += f" (int8 {isa['int8']}, bf16 {isa.get('bf16', NOT_RECORDED)})"
        cpus = info.get("usable_cpus") or info.get("logical_cpus")
        if cpus:
            line += f", {cpus} CPUs"
        return f"{cpu}, {core}", line
    text = d.get("machine")
    if isinstance(text, str):
        m = MACHINE_LINE.match(text)
        if m:
            return f"{m['cpu']}, {m['core']}", text
        return f"CPU model {NOT_RECORDED} ({text})", f"CPU model {NOT_RECORDED}; the file says: {text}"
    return NOT_RECORDED, f"machine {NOT_RECORDED}"


def date_of(d: dict[str, Any]) -> str | None:
    info = machine_info(d)
    value = (info or {}).get("time_utc") or d.get("time_utc")
    return value if isinstance(value, str) and value else None


def config_of(kind: str, d: dict[str, Any], path: str) -> str:
    if kind == "vs-triton":
        cpus = d.get("server_cpus")
        cpus = "all" if cpus in (None, "all") else ",".join(str(c) for c in cpus)
        args = " ".join(d.get("server_args") or []) or "none"
        return f"{d.get('model', NOT_RECORDED)}, server CPUs {cpus}, server arguments {args}"
    if kind == "overhead":
        return f"ORT threads {d.get('threads', NOT_RECORDED)}"
    if kind == "bench":
        batches = ",".join(str(b) for b in (d.get("config") or {}).get("batches") or [])
        return f"{d.get('model', NOT_RECORDED)}, batch {batches or NOT_RECORDED}"
    if kind == "engine-choice":
        return f"{d.get('model', NOT_RECORDED)}"
    if kind == "engine-config":
        return f"{d.get('model', NOT_RECORDED)}, batch {','.join(str(r.get('batch')) for r in d.get('rows') or [])}"
    if kind == "zoo":
        return "the zoo tier's networks"
    return path  # one-offs: every file is its own configuration


def read_runs(results: Path = RESULTS) -> list[Run]:
    runs = []
    for file in sorted(results.rglob("*.json")):
        rel = file.relative_to(results).as_posix()
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SystemExit(f"results_md: {file} cannot be read as JSON ({exc}); fix or remove it") from None
        if not isinstance(d, dict):
            raise SystemExit(f"results_md: {file} holds a JSON {type(d).__name__}, not an object; fix or remove it")
        kind = kind_of(d)
        machine_kind, machine = machine_of(d)
        runs.append(Run(rel, kind, machine_kind, machine, date_of(d), config_of(kind, d, rel), d))
    return runs


# --------------------------------------------------------------------------------------------------- choosing

def latest_per_machine_kind(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """The latest run of each (kind, machine kind, configuration), and every other run with why it is not shown.

    Dated runs are ordered by their recorded date; an undated run is shown only when it is the only run of its
    group (nothing to order), and never preferred to a dated one.
    """
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.kind, run.machine_kind, run.config), []).append(run)
    chosen: list[Run] = []
    left: list[tuple[Run, str]] = []
    for group in groups.values():
        dated = sorted((r for r in group if r.date), key=lambda r: (r.date, r.path))
        if dated:
            best = dated[-1]
            chosen.append(best)
            left += [(r, f"older than {best.path}" if r.date else f"undated; {best.path} is dated")
                     for r in group if r is not best]
        elif len(group) == 1:
            chosen.append(group[0])
        else:
            left += [(r, f"undated, one of {len(group)} runs of this configuration on this machine kind: "
                         "no latest can be chosen") for r in group]
    order = {k: i for i, (k, _, _) in enumerate(KINDS)}
    chosen.sort(key=lambda r: (order[r.kind], r.machine_kind, r.config))
    left.sort(key=lambda item: (order[item[0].kind], item[0].path))
    return chosen, left


# --------------------------------------------------------------------------------------------------- commands

def serve_bench_command(d: dict[str, Any], kind: str) -> str:
    """The serve_bench command rebuilt from the options the file records, saying which it does not record."""
    if kind == "overhead":
        parts = ["python benchmarks/serve_bench.py --overhead-only", f"--threads {d.get('threads')}"]
        if d.get("preferred"):
            parts.append("--preferred " + " ".join(str(p) for p in d["preferred"]))
        if d.get("max_queue_delay_us"):
            parts.append(f"--max-queue-delay-us {d['max_queue_delay_us']}")
        return f"`{' '.join(parts)}` (rebuilt from the options the file records; `--out` is not recorded)"
    parts = ["python benchmarks/serve_bench.py --vs-triton"]
    if d.get("model") == "resnet50":
        parts.append("--resnet50")
    parts.append(f"--rounds {d.get('rounds')} --seconds {d.get('seconds'):g}")
    if d.get("server_cpus") not in (None, "all"):
        parts.append("--server-cpus " + ",".join(str(c) for c in d["server_cpus"]))
    parts += [f"--server-arg={a}" for a in d.get("server_args") or []]
    if d.get("ab_against"):
        parts.append(f"--ab-against {d['ab_against']}")
    return (f"`{' '.join(parts)}` (rebuilt from the options the file records; `--out`, `--only` and "
            "`--reference-arg` are not recorded)")


def command_of(run: Run) -> str:
    d = run.data
    if isinstance(d.get("command"), str):
        return f"`{d['command']}`"
    if run.kind in ("vs-triton", "ab", "overhead"):
        return serve_bench_command(d, run.kind)
    outputs = d.get("outputs")
    if isinstance(outputs, dict) and isinstance(outputs.get("json"), str):
        return f"{NOT_RECORDED} (the run wrote it as `{outputs['json']}`)"
    return NOT_RECORDED


# --------------------------------------------------------------------------------------------------- tables

def num(value: Any, fmt: str = ".2f") -> str:
    """A number formatted, or "—" where the file holds none (missing, null, NaN)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return format(value, fmt)


def pair(a: dict[str, Any], b: dict[str, Any], key: str, fmt: str = ".2f") -> str:
    return f"{num(a.get(key), fmt)} / {num(b.get(key), fmt)}"


def vs_table(d: dict[str, Any]) -> list[str]:
    other = "Triton" if any("triton" in s for s in d["summary"].values()) else "reference"
    lines = [f"| case | resdeploy req/s | {other} req/s | req/s ratio | p50 ms (r / o) | p99 ms (r / o) | "
             "server CPU ms/req (r / o) | of which r's event loop | mean batch (r / o) |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | --- |"]
    for case, s in d["summary"].items():
        r, o = s.get("resdeploy", {}), s.get(other.lower(), {})
        ratio = num((s.get("ratio") or {}).get("rps"), ".2f")
        lines.append(f"| {case} | {num(r.get('rps'), '.0f')} | {num(o.get('rps'), '.0f')} | {ratio}x | "
                     f"{pair(r, o, 'p50_ms')} | {pair(r, o, 'p99_ms')} | "
                     f"{pair(r, o, 'server_cpu_ms_per_req', '.3f')} | "
                     f"{num(r.get('main_thread_cpu_ms_per_req'), '.3f')} | {pair(r, o, 'mean_batch', '.1f')} |")
    gain = d.get("batching_gain")
    if isinstance(gain, dict):
        lines += ["", "Dynamic batching gain (HTTP, 16 clients, batched / unbatched req/s, same server): " +
                  ", ".join(f"{k} {num(v)}x" for k, v in gain.items())]
    lines += ["", f"{d.get('rounds', NOT_RECORDED)} interleaved rounds x {d.get('seconds', NOT_RECORDED)} s; "
              f"wrong or failed answers: {d.get('errors', NOT_RECORDED)}."]
    if d.get("experiment"):
        lines += ["", str(d["experiment"])]
    return lines


def overhead_table(d: dict[str, Any]) -> list[str]:
    o = d.get("overhead") or {}
    rows = [("runner p50, batch 1 (ONNX Runtime CPU)", "runner_p50_ms"),
            ("HTTP round trip p50 (http.client, binary tensors)", "roundtrip_p50_ms"),
            ("**HTTP protocol overhead p50** (round trip - runner)", "overhead_p50_ms"),
            ("gRPC round trip p50 (grpc stub, raw_input_contents)", "grpc_roundtrip_p50_ms"),
            ("**gRPC protocol overhead p50**", "overhead_grpc_p50_ms"),
            ("tritonclient.http overhead p50", "overhead_tritonclient_p50_ms"),
            ("tritonclient.grpc overhead p50", "overhead_tritonclient_grpc_p50_ms")]
    lines = ["| metric | ms |", "| --- | ---: |"]
    lines += [f"| {label} | {num(o.get(key), '.3f')} |" for label, key in rows]
    lines += ["", f"Samples each: {o.get('samples_each', NOT_RECORDED)}, in alternating blocks; ONNX Runtime threads: "
              f"{d.get('threads', NOT_RECORDED)}."]
    return lines


def bench_table(d: dict[str, Any]) -> list[str]:
    lines = ["| case | kind | batch | p50 ms | p99 ms | speedup vs eager (p50) | % of peak | parity |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    speedups = d.get("speedup_vs_eager_p50") or {}
    rows = []
    for case in d.get("cases") or []:
        for batch, st in (case.get("stats") or {}).items():
            parity = case.get("parity") or {}
            verdict = "pass" if parity.get("passed") else "FAIL" if parity else NOT_RECORDED
            peak = (case.get("fraction_of_peak") or {}).get(batch)
            rows.append((int(batch), st.get("p50_ms", float("inf")),
                         f"| {case['name']} | {case.get('kind', '')} | {batch} | {num(st.get('p50_ms'), '.3f')} | "
                         f"{num(st.get('p99_ms'), '.3f')} | {num((speedups.get(batch) or {}).get(case['name']))}x | "
                         f"{num(peak * 100 if isinstance(peak, (int, float)) else None, '.1f')} % | {verdict} |"))
    lines += [row for _, _, row in sorted(rows, key=lambda r: (r[0], r[1]))]
    lines += [""] + [f"- {s}" for s in d.get("summary") or []]
    if d.get("data"):
        lines.append(f"- parity sample: {d['data']}")
    return lines


def engine_choice_table(d: dict[str, Any]) -> list[str]:
    batches = d.get("batches") or []
    lines = ["| engine configuration | precision | parity | " + " | ".join(f"p50 ms, batch {b}" for b in batches) + " |",
             "| --- | --- | --- |" + " ---: |" * len(batches)]
    for row in d.get("table") or []:
        p50 = [num((row.get("p50_ms") or {}).get(str(b)), ".3f") for b in batches]
        lines.append(f"| {row.get('name') or row.get('backend')} | {row.get('precision')} | "
                     f"{'pass' if row.get('parity_passed') else 'fail'} | " + " | ".join(p50) + " |")
    chosen = d.get("name") or f"{d.get('backend')} {d.get('precision')}"
    lines += ["", f"Chosen: {chosen}: {d.get('reason', NOT_RECORDED)} ({num(d.get('seconds'), '.1f')} s of timing)."]
    return lines


def engine_config_table(d: dict[str, Any]) -> list[str]:
    lines = ["| batch | served | p50 ms | x eager | % of int8 peak | fastest anchor passing parity | its p50 ms | "
             "served speed / anchor's | target met |", "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in d.get("rows") or []:
        peak = r.get("served_int8_peak")
        lines.append(f"| {r.get('batch')} | {r.get('served')} | {num(r.get('served_p50_ms'), '.3f')} | "
                     f"{num(r.get('speedup_vs_eager'), '.1f')} | "
                     f"{num(peak * 100 if isinstance(peak, (int, float)) else None, '.1f')} % | "
                     f"{r.get('anchor', NOT_RECORDED)} | {num(r.get('anchor_p50_ms'), '.3f')} | "
                     f"{num(r.get('served_speed_vs_anchor'))}x | {'yes' if r.get('met') else 'NO'} |")
    lines += ["", f"ISA: {d.get('isa', NOT_RECORDED)}."]
    return lines


def zoo_table(d: dict[str, Any]) -> list[str]:
    lines = ["| network | pattern | short paths | check | surgeries caught | export s | check s |",
             "| --- | --- | --- | --- | --- | ---: | ---: |"]
    for net in d.get("networks") or []:
        kinds = ", ".join(f"{v} {k}" for k, v in (net.get("kinds") or {}).items()) or "none"
        applicable = [s for s in net.get("surgeries") or [] if s.get("caught") is not None]
        caught = sum(1 for s in applicable if s["caught"])
        verdict = "pass" if net.get("passed") else "FAIL"
        lines.append(f"| {net['network']} | {net.get('pattern', '')} | {kinds} | {verdict} | "
                     f"{caught} of {len(applicable)} | {num(net.get('export_s'), '.1f')} | "
                     f"{num(net.get('check_s'), '.1f')} |")
    versions = ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items())
    lines += ["", f"Versions: {versions or NOT_RECORDED}; whole run {num(d.get('wall_s'), '.0f')} s. A surgery is "
              "caught when the check fails naming the block it was made on (or, for swapped operands, passes)."]
    return lines


def summary_only(d: dict[str, Any]) -> list[str]:
    return [f"{d.get('name', '')}: {d['summary']}" if "summary" in d else "(no summary recorded)"]


TABLES = {"vs-triton": vs_table, "ab": vs_table, "experiment": vs_table, "overhead": overhead_table,
          "bench": bench_table, "engine-choice": engine_choice_table, "engine-config": engine_config_table, "zoo": zoo_table, "stage": summary_only,
          "other": summary_only}


# --------------------------------------------------------------------------------------------------- the page

def load_text(d: dict[str, Any]) -> str:
    """The load average(s) the file records: a start and an end where both are (the bench), else the one there is."""
    info = machine_info(d) or {}

    def fmt(values: Any) -> str | None:
        if not isinstance(values, list) or not values:
            return None
        try:
            return " ".join(f"{float(v):.2f}" for v in values)
        except (TypeError, ValueError):
            return " ".join(str(v) for v in values)

    start, end = fmt(info.get("load_average_start")), fmt(info.get("load_average_end") or d.get("loadavg_at_end"))
    if start and end and start != end:
        return f"load average (1, 5, 15 min) {start} at the start, {end} at the end"
    one = end or start or fmt(d.get("load_average"))
    return f"load average (1, 5, 15 min) {one}" if one else f"load average {NOT_RECORDED}"


def run_section(run: Run) -> list[str]:
    date = run.date.replace("T", " ").replace("Z", " UTC") if run.date else NOT_RECORDED
    md = Path(run.path).with_suffix(".md").as_posix()
    source = f"[`{run.path}`](results/{run.path})"
    if (RESULTS / md).is_file():
        source += f", [`{md}`](results/{md})"
    return [f"#### {run.config}", "",
            f"- machine: {run.machine}; {load_text(run.data)}",
            f"- date: {date}",
            f"- command: {command_of(run)}",
            f"- source: {source}", "", *TABLES[run.kind](run.data), ""]


def render(runs: list[Run]) -> str:
    chosen, left = latest_per_machine_kind(runs)
    lines = ["# Benchmark results", "",
             "Generated by `python3 benchmarks/results_md.py` from `benchmarks/results/**/*.json`: do not edit. "
             "Add a result file and rerun it (`tests/test_results_md.py` fails when this page is stale).", "",
             "Each section shows, per machine kind (CPU model and ISA core) and configuration, the latest run. "
             "Compare numbers only within one table: each was measured in one run on one machine, often on CPUs "
             "shared with other work (the load average says how busy). \"not recorded\" means the result file does "
             "not hold it.", ""]
    for key, title, producer in KINDS:
        mine = [r for r in chosen if r.kind == key]
        if not mine:
            continue
        lines += [f"## {title}", "", f"Produced by {producer}.", ""]
        newest: dict[str, str] = {}
        for r in mine:
            newest[r.machine_kind] = max(newest.get(r.machine_kind, ""), r.date or "")
        # the machine kind measured most recently first; undated ones last
        for machine_kind in sorted(newest, key=lambda m: (newest[m] == "", _descending(newest[m]), m)):
            lines += [f"### Machine: {machine_kind}", ""]
            for run in (r for r in mine if r.machine_kind == machine_kind):
                lines += run_section(run)
    if left:
        lines += ["## Runs not shown above", "", "| file | kind | machine kind | date | why not shown |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| [`{r.path}`](results/{r.path}) | {r.kind} | {r.machine_kind} | {r.date or NOT_RECORDED} | {why} |"
                  for r, why in left]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _descending(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when RESULTS.md differs from what it would write")
    args = ap.parse_args(argv)
    text = render(read_runs())
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run `python3 benchmarks/results_md.py` and commit it", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    tmp = OUTPUT.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(OUTPUT)  # atomic: a reader never sees half a page
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
