"""raykd export: a bundle that loads alone after a move, and graphs that rank as the model does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raykd import cli
from raykd.core import models, sequences
from raykd.core.errors import RaykdError
from raykd.serve import bundle
from raykd.serve.recommender import Recommender


def export(run_dir, out, *flags) -> None:
    assert cli.main(["export", str(run_dir), "--out", str(out), *flags]) == 0


def moved(run_dir, tmp_path, *flags):
    """Export, then move the bundle to another folder (nothing of the run beside it)."""
    export(run_dir, tmp_path / "made" / "bundle", *flags)
    shutil.move(tmp_path / "made" / "bundle", tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "made")
    return tmp_path / "elsewhere"


def known_histories(run_dir, limit: int = 300) -> tuple[list, list[np.ndarray]]:
    """(raw user ids, whole known histories) of the first `limit` prepared users."""
    split = sequences.read_split(run_dir / "data")
    raw = pq.read_table(run_dir / "data" / "users.parquet")["raw_id"].to_pylist()
    rows = range(min(limit, len(split["user"])))
    return ([raw[split["user"][r]] for r in rows],
            [np.concatenate([split["train"][r], [split["valid"][r], split["test"][r]]]) for r in rows])


def graph_top10(scores: np.ndarray, histories: list[np.ndarray]) -> list[list[int]]:
    """Top 10 of exported scores, padding and seen items excluded, as a user of the graph would take it."""
    scores = torch.as_tensor(scores).clone()
    scores[:, 0] = -torch.inf
    for row, h in enumerate(histories):
        scores[row, torch.as_tensor(h)] = -torch.inf
    return torch.topk(scores, 10).indices.tolist()


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_a_moved_bundle_is_served_alone_with_the_same_answers(tiny_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    where = moved(tiny_run, tmp_path, "--format", fmt, "--with-histories")
    manifest = json.loads((where / "manifest.json").read_text())
    assert manifest["format"] == fmt and bundle.verify(where) == []
    if fmt != "safetensors":
        assert (where / bundle.GRAPH_FILES[fmt]).exists() and manifest["parity"]["checked"]
    card = (where / "README.md").read_text()
    for part in ("## Data", "## Test metrics", "| **student** |", "student_nokd", "## Distillation", "alpha 0.5",
                 "config hash", "Ray 2.", "torch "):
        assert part in card, part
    here, there = Recommender(tiny_run), Recommender(where)
    users, _ = known_histories(tiny_run, 40)
    bodies = [{"user_id": u, "k": 10} for u in users] + [{"history": [here.raw_item(i) for i in (3, 9, 2)], "k": 7}]
    ours = here.recommend_many([here.parse(b) for b in bodies])
    theirs = there.recommend_many([there.parse(b) for b in bodies])
    assert [(a["items"], a["scores"]) for a in ours] == [(a["items"], a["scores"]) for a in theirs]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_graphs_give_the_models_top10(tiny_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    where = moved(tiny_run, tmp_path, "--format", fmt)
    users, histories = known_histories(tiny_run)
    assert len(users) >= 250
    padded = models.left_pad(histories, json.loads((where / "model.json").read_text())["max_len"])
    got = graph_top10(bundle.run_graph(where / bundle.GRAPH_FILES[fmt], fmt, padded), histories)
    rec = Recommender(tiny_run)
    expected = rec.recommend_many([rec.parse({"user_id": u, "k": 10}) for u in users])
    assert got == [[rec.item_of(i) for i in a["items"]] for a in expected]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_gru_student_exports_too(tiny_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    desc = {**json.loads((tiny_run / "student" / "model.json").read_text()), "family": "gru", "layers": 2}
    torch.manual_seed(0)
    models.save_model(tmp_path / "gru", models.build_model(desc), desc)
    where = tmp_path / "gru_bundle"
    export(tiny_run, where, "--model", str(tmp_path / "gru"), "--format", fmt)
    _, histories = known_histories(tiny_run)
    padded = models.left_pad(histories, desc["max_len"])
    model, _ = models.load_model(tmp_path / "gru")
    with torch.no_grad():
        expected = graph_top10(model.last_scores(padded).numpy(), histories)
    assert graph_top10(bundle.run_graph(where / bundle.GRAPH_FILES[fmt], fmt, padded), histories) == expected


def test_raykd_recommend_runs_on_a_moved_bundle(tiny_run, tmp_path):
    where = moved(tiny_run, tmp_path, "--with-histories")
    assert cli.main(["recommend", str(where), "--k", "5", "--out", str(tmp_path / "r.parquet")]) == 0
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    rec = Recommender(tiny_run)
    assert len(rows) == len(rec.histories)
    for row in rows[:50]:
        (a,) = rec.recommend_many([rec.parse({"user_id": row["user_id"], "k": 5})])
        assert (row["items"], row["scores"]) == (a["items"], a["scores"])


def test_the_bundle_folder_is_whole_or_absent(tiny_run, tmp_path, capsys):
    out = tmp_path / "b"
    export(tiny_run, out)
    assert cli.main(["export", str(tiny_run), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    export(tiny_run, out, "--overwrite", "--with-histories")  # a bundle is replaced
    assert (out / "users.parquet").exists() and bundle.verify(out) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli.main(["export", str(tiny_run), "--out", str(tmp_path / "mine"), "--overwrite"]) == 1
    assert "not a raykd bundle" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (out / "items.parquet").unlink()
    with pytest.raises(RaykdError, match="incomplete: items.parquet missing"):
        Recommender(out)


def test_a_copied_model_folder_alone_says_what_to_do(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "student", tmp_path / "student")
    with pytest.raises(RaykdError, match="raykd export RUN_DIR --out DIR"):
        Recommender(tmp_path / "student")
