"""Reliability of export and serving: stale models, overwrites, limits, durable and consistent reads, NaN.

Each test builds its own small run directory from the tiny run's artifacts (conftest.copy_parts),
so nothing here changes the shared run other tests read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import copy_parts
from safetensors.torch import load_file, save_file

from raykd import cli
from raykd.core import rundir
from raykd.core.errors import RaykdError
from raykd.serve.recommender import BadRequest, Recommender, request_schema

MODEL_FILES = ("model.safetensors", "model.json", "metrics.json", "manifest.json")


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A run directory of its own holding the tiny run's data/, teacher/ and student/."""
    root = tmp_path / "run"
    root.mkdir()
    copy_parts(tiny_run, root, "data", "teacher", "student")
    return root


def prepare_anew(run: Path) -> str:
    """Re-prepare data/ with another item order (as a changed input would): returns the new digest."""
    items = pq.read_table(run / "data" / "items.parquet")
    raw = items["raw_id"].to_pylist()[::-1]
    pq.write_table(items.set_column(items.schema.get_field_index("raw_id"), "raw_id",
                                    pa.array(raw, items.schema.field("raw_id").type)), run / "data" / "items.parquet")
    manifest = rundir.read_manifest(run / "data")
    manifest["vocab_digest"] = rundir.vocab_digest(raw)
    (run / "data" / "manifest.json").write_text(json.dumps(manifest))
    return manifest["vocab_digest"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- 1. a stale model is never bundled


def test_export_refuses_a_model_trained_on_another_vocabulary(run, tmp_path, capsys):
    old = rundir.read_manifest(run / "student")["vocab_digest"]
    new = prepare_anew(run)
    code = cli.main(["export", str(run), "--model", str(run / "student"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "b").exists()
    assert old in err and new in err and "raykd distill CONFIG" in err


def test_a_bundle_keeps_the_vocabulary_digest_and_serving_checks_it(run, tmp_path):
    out = tmp_path / "b"
    assert cli.main(["export", str(run), "--model", str(run / "student"), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_digest"] == rundir.read_manifest(run / "student")["vocab_digest"]
    Recommender(out)  # its own vocabulary: served
    items = pq.read_table(out / "items.parquet")  # a bundle whose vocabulary was swapped afterwards
    swapped = items.set_column(items.schema.get_field_index("raw_id"), "raw_id",
                               pa.array(items["raw_id"].to_pylist()[::-1], items.schema.field("raw_id").type))
    pq.write_table(swapped, out / "items.parquet")
    with pytest.raises(RaykdError, match="another item vocabulary"):
        Recommender(out)


# ---------------------------------------------------------------- 6. --overwrite replaces bundles only


@pytest.mark.parametrize("model, part", [("student", "teacher"), ("teacher", "student")])
def test_overwrite_never_replaces_a_runs_own_artifact(run, capsys, model, part):
    before = {p.name: sha(p) for p in (run / part).iterdir() if p.is_file()}
    code = cli.main(["export", str(run), "--model", str(run / model), "--out", str(run / part), "--overwrite"])
    assert code == 1 and "not a raykd bundle" in capsys.readouterr().err
    assert {p.name: sha(p) for p in (run / part).iterdir() if p.is_file()} == before


def test_overwrite_replaces_a_bundle(run, tmp_path):
    out = tmp_path / "b"
    assert cli.main(["export", str(run), "--model", str(run / "student"), "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "bundle"
    assert cli.main(["export", str(run), "--model", str(run / "teacher"), "--out", str(out), "--overwrite"]) == 0
    assert sha(out / "model.safetensors") == sha(run / "teacher" / "model.safetensors")


# ---------------------------------------------------------------- 7. the default k follows serve.max_k


def test_default_k_is_at_most_max_k(tiny_run):
    rec = Recommender(tiny_run, max_k=5)
    hist = [rec.raw_item(i) for i in (3, 4)]
    assert rec.parse({"history": hist})[2] == 5
    assert Recommender(tiny_run, max_k=50).parse({"history": hist})[2] == 10
    with pytest.raises(BadRequest):
        rec.parse({"history": hist, "k": 6})
    k = request_schema(max_k=5)["properties"]["k"]
    assert k["default"] == 5 and k["maximum"] == 5
    assert request_schema(max_k=50)["properties"]["k"]["default"] == 10


# ---------------------------------------------------------------- 9. durable JSON


def test_write_json_durable_fsyncs_and_leaves_no_temporary(tmp_path, fsynced):
    rundir.write_json_durable(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert any(Path(p).name.startswith(".x.json") for p in fsynced) and str(tmp_path) in fsynced


def test_export_writes_the_bundle_durably(run, tmp_path, fsynced):
    assert cli.main(["export", str(run), "--model", str(run / "student"), "--out", str(tmp_path / "b")]) == 0
    names = {Path(p).name for p in fsynced}
    assert any(n.startswith(".manifest.json") for n in names)
    assert {"model.safetensors", "model.json", "items.parquet", "README.md"} <= names


# ---------------------------------------------------------------- 11. consistent reads, one version


PUBLISHER = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    from raykd.core import rundir
    root, source = Path(sys.argv[1]), Path(sys.argv[2])
    for line in sys.stdin:  # one new model per "go": the writer's own lock and atomic publication
        with rundir.lock(root, "publisher"), rundir.staged(root / "student") as tmp:
            for f in source.iterdir():
                shutil.copy2(f, tmp / f.name)
        print("done", flush=True)
""")


def other_model(run: Path, dest: Path) -> Path:
    """A second version of the student: other weights, fingerprint and metrics, the same vocabulary."""
    shutil.copytree(run / "student", dest)
    tensors = {k: v * 1.5 for k, v in load_file(str(dest / "model.safetensors")).items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    desc = json.loads((dest / "model.json").read_text())
    (dest / "model.json").write_text(json.dumps({**desc, "fingerprint": "version-b"}))
    (dest / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": 0.123}, "best_epoch": 99}))
    return dest


@pytest.fixture
def publish_mid_read(run, tmp_path, monkeypatch):
    """Publish a new student (in a real subprocess) right after the reader first opens a model.json.

    Yields (version A's copy, version B's folder, fired). Any reader qualifies (open, io.open or
    os.open, with or without dir_fd): the hook looks at the file name only.
    """
    a = shutil.copytree(run / "student", tmp_path / "version_a")
    b = other_model(run, tmp_path / "version_b")
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(run), str(b)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    fired = []

    def after_open(name, reading: bool) -> None:
        if reading and not fired and Path(os.fsdecode(name)).name == "model.json":
            fired.append(1)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"

    real_open, real_os_open = io.open, os.open

    def hooked_open(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        if isinstance(file, str | bytes | os.PathLike):
            after_open(file, "r" in mode and "+" not in mode)
        return f

    def hooked_os_open(path, flags, *args, **kw):
        fd = real_os_open(path, flags, *args, **kw)
        after_open(path, not flags & (os.O_WRONLY | os.O_RDWR))
        return fd

    monkeypatch.setattr("builtins.open", hooked_open)
    monkeypatch.setattr(io, "open", hooked_open)
    monkeypatch.setattr(os, "open", hooked_os_open)
    yield a, b, fired
    monkeypatch.undo()
    proc.stdin.close()
    proc.wait(timeout=60)


def test_an_export_racing_a_publication_bundles_one_model(run, tmp_path, publish_mid_read):
    a, b, fired = publish_mid_read
    out = tmp_path / "bundle"
    code = cli.main(["export", str(run), "--model", str(run / "student"), "--out", str(out)])
    assert fired and code == 0  # the new model was published mid-read
    got = {n: sha(out / n) for n in MODEL_FILES[:3]}
    assert got in ({n: sha(a / n) for n in MODEL_FILES[:3]}, {n: sha(b / n) for n in MODEL_FILES[:3]}), \
        "the bundle mixes two models"


def test_a_recommender_racing_a_publication_loads_one_model(run, publish_mid_read):
    a, b, fired = publish_mid_read
    rec = Recommender(run / "student")
    assert fired
    source = b if rec.desc.get("fingerprint") == "version-b" else a
    assert rec.describe()["metrics"]["best_epoch"] == json.loads((source / "metrics.json").read_text())["best_epoch"]
    weights = load_file(str(source / "model.safetensors"))
    assert all(torch.equal(rec.model.state_dict()[k], v) for k, v in weights.items()), "weights of the other model"


def test_replicas_refuse_a_model_other_than_the_one_the_app_was_built_for(run, tmp_path):
    from raykd.config import ServeConfig
    from raykd.serve.app import build_app
    from raykd.serve.recommender import model_digest

    digest = model_digest(run / "student")
    app = build_app(str(run / "student"), ServeConfig())
    assert digest in app._bound_deployment.init_args  # resolved once in the driver, given to every replica
    Recommender(run / "student", model_digest=digest)
    other = other_model(run, tmp_path / "version_b")
    rundir.publish(other, run / "student")
    with pytest.raises(RaykdError, match="changed since the app was built"):
        Recommender(run / "student", model_digest=digest)


# ---------------------------------------------------------------- 10 and 13: NaN metrics and NaN scores


NAN_ITEMS = list(range(90, 111))  # items whose embedding the corruption hits


@pytest.fixture
def corrupt(run) -> Path:
    """The student with NaN embeddings for NAN_ITEMS and NaN in its metrics.json."""
    path = run / "student"
    tensors = load_file(str(path / "model.safetensors"))
    tensors["item_emb.weight"][NAN_ITEMS] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "metrics.json").write_text('{"valid": {"ndcg@10": NaN, "hr@10": Infinity}, "best_epoch": 2}')
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_read_with_the_weights_and_nan_is_null(corrupt):
    rec = Recommender(corrupt)
    (corrupt / "metrics.json").write_text('{"valid": {"ndcg@10": 0.9}, "best_epoch": 7}')  # a later model's
    info = rec.describe()
    json.dumps(info, allow_nan=False)
    assert info["metrics"] == {"valid": {"ndcg@10": None, "hr@10": None}, "best_epoch": 2}


def test_nan_scores_rank_last_and_a_wholly_nan_history_is_an_error(corrupt):
    rec = Recommender(corrupt)
    clean = [rec.raw_item(i) for i in (3, 9, 2)]
    nan_raw = {rec.raw_item(i) for i in NAN_ITEMS}
    k = rec.desc["num_items"] - len(clean) - len(NAN_ITEMS)  # every item the model scores
    (one,) = rec.recommend_many([rec.parse({"history": clean, "k": k})])
    assert len(one["items"]) == k and not nan_raw & set(one["items"])
    json.dumps(one, allow_nan=False)
    results = rec.recommend_batch([{"history": clean, "k": 100}, {"history": clean, "k": 3}])
    assert all(not nan_raw & set(r["items"]) for r in results) and len(results[1]["items"]) == 3
    with pytest.raises(RaykdError, match=f"model {rec.model_id} .* corrupt"):
        rec.recommend_batch([{"history": [clean[0], rec.raw_item(NAN_ITEMS[0])]}])


def test_nan_scores_are_never_recommended_over_http(ray_session, corrupt):
    from ray import serve

    from raykd.config import ServeConfig
    from raykd.serve import build_app

    rec = Recommender(corrupt, max_k=5)
    clean = [rec.raw_item(i) for i in (3, 9, 2)]  # no corrupt item: only the NaN items' scores are NaN
    poisoned = [rec.raw_item(i) for i in (3, NAN_ITEMS[0])]  # a corrupt item in the history: every score NaN
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(corrupt), ServeConfig(max_k=5, max_history=200)), name="corrupt", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            one = client.post("/recommend", json={"history": clean, "k": 5, "exclude_seen": False})
            assert one.status_code == 200, one.text
            assert len(one.json()["items"]) == 5
            assert not {rec.raw_item(i) for i in NAN_ITEMS} & set(one.json()["items"])
            many = client.post("/recommend/batch", json={"requests": [{"history": clean, "k": 5}] * 3})
            assert many.status_code == 200, many.text
            assert all(r["items"] == one.json()["items"] for r in many.json()["results"])
            for path, body in (("/recommend", {"history": poisoned, "k": 5}),
                               ("/recommend/batch", {"requests": [{"history": poisoned, "k": 5}]})):
                bad = client.post(path, json=body)
                assert bad.status_code == 500 and "corrupt" in bad.json()["error"], bad.text
                assert rec.model_id in bad.json()["error"]
            default = client.post("/recommend", json={"history": clean})  # k not given: min(10, max_k)
            assert default.status_code == 200 and len(default.json()["items"]) == 5, default.text
            info = client.get("/model")
            assert info.status_code == 200 and info.json()["metrics"]["valid"]["ndcg@10"] is None
            k = client.get("/openapi.json").json()["paths"]["/recommend"]["post"]["requestBody"]
            assert k["content"]["application/json"]["schema"]["properties"]["k"]["default"] == 5
    finally:
        serve.delete("corrupt")
        serve.shutdown()
