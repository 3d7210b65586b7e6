"""The approximate index (raykd.core.ann): search rules on hand-made tables, bundles, the HTTP path."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import httpx
import numpy as np
import pytest
import torch

from raykd import cli
from raykd.core import ann, rundir, scoring
from raykd.core.errors import RaykdError
from raykd.serve.recommender import Recommender

# padding row 0 would win every query if it were a candidate; items 1..5 score 5, 4, 3, 2, 1 for q = [1, 0]
TABLE = torch.tensor([[100.0, 0.0], [5.0, 0.0], [4.0, 1.0], [3.0, -1.0], [2.0, 0.5], [1.0, 0.0]])
Q = torch.tensor([[1.0, 0.0]])


def test_search_never_returns_padding_or_seen_items():
    index = ann.build(TABLE, "v")
    values, columns = index.search(Q, 3, [np.array([1, 3])])
    assert columns.tolist() == [[2, 4, 5]]
    assert values.tolist() == [[4.0, 2.0, 1.0]]


def test_k_above_the_catalogue_has_blocked_top_k_shapes_and_answers():
    index = ann.build(TABLE, "v")
    seen = [np.array([2]), np.array([], np.int64)]
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = index.search(queries, 50, seen)
    want = scoring.blocked_top_k(scoring.DotScores(queries, TABLE), 50, seen)
    assert got[0].shape == want[0].shape == (2, 6) and got[1].shape == want[1].shape
    assert torch.equal(torch.isinf(got[0]), torch.isinf(want[0]))  # the -inf tail, which callers cut off
    finite = torch.isfinite(want[0])
    assert got[1][finite].tolist() == want[1][finite].tolist() and torch.equal(got[0][finite], want[0][finite])
    assert torch.isfinite(got[0]).sum(1).tolist() == [4, 5]


def test_rerank_ties_go_to_the_lower_item_and_repeats_and_misses_drop():
    table = torch.tensor([[0.0], [1.0], [2.0], [2.0], [0.5]])
    values, columns = ann.rerank(table, torch.tensor([[1.0]]), np.array([[3, -1, 2, 3, 4]]), [np.array([4])], 3)
    # -1 is a miss, 4 is seen, 3 repeats; 2 and 3 tie at 2.0 -> 2 first; nothing left for the third place
    assert columns.tolist() == [[2, 3, 0]] and values[0, :2].tolist() == [2.0, 2.0] and values[0, 2] == -torch.inf


def test_recall_against_a_hand_computed_value():
    found = np.array([[1, 2, 3], [4, 5, 6]])
    truth = np.array([[1, 2, 9], [4, 7, 8]])
    assert ann.recall_at(found, truth) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert ann.recall_at(np.array([[5, 0]]), np.array([[5, 0]])) == 1.0  # 0 (none) is never counted


class Missing:
    """An engine that finds nothing (every id -1), as a graph can for a far-off query."""

    def search(self, q, n, params=None):
        return np.zeros((len(q), n), np.float32), np.full((len(q), n), -1, np.int64)


def test_rows_the_index_answers_short_are_scored_exactly():
    index = ann.Index(Missing(), TABLE, {"ef_search": 8})
    assert index.search(Q, 2, [np.array([1])])[1].tolist() == [[2, 3]]


def test_recall_is_measured_at_build_time_on_a_seeded_sample():
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((401, 8)).astype(np.float32))
    queries = torch.from_numpy(rng.standard_normal((40, 8)).astype(np.float32))
    seen = [rng.integers(1, 401, 5) for _ in range(40)]
    index = ann.build(table, "v", queries, seen)
    assert index.meta["recall_queries"] == 40 and 0.9 <= index.recall <= 1.0
    assert ann.measure_recall(ann.Index(Missing(), table, {"ef_search": 8}), queries, seen) == 1.0  # exact fallback


def test_saved_index_loads_elsewhere_and_refuses_another_table_or_vocabulary(tmp_path):
    ann.build(TABLE, "v").save(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert ann.load(tmp_path / "b", TABLE, "v").search(Q, 2)[1].tolist() == [[1, 2]]
    with pytest.raises(RaykdError, match="another item table"):
        ann.load(tmp_path / "b", TABLE * 2, "v")
    with pytest.raises(RaykdError, match="item vocabulary"):
        ann.load(tmp_path / "b", TABLE, "w")


def test_a_missing_library_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss then raises ImportError
    with pytest.raises(RaykdError, match=r"raykd\[ann\]"):
        ann.build(TABLE, "v")


# ---------------------------------------------------------------- bundles and serving (the tiny run)


@pytest.fixture(scope="module")
def ann_bundle(tiny_run, tmp_path_factory):
    """The tiny run's student exported with --ann and its histories, then moved to another folder."""
    made = tmp_path_factory.mktemp("made") / "b"
    assert cli.main(["export", str(tiny_run), "--out", str(made), "--ann", "--with-histories"]) == 0
    where = tmp_path_factory.mktemp("moved") / "bundle"
    shutil.move(made, where)
    return where


def test_a_moved_bundle_serves_from_its_index_and_reports_recall(ann_bundle, tiny_run):
    from raykd.serve import bundle

    manifest = json.loads((ann_bundle / rundir.MANIFEST).read_text())
    assert bundle.verify(ann_bundle) == [] and "ann/index.faiss" in manifest["files"]
    assert 0.9 <= manifest["ann"]["recall@10"] <= 1.0 and manifest["ann"]["vocab_digest"] == manifest["vocab_digest"]
    assert "## Approximate index" in (ann_bundle / "README.md").read_text()
    rec = Recommender(ann_bundle, ann=True)
    assert rec.ann.meta["table_digest"] == ann.table_digest(rec.model.item_table())  # loaded, not rebuilt
    assert rec.describe()["ann"]["recall@10"] == manifest["ann"]["recall@10"]
    bodies = [{"user_id": u, "k": 10} for u in list(rec.histories)[:50]]
    approx, exact = rec.recommend_batch(bodies), Recommender(tiny_run).recommend_batch(bodies)
    overlap = np.mean([len(set(a["items"]) & set(e["items"])) / 10 for a, e in zip(approx, exact)])
    assert overlap >= 0.9
    for a, body in zip(approx, bodies):  # never an item of the user's history
        assert not set(a["items"]) & {rec.raw_item(i) for i in rec.histories.get(body["user_id"])}


def test_exact_answers_ignore_a_bundled_index(ann_bundle, tiny_run):
    bodies = [{"history": [1, 2, 3], "k": 7}, {"user_id": next(iter(Recommender(tiny_run).histories)), "k": 5}]
    def answers(path):  # the model id names the folder (bundle, student): everything else must be equal
        return [{k: v for k, v in a.items() if k != "model"} for a in Recommender(path).recommend_batch(bodies)]

    assert answers(ann_bundle) == answers(tiny_run)


def test_an_index_of_another_model_or_vocabulary_is_refused(ann_bundle, tiny_run, tmp_path):
    teacher = tmp_path / "teacher"
    assert cli.main(["export", str(tiny_run), "--out", str(teacher), "--model", str(tiny_run / "teacher"),
                     "--ann"]) == 0
    swapped = shutil.copytree(ann_bundle, tmp_path / "swapped")
    shutil.rmtree(swapped / "ann")
    shutil.copytree(teacher / "ann", swapped / "ann")
    with pytest.raises(RaykdError, match="another item table"):
        Recommender(swapped, ann=True)
    meta = json.loads((ann_bundle / "ann" / "ann.json").read_text())
    renamed = shutil.copytree(ann_bundle, tmp_path / "renamed")
    (renamed / "ann" / "ann.json").write_text(json.dumps({**meta, "vocab_digest": "0" * 16}))
    with pytest.raises(RaykdError, match="item vocabulary"):
        Recommender(renamed, ann=True)


def test_a_run_without_a_bundled_index_builds_one(tiny_run):
    rec = Recommender(tiny_run, ann=True)
    assert rec.ann.meta["recall_queries"] > 0 and rec.describe()["ann"]["items"] == len(rec.item_ids)


def test_the_http_path_answers_from_the_index(ann_bundle):
    from ray import serve

    from raykd.config import ServeConfig
    from raykd.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = Recommender(ann_bundle, ann=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(ann_bundle), ServeConfig(ann=True)), name="raykd-ann", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            bodies = [{"user_id": u, "k": 10} for u in list(rec.histories)[:8]] + [{"history": [3, 1, 4], "k": 5}]
            answers = [client.post("/recommend", json=b).json() for b in bodies]
            batch = client.post("/recommend/batch", json={"requests": bodies}).json()["results"]
            model = client.get("/model").json()
    finally:
        serve.shutdown()
    want = rec.recommend_batch(bodies)
    assert answers == want and batch == want
    assert model["ann"]["recall@10"] == rec.ann.recall


def test_an_index_saved_by_a_driver_is_loaded_by_path(ann_bundle, tmp_path):
    shutil.copytree(ann_bundle / "ann", tmp_path / "index")
    rec = Recommender(ann_bundle, ann=tmp_path / "index")
    assert rec.ann.recall == Recommender(ann_bundle, ann=True).ann.recall


def test_a_pq_model_answers_from_its_index_and_exactly(tiny_run, tmp_path):
    # a PQ model's exact scores come from lookup tables (scoring.CodeScores); its index from the table
    from raykd.core import models

    saved = json.loads((tiny_run / "student" / "model.json").read_text())
    desc = {k: saved[k] for k in ("family", "num_items", "dim", "layers", "heads", "max_len", "dropout")}
    desc["item_table"] = {"kind": "pq", "codes": 2, "codebook": 16, "assign": "svd"}
    torch.manual_seed(0)
    model = models.build_model(desc).eval()
    model.item_emb.set_codes(np.random.default_rng(0).integers(0, 16, (desc["num_items"], 2)))
    models.save_model(tmp_path / "pq", model, desc)
    exact = Recommender(tmp_path / "pq", data_dir=tiny_run / "data")
    approx_rec = Recommender(tmp_path / "pq", data_dir=tiny_run / "data", ann=True)
    body = {"history": [exact.raw_item(i) for i in (1, 2, 3)], "k": 5}
    want, got = exact.recommend_many([exact.parse(body)])[0], approx_rec.recommend_many([approx_rec.parse(body)])[0]
    assert len(got["items"]) == 5 and not set(got["items"]) & set(body["history"])
    assert approx_rec.describe()["ann"]["recall@10"] >= 0.5
    assert len(set(got["items"]) & set(want["items"])) >= 3
