"""The run report (report.md + report.html) on a real run summary, in a real headless browser, and the CI recipe.

The fixture ``tests/data/run-summary/`` (run.json + bench/bench.png) comes from real stages on the committed
checkpoint: regenerate it with ``PYTHONPATH=$PWD python tests/pipeline/make_report_fixture.py`` when a stage's
``to_dict()`` changes (see that script's docstring).

The browser test opens report.html in Debian's chromium (``apt-get install chromium``). It skips when chromium is
absent, except under CI (``CI=true``), where it fails: ``make test`` installs chromium there (Makefile ``browser``).
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from resdeploy.errors import InputError
from resdeploy.pipeline.report import ReportFiles, render_html, render_markdown, validate_summary, write_report

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "run-summary"
WORKFLOW = ROOT / "examples" / "github-actions" / "resdeploy-gate.yml"
SECTIONS = ("Model card", "Skip-add check", "Engine fusion", "Parity with PyTorch FP32", "Latency", "Stages",
            "Artifacts", "Versions and machine")


@pytest.fixture()
def summary() -> dict[str, Any]:
    return json.loads((FIXTURE / "run.json").read_text())


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run folder holding what the report reads besides run.json: the latency plot."""
    (tmp_path / "bench").mkdir()
    shutil.copyfile(FIXTURE / "bench" / "bench.png", tmp_path / "bench" / "bench.png")
    return tmp_path


def _report(run_dir: Path, summary: dict[str, Any]) -> tuple[str, str]:
    files = write_report(run_dir, summary)
    assert files == ReportFiles(run_dir / "report.md", run_dir / "report.html")
    return files.md.read_text(), files.html.read_text()


def _banner(page: str) -> str:
    return page[page.index('<div class="banner'):page.index("</div>", page.index('<div class="banner'))]


def test_fixture_is_real_and_small(summary: dict[str, Any]) -> None:
    validate_summary(summary)
    assert summary["passed"] and summary["parity"] and summary["bench"]
    assert set(summary["skipadd"]) == {"fp32", "fp16", "int8"}
    assert (FIXTURE / "bench" / "bench.png").stat().st_size < 200_000


def test_sections_in_order_with_the_real_numbers(run_dir: Path, summary: dict[str, Any]) -> None:
    md, page = _report(run_dir, summary)
    for text, heading in ((md, "\n## {}\n"), (page, "<h2>{}</h2>")):
        positions = [text.index("SAFE TO SHIP")] + [text.index(heading.format(s)) for s in SECTIONS]
        assert positions == sorted(positions), "the verdict comes first, then the sections in the documented order"
        m = summary["model"]
        for value in (m["architecture"], f"{m['parameters']:,}", m["data_fingerprint"], "98.50%", summary["machine"]["cpu"],
                      summary["machine"]["versions"]["onnxruntime"], " ".join(summary["machine"]["isa"])):
            assert value in text
        for v in summary["parity"]["variants"]:  # every backend x precision with its own figures
            assert f"{v['metrics']['max_abs']:.2e}" in text
            assert f"{v['metrics']['max_rel']:.2e}" in text
        for rep in summary["skipadd"].values():
            for row in rep["rows"]:
                assert row["node"] in text and f"{row['max_abs_err']:.2e}" in text
        for name, rep in summary["fusion"].items():
            assert name in text
            assert f"{rep['summary']['fused']}/{rep['summary']['residual_adds']} residual Adds fused" in text
        assert "conv_sum" in text and "qlinear_add" in text
        for a in summary["artifacts"]:
            assert a["sha256"] in text and f"{a['bytes']:,}" in text
        for st in summary["stages"]:
            assert st["name"] in text and st["key"][:12] in text
    # the banner's speed line: the fastest engine passing parity at batch 1, with its speedup over eager
    best = min((c for c in summary["bench"]["cases"] if c["kind"] == "engine" and c["parity"]["passed"]),
               key=lambda c: c["stats"]["1"]["p50_ms"])
    speed = f"best engine {best['name']} p50 {best['stats']['1']['p50_ms']:.3f} ms at batch 1, " \
            f"{summary['bench']['speedup_vs_eager_p50']['1'][best['name']]:.2f}x PyTorch eager"
    assert speed in _banner(page) and speed in md.split("## Model card")[0]
    assert 'class="banner pass"' in page


def test_the_banner_names_the_served_engine_configuration(run_dir: Path, summary: dict[str, Any]) -> None:
    """The repository serves the engine choice's configuration; the banner gives its speed, not the bench's fastest
    engine at batch 1, and says which engine was faster there."""
    s = copy.deepcopy(summary)
    engines = sorted((c for c in s["bench"]["cases"] if c["kind"] == "engine" and c["parity"]["passed"]),
                     key=lambda c: c["stats"]["1"]["p50_ms"])
    assert len(engines) >= 2
    served, fastest = engines[-1], engines[0]
    served["served"] = True
    s["repository"]["served"] = {"backend": served["backend"], "precision": served["precision"], "settings": {},
                                 "name": served["name"], "chosen_by": "measurement"}
    s["engine_choice"] = {"backend": served["backend"], "precision": served["precision"], "name": served["name"],
                          "settings": {"spinning": True}, "batches": [1, 8], "weights": [0.25, 0.75],
                          "reason": "lowest score", "table": [],
                          "winners": {"1": {"engine": fastest["name"], "p50_ms": 0.25, "chosen_p50_ms": 0.5,
                                            "chosen_ratio": 2.0},
                                      "8": {"engine": served["name"], "p50_ms": 1.5, "runner_up": fastest["name"],
                                            "runner_up_ratio": 1.3}}}
    md, page = _report(run_dir, s)
    speed = (f"served engine {served['name']} p50 {served['stats']['1']['p50_ms']:.3f} ms at batch 1, "
             f"{s['bench']['speedup_vs_eager_p50']['1'][served['name']]:.2f}x PyTorch eager; {fastest['name']} measured "
             f"{fastest['stats']['1']['p50_ms']:.3f} ms")
    assert speed in html.unescape(_banner(page)) and speed in md.split("## Model card")[0]
    assert "best engine" not in md.split("## Model card")[0]
    for text in (md, html.unescape(page)):
        assert (f"batch 1: {fastest['name']} is fastest, p50 0.250 ms; the chosen {served['name']} is 2.00x slower "
                "there (0.500 ms)") in text
        assert f"batch 8: the chosen {served['name']} is fastest, p50 1.500 ms; next {fastest['name']} is 1.30x slower" in text
        assert "weights b1 0.25, b8 0.75 ([engines] choice_weights)" in text
        assert f'resdeploy serve runs it with {served["name"]}, settings {{}}' in text


def test_html_is_self_contained(run_dir: Path, summary: dict[str, Any]) -> None:
    from PIL import Image as PILImage

    _, page = _report(run_dir, summary)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*(["'])(?!data:|#)""", page), "only data URIs and in-page anchors"
    assert "url(" not in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 1
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data == (FIXTURE / "bench" / "bench.png").read_bytes()
        with PILImage.open(io.BytesIO(data)) as im:
            im.verify()
            assert im.format == "PNG"
    assert "![latency and throughput against batch size](bench/bench.png)" in (run_dir / "report.md").read_text()


def _fail_int8(summary: dict[str, Any]) -> dict[str, Any]:
    s = copy.deepcopy(summary)
    v = next(v for v in s["parity"]["variants"] if v["precision"] == "int8")
    v["gates"][0].update(value=2.5, passed=False)
    v["passed"] = False
    s["parity"]["passed"] = False
    s["parity"]["failures"] = ["FAILED: onnxruntime int8: accuracy_drop_points 2.50 points (limit <= 1.00 points)"]
    s["passed"], s["failed_gate"] = False, "parity onnxruntime int8: accuracy_drop_points 2.50 > 1.00"
    return s


def test_failed_gate_is_in_the_banner(run_dir: Path, summary: dict[str, Any]) -> None:
    md, page = _report(run_dir, _fail_int8(summary))
    banner = _banner(page)
    assert 'class="banner fail"' in page and "NOT SAFE TO SHIP" in banner and "SAFE TO SHIP: " not in banner.replace("NOT SAFE", "")
    assert "failed the gate parity onnxruntime int8: accuracy_drop_points 2.50 &gt; 1.00" in banner
    assert "parity onnxruntime int8: FAILED" in banner  # the failing gate's chip
    head = md.split("## Model card")[0]
    assert "NOT SAFE TO SHIP" in head and "accuracy_drop_points 2.50 > 1.00" in head and "✗ FAILED" in head
    assert page.startswith("<!DOCTYPE html>") and "<title>FAIL: resnet20" in page


def test_missing_sections_say_so(run_dir: Path, summary: dict[str, Any]) -> None:
    s = dict(summary, bench=None, bench_plot=None, parity=None, fusion=None, repository=None, config=None)
    del s["skipadd"]  # absent behaves like null
    md, page = _report(run_dir, s)
    for text in (md, page):
        assert "speed: not measured (bench skipped)" in text
        assert "Latency was not measured: the bench was skipped in this run." in text
        assert "Parity did not run in this run" in text
        assert "The skip-add check did not run in this run." in text
        assert "No engine was built in this run" in text
        assert "No model repository was written in this run." in text
    assert "<img" not in page


def test_tensorrt_fusion_report_renders(run_dir: Path, summary: dict[str, Any]) -> None:
    """A GPU run's engines: tensorrt_fusion.FusionReport.to_dict() beside the ONNX Runtime ones."""
    from resdeploy.engines.tensorrt_fusion import AddFusion, FusionReport

    adds = (AddFusion("node_add_40", "layer1.0.conv2 + add + relu", "CaskConvolution", "fused", "conv2", "branch",
                      dtype="Int8", kind="identity", block="layer1.0"),
            AddFusion("node_add_168", "add_168", "ElementWise", "standalone", kind="option_a", block="layer2.0",
                      warning="runs as its own layer"))
    trt = FusionReport("model.plan.layers.json", "detailed", True, 31, 2, {"Int8": 29, "Float": 2}, adds)
    s = copy.deepcopy(summary)
    s["fusion"]["tensorrt-int8"] = trt.to_dict()
    md, page = _report(run_dir, s)
    for text in (md, page):
        assert "tensorrt-int8: 1/2 residual Adds fused" in text
        assert "layer1.0.conv2 + add + relu" in text and "CaskConvolution" in text
        assert "31 engine layers (2 reformat); by output dtype: Float 2, Int8 29" in text
        assert "node_add_168: runs as its own layer" in text


def test_missing_or_foreign_plot_is_reported_not_inlined(tmp_path: Path, summary: dict[str, Any]) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes((FIXTURE / "bench" / "bench.png").read_bytes())
    run = tmp_path / "run"
    run.mkdir()
    _, page = _report(run, summary)  # bench/bench.png is not in this run folder
    assert "latency plot bench/bench.png: missing from the run folder" in page and "<img" not in page
    _, page = _report(run, dict(summary, bench_plot="../secret.png"))
    assert "is outside the run folder, not inlined" in page and "<img" not in page


def test_text_is_escaped(run_dir: Path, summary: dict[str, Any]) -> None:
    s = copy.deepcopy(summary)
    s["model"]["labels"] = ["<script>alert(1)</script>", "a|b"] + s["model"]["labels"][2:]
    s["stages"][0]["summary"] = '<img src=x onerror="alert(2)"> & done'
    md, page = _report(run_dir, s)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; &amp; done" in page
    assert "<script>" not in md and "&lt;script>alert(1)&lt;/script>" in md
    assert "a\\|b" in md  # a pipe must not split a markdown table cell
    assert "<= 0.0001" in md  # comparison signs stay readable in markdown


@pytest.mark.parametrize(("mutate", "named"), [
    (lambda s: s.pop("passed"), "summary.passed is missing"),
    (lambda s: s.pop("artifacts"), "summary.artifacts is missing"),
    (lambda s: s["model"]["accuracy"].pop("test"), "summary.model.accuracy.test is missing"),
    (lambda s: s["machine"].pop("isa"), "summary.machine.isa is missing"),
    (lambda s: s["stages"][2].pop("seconds"), "summary.stages[2].seconds is missing"),
    (lambda s: s["artifacts"][0].pop("sha256"), "summary.artifacts[0].sha256 is missing"),
    (lambda s: s["bench"].pop("config"), "summary.bench.config is missing"),
    (lambda s: s["skipadd"]["int8"].pop("rows"), "summary.skipadd.int8.rows is missing"),
    (lambda s: s.update(passed="yes"), "summary.passed must be true/false"),
    (lambda s: s["model"].update(parameters=True), "summary.model.parameters must be an integer"),
    (lambda s: s["stages"][0].update(status="done"), "summary.stages[0].status is 'done'; use one of ran, cached"),
])
def test_bad_summary_names_the_key(tmp_path: Path, summary: dict[str, Any], mutate: Any, named: str) -> None:
    mutate(summary)
    with pytest.raises(InputError, match=re.escape(named)):
        write_report(tmp_path, summary)
    assert not list(tmp_path.iterdir()), "a bad summary writes nothing"
    with pytest.raises(InputError):
        render_markdown(summary, tmp_path)
    with pytest.raises(InputError):
        render_html(summary, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# a real browser
# ---------------------------------------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    msg = "chromium is not installed (Debian: apt-get install -y chromium); the report's browser test needs it"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + "; under CI=true `make test` installs it (Makefile target `browser`)")
    pytest.skip(msg)


def _browse(browser: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--enable-logging=stderr", "--v=0", "--window-size=1280,4000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# Added to a copy of the page only (the report itself has no script): after load, record in the DOM what only a
# browser knows: images that failed to decode, script errors, and whether the layout is wider than the window.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const b = document.body;
  b.setAttribute('data-images', document.images.length);
  b.setAttribute('data-broken-images', broken);
  b.setAttribute('data-errors', window.__errors.join(' | '));
  b.setAttribute('data-overflow', document.documentElement.scrollWidth - window.innerWidth);
  b.setAttribute('data-tables', document.querySelectorAll('table').length);
  b.setAttribute('data-banner', getComputedStyle(document.querySelector('.banner')).backgroundColor);
});
</script>"""


def test_report_renders_in_headless_chromium(run_dir: Path, summary: dict[str, Any]) -> None:
    from PIL import Image as PILImage

    browser = _chromium()
    files = write_report(run_dir, summary)
    page = files.html.read_text()
    # 1. the report as written: the DOM chromium builds holds every table, and loading it logs no console error
    #    (a blocked external request would log a Content-Security-Policy refusal)
    dom = _browse(browser, files.html.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    expected_tables = page.count("<table")
    assert dom.stdout.count("<table") == expected_tables >= 8
    assert "SAFE TO SHIP" in dom.stdout and 'src="data:image/png;base64,' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Refused to" in line or "Uncaught" in line]
    assert not console, console
    # 2. a probed copy: no broken image, no script error, nothing wider than the window
    probed = run_dir / "probed.html"
    probed.write_text(page.replace("default-src 'none'", "default-src 'none'; script-src 'unsafe-inline'")
                      .replace("</body>", PROBE + "</body>"))
    out = _browse(browser, probed.as_uri(), "--dump-dom", "--virtual-time-budget=5000")
    assert out.returncode == 0, out.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, out.stdout[:2000]
    attrs = dict(re.findall(r'(data-[\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-images") == "1" and attrs["data-broken-images"] == "0", attrs
    assert attrs["data-errors"] == "", attrs
    assert int(attrs["data-overflow"]) <= 0, f"the page is wider than a 1280 px window: {attrs}"
    assert attrs["data-tables"] == str(expected_tables)
    assert attrs["data-banner"] == "rgb(218, 251, 225)", "the pass banner's green background applies"
    # 3. a screenshot: rendered (not blank), with the banner's green at the top
    shot = run_dir / "report.png"
    res = _browse(browser, files.html.as_uri(), f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with PILImage.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1280, 4000)
        top = im.crop((0, 0, 1280, 300))
        assert (218, 251, 225) in {c for _, c in top.getcolors(1 << 20)}, "no pass banner at the top of the page"
        assert len(im.crop((0, 0, 1280, 2000)).getcolors(1 << 20)) > 50, "the page looks blank"
    keep = os.environ.get("RESDEPLOY_REPORT_SCREENSHOT")
    if keep:  # e.g. for a CI artifact or a look by eye
        shutil.copyfile(shot, keep)


# ---------------------------------------------------------------------------------------------------------
# the CI recipe for users
# ---------------------------------------------------------------------------------------------------------
def _strip_heredocs(script: str) -> str:
    out, end = [], None
    for line in script.splitlines():
        if end is not None:
            if line.strip() == end:
                end = None
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            end = m.group(1)
        out.append(line)
    return "\n".join(out)


def resdeploy_invocations(script: str) -> list[list[str]]:
    """Each command of a shell script that runs ``resdeploy``: its arguments after the program name."""
    script = _strip_heredocs(script).replace("\\\n", " ")
    found = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        tokens = list(lex)
        for i, tok in enumerate(tokens):
            starts = i == 0 or tokens[i - 1] in ("&&", "||", ";", "|", "(", "then", "do", "!", "time")
            if starts and (tok == "resdeploy" or tok.endswith("/resdeploy")):
                found.append(tokens[i + 1:])
    return found


def test_resdeploy_invocations_parser() -> None:
    assert resdeploy_invocations("pip install resdeploy\nresdeploy run a.toml && .venv/bin/resdeploy check x # c") == [
        ["run", "a.toml", "&&", ".venv/bin/resdeploy", "check", "x"], ["check", "x"]]
    assert resdeploy_invocations("python - <<'EOF'\nresdeploy run\nEOF\necho") == []


def test_github_actions_workflow_parses_and_calls_real_subcommands() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the workflow")
    from resdeploy.pipeline.cli import COMMANDS

    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert {"push", "pull_request"} <= set(on)
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = job["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout@") for u in uses)
    py = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(py["with"]["python-version"]) == "3.11"
    runs = [s["run"] for s in steps if "run" in s]
    assert any("--index-url https://download.pytorch.org/whl/cpu" in r and "torch" in r for r in runs)
    calls = [c for r in runs for c in resdeploy_invocations(r)]
    allowed = set(COMMANDS) | {"run"}
    subcommands = [c[0] for c in calls if c and not c[0].startswith("-")]
    assert "run" in subcommands
    for c in calls:
        assert c and (c[0] in allowed or c[0] in ("--version", "--help", "-h")), f"`resdeploy {' '.join(c)}`: no such subcommand"
    # the gate step fails the job on exit 1; the report is uploaded even then
    gate = next(i for i, s in enumerate(steps) if "run" in s and any(c[:1] == ["run"] for c in resdeploy_invocations(s["run"])))
    assert "continue-on-error" not in steps[gate]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload.get("if") == "always()" and steps.index(upload) > gate
    for name in ("report.html", "report.md", "run.json"):
        assert name in upload["with"]["path"]


def test_int8_search_and_engine_choice_render(run_dir: Path, summary: dict[str, Any]) -> None:
    """The INT8 search's steps and the engine choice's timed table, from a real run (resnet50 at 224x224)."""
    extra = json.loads((FIXTURE / "resnet50-search-and-choice.json").read_text())
    s = dict(summary, int8_search=extra["int8_search"], engine_choice=extra["engine_choice"])
    validate_summary(s)
    md, page = _report(run_dir, s)
    for text, heading in ((md, "\n## {}\n"), (page, "<h2>{}</h2>")):
        order = [text.index(heading.format(h)) for h in ("Skip-add check", "INT8 search", "Engine fusion",
                                                          "Parity with PyTorch FP32", "Engine choice", "Latency")]
        assert order == sorted(order)
        for st in extra["int8_search"]["steps"]:
            assert st["action"] in text and f"{100 * st['accuracy']:.2f}%" in text
        assert "fails gate" in text and "fails skip-add" in text and "PASS" in text
        assert "passed with entropy calibration, every region INT8" in text
        choice = extra["engine_choice"]
        assert f"Served: {choice['backend']} {choice['precision']}" in text and choice["reason"] in text
        for t in choice["table"]:
            assert f"{t['p50_ms']['1']:.3f}" in text and f"{t['min_ms']['1']:.3f}" in text
    s["int8_search"]["kept_float"] = [{"region": "layer4.0", "nodes": ["conv_a", "conv_b"], "why": "first divergent block"}]
    md, _ = _report(run_dir, s)
    assert "layer4.0 kept in float (2 nodes): first divergent block" in md
    s["int8_search"]["passed"] = False
    md, _ = _report(run_dir, s)
    assert "Search FAILED" in md


def test_int8_search_and_engine_choice_absent_say_so(run_dir: Path, summary: dict[str, Any]) -> None:
    md, page = _report(run_dir, dict(summary, int8_search=None, engine_choice=None))
    for text in (md, page):
        assert "No INT8 search ran in this run" in text and "No engine was chosen by measurement in this run" in text
