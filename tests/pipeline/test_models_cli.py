"""`resdeploy models`: every architecture with its residual blocks and its short paths of every kind."""

from __future__ import annotations

import json

from resdeploy.pipeline.cli import main


def _rows(capsys) -> dict[str, dict]:
    assert main(["models", "--json"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_models_lists_short_paths_of_every_family(capsys) -> None:
    rows = _rows(capsys)
    # Counts from the papers: ResNet-50 has 3+4+6+3 bottlenecks, DenseNet-121 6+12+24+16 dense layers.
    assert rows["resnet50"]["short_paths"] == {"add": 16}
    assert rows["resnet50"]["residual_blocks"] == 16
    assert rows["densenet121"]["short_paths"] == {"concat": 58}
    assert rows["densenet121"]["residual_blocks"] == 0
    assert rows["sd_resnet20"]["short_paths"] == {"scaled_add": 9}
    assert set(rows["highway"]["short_paths"]) == {"gated_add"}
    assert set(rows["fractalnet"]["short_paths"]) == {"mean_join"}
    assert rows["plain20"]["short_paths"] == {} and rows["vgg9"]["short_paths"] == {}


def test_models_table_shows_the_short_paths_column(capsys, monkeypatch) -> None:
    import resdeploy.models

    monkeypatch.setattr(resdeploy.models, "list_models", lambda: ["densenet121", "plain20"])  # the whole zoo is slow
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "short paths" in lines[0]
    dense = next(line for line in lines if line.startswith("densenet121 "))
    assert "58 concat" in dense
    plain = next(line for line in lines if line.startswith("plain20 "))
    assert "concat" not in plain and " add" not in plain
