"""A PQ student end to end: distilled on Ray (teacher codes, teacher-free twin), evaluated with its
honest size, exported as TorchScript and ONNX bundles that rank as the run's own model does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raykd import cli
from raykd.core import models
from raykd.serve import bundle
from raykd.serve.recommender import Recommender
from tests.conftest import tiny_config
from tests.test_export import known_histories

PQ = "distill.model.item_table={kind: pq, codes: 2, codebook: 16, assign: teacher}"


def top10_ties_low(scores: np.ndarray, histories: list[np.ndarray]) -> list[list[int]]:
    """Top 10 of exported scores, padding and seen items excluded, equal scores to the lower index."""
    scores = np.array(scores, dtype=np.float64)
    scores[:, 0] = -np.inf
    for row, h in enumerate(histories):
        scores[row, h] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :10].tolist()


@pytest.fixture(scope="module")
def pq_run(ray_session, tmp_path_factory):
    """The tiny pipeline with a PQ student whose codes come from the teacher (distill.transfer on), and a
    KD curve of a 3-code PQ pair beside a dense width-4 pair."""
    from raykd.stages import pipeline

    run_dir = tmp_path_factory.mktemp("pq_run")
    pipeline.run(tiny_config(run_dir, PQ, "distill.transfer=true", "distill.sizes=[pq3, 4]"))
    return run_dir


def test_the_pq_student_distils_with_teacher_codes_and_its_twin_gets_teacher_free_ones(pq_run):
    student = json.loads((pq_run / "student" / "model.json").read_text())
    twin = json.loads((pq_run / "student_nokd" / "model.json").read_text())
    assert student["item_table"] == {"kind": "pq", "codes": 2, "codebook": 16, "assign": "teacher"}
    assert twin["item_table"]["assign"] == "svd"  # no teacher reaches the baseline through its codes
    weights = load_file(str(pq_run / "student" / "model.safetensors"))
    codes = weights["item_emb.codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (student["num_items"] + 1, 2)
    assert len(torch.unique(codes[1:, 0])) > 1  # assigned, not the all-zero placeholder
    assert not torch.equal(codes, load_file(str(pq_run / "student_nokd" / "model.safetensors"))["item_emb.codes"])
    # honest size, by hand: 16·8 codebook floats + (V + 1)·2 code bytes + SASRec 8×1 (positions 20·8 = 160,
    # block 2·8 + 8·24 + 24 + 8·8 + 8 + 2·8 + 2·(8·8 + 8) = 464, final norm 16: 640); V = 118 items here
    codes_n = (student["num_items"] + 1) * 2
    report = json.loads((pq_run / "report.json").read_text())
    assert student["num_items"] == 118 and report["student"]["params"] == student["params"] == 128 + codes_n + 640
    assert report["student"]["bytes"] == student["bytes"] == (128 + 640) * 4 + codes_n
    assert report["student"]["ndcg@10"] > report["popularity"]["ndcg@10"] * 0.5  # it learned something


def test_the_kd_curve_shows_pq_and_dense_students_on_one_size_axis(pq_run):
    report = json.loads((pq_run / "report.json").read_text())
    pq3, d4 = report["kd_curve"]
    assert (pq3["size"], pq3["table"], pq3["dim"], d4["size"], d4["table"], d4["dim"]) == ("pq3", "pq", 8, "d4", "dense", 4)
    # pq3 at width 8: 16·8 codebook floats + (V + 1)·3 code bytes + the 640 of the 8×1 SASRec
    assert pq3["params"] == 128 + (118 + 1) * 3 + 640 and pq3["bytes"] == (128 + 640) * 4 + (118 + 1) * 3
    twin = json.loads((pq_run / "kd_curve" / "pq3" / "student_nokd" / "model.json").read_text())
    assert twin["item_table"]["assign"] == "svd" and twin["item_table"]["codes"] == 3
    assert (pq_run / "kd_curve.png").stat().st_size > 1000
    assert "| pq3 |" in (pq_run / "report.md").read_text()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_pq_student_bundle_ranks_as_the_run_does(pq_run, tmp_path, fmt):
    where = tmp_path / "bundle"
    assert cli.main(["export", str(pq_run), "--out", str(where), "--format", fmt]) == 0
    assert bundle.verify(where) == [] and json.loads((where / "manifest.json").read_text())["parity"]["checked"]
    assert "item_emb.codes" in load_file(str(where / "model.safetensors"))  # the codes travel in the bundle
    users, histories = known_histories(pq_run)
    padded = models.left_pad(histories, json.loads((where / "model.json").read_text())["max_len"])
    # few codewords: items with the same codes score exactly alike, so rank them as raykd does (ties to
    # the lower index, core.scoring) rather than in torch.topk's arbitrary order
    got = top10_ties_low(bundle.run_graph(where / bundle.GRAPH_FILES[fmt], fmt, padded), histories)
    rec = Recommender(pq_run)
    expected = rec.recommend_many([rec.parse({"user_id": u, "k": 10}) for u in users])
    assert got == [[rec.item_of(i) for i in a["items"]] for a in expected]
    there = Recommender(where)  # the moved bundle serves the same answers, vocabulary check included
    body = {"history": [rec.raw_item(i) for i in (3, 9, 2)], "k": 7}
    (a,), (b,) = there.recommend_many([there.parse(body)]), rec.recommend_many([rec.parse(body)])
    assert (a["items"], a["scores"]) == (b["items"], b["scores"])
