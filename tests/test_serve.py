"""Real Ray Serve on the tiny trained student: answers, bad requests, batching, the config file."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from raykd.config import ServeConfig
from raykd.core import models
from raykd.serve.app import app_builder, build_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tiny_run):
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(tiny_run), ServeConfig(max_k=50, max_history=200, max_body_bytes=4096)),
              name="raykd", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client
    serve.shutdown()


def offline_top_k(run_dir: Path, history_idx: list[int], k: int) -> list[int]:
    """The student's own top-k for a history of item indices, seen items excluded."""
    model, desc = models.load_model(run_dir / "student")
    padded = models.left_pad([np.asarray(history_idx)], desc["max_len"])
    with torch.no_grad():
        scores = model.last_scores(padded)[0].float()
    scores[0] = -torch.inf
    scores[torch.as_tensor(history_idx)] = -torch.inf
    return torch.topk(scores, k).indices.tolist()


def vocab(run_dir: Path) -> list:
    return [None, *pq.read_table(run_dir / "data" / "items.parquet")["raw_id"].to_pylist()]


def test_history_request_matches_offline_top_k(endpoint, tiny_run):
    raw = vocab(tiny_run)
    history = [5, 9, 2, 7]
    r = endpoint.post("/recommend", json={"history": [raw[i] for i in history], "k": 10})
    assert r.status_code == 200
    body = r.json()
    assert body["items"] == [raw[i] for i in offline_top_k(tiny_run, history, 10)]
    assert body["scores"] == sorted(body["scores"], reverse=True) and body["unknown_items"] == []
    assert all(isinstance(i, int) for i in body["items"])  # raw ids keep their input type


def test_user_id_request_uses_known_history(endpoint, tiny_run):
    seqs = pq.read_table(tiny_run / "data" / "sequences" / "part-00000.parquet").slice(0, 1).to_pylist()[0]
    user_raw = pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()[seqs["user"]]
    history = seqs["train"] + [seqs["valid"], seqs["test"]]
    r = endpoint.post("/recommend", json={"user_id": user_raw, "k": 5})
    assert r.status_code == 200
    assert r.json()["items"] == [vocab(tiny_run)[i] for i in offline_top_k(tiny_run, history, 5)]


def test_unknown_items_listed_and_empty_history_falls_back(endpoint, tiny_run):
    r = endpoint.post("/recommend", json={"history": ["no-such-item", 10**9], "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["unknown_items"] == ["no-such-item", 10**9] and body["fallback"] == "popularity"
    counts = pq.read_table(tiny_run / "data" / "items.parquet")["count"].to_numpy()
    assert body["scores"] == sorted(counts.tolist(), reverse=True)[:3]


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 422),
    (b'{"k": 5}', 422),  # neither history nor user_id
    (b'{"history": [1], "user_id": 1}', 422),
    (b'{"history": "1,2"}', 422),
    (b'{"history": [1.5]}', 422),
    (b'{"history": [1], "k": 0}', 422),
    (b'{"history": [1], "k": 51}', 422),  # above max_k
    (b'{"history": [1], "k": "5"}', 422),
    (b'{"history": [1], "surprise": true}', 422),
    (b'{"history": [' + b"1," * 250 + b'1]}', 422),  # longer than max_history
    (b'{"user_id": "nobody-at-all"}', 404),
    (b'{"history": [' + b"1," * 3000 + b'1]}', 413),  # body over max_body_bytes
])
def test_bad_requests_get_4xx_with_a_message(endpoint, body, status):
    r = endpoint.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert endpoint.get("/healthz").status_code == 200  # the replica survived


def test_concurrent_requests_each_get_their_own_answer(endpoint, tiny_run):
    raw = vocab(tiny_run)
    histories = [[i, i + 1, i + 2] for i in range(1, 41)]

    def ask(h):
        return endpoint.post("/recommend", json={"history": [raw[i] for i in h], "k": 5}).json()["items"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, histories))
    for h, items in zip(histories, answers):
        assert items == [raw[i] for i in offline_top_k(tiny_run, h, 5)]


def test_model_and_openapi_endpoints(endpoint):
    info = endpoint.get("/model").json()
    assert info["params"] > 0 and info["items"] > 0 and info["limits"]["max_k"] == 50
    assert "/recommend" in endpoint.get("/openapi.json").json()["paths"]


def test_serve_config_file_is_valid_and_deploys(endpoint, tiny_run, tmp_path):
    spec = yaml.safe_load(Path("configs/serve.yaml").read_text())
    ServeDeploySchema.model_validate(spec)  # Ray's own schema for `serve deploy`
    (tmp_path / "key").write_text("sesame-sesame-sesame\n")  # a mounted secret, read by each replica
    args = {**spec["applications"][0]["args"], "path": str(tiny_run), "api_key_file": str(tmp_path / "key")}
    serve.run(app_builder(args), name="from_config", route_prefix="/cfg")  # beside the first app
    try:
        assert endpoint.post("/cfg/recommend", json={"history": [1], "k": 2}).status_code == 401
        for scheme in ("Bearer", "bearer"):
            ok = endpoint.post("/cfg/recommend", json={"history": [1], "k": 2},
                               headers={"Authorization": f"{scheme} sesame-sesame-sesame"})
            assert ok.status_code == 200 and len(ok.json()["items"]) == 2
        docs = endpoint.get("/cfg/openapi.json").json()
        assert docs["servers"] == [{"url": "/cfg"}] and "/recommend" in docs["paths"]
        assert endpoint.get("/cfg/docs").status_code == 200
    finally:
        serve.delete("from_config")


def test_a_killed_replica_is_replaced_and_the_endpoint_recovers(endpoint, tiny_run):
    """SIGKILL the replica process: Serve's controller starts a new one and answers resume."""
    import os
    import signal
    import time

    import ray

    def replica_pids() -> set[int]:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::raykd#recommender")]
        pids = set()
        for name in names:
            try:
                pids.add(ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()),
                                 timeout=30))
            except (ray.exceptions.RayError, ValueError):  # dead or going away
                pass
        return pids

    old = replica_pids()
    assert len(old) == 1, old
    killed = old.pop()
    os.kill(killed, signal.SIGKILL)
    deadline, answered = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        try:
            r = endpoint.post("/recommend", json={"history": [1, 2], "k": 3}, timeout=5)
            if r.status_code == 200:
                answered = r.json()
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert answered is not None and len(answered["items"]) == 3
    user = pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()[0]
    assert endpoint.post("/recommend", json={"user_id": user, "k": 3}).status_code == 200  # histories mapped again
    new = replica_pids()
    assert len(new) == 1 and killed not in new  # a new replica process answers


def test_the_app_puts_the_histories_in_the_object_store_once(endpoint, tiny_run):
    """build_app reads the histories once; a replica maps that copy zero-copy (read-only arrays)."""
    import ray

    from raykd.core import histories
    from raykd.serve.app import shared_histories

    app = build_app(str(tiny_run), ServeConfig())
    shared = app._bound_deployment.init_args[-1]
    assert isinstance(shared, list) and isinstance(shared[0], ray.ObjectRef)
    mapped, read = shared_histories(shared), histories.read(tiny_run / "data")
    assert not mapped.ids.keys.flags.writeable and not mapped.values.flags.writeable  # views of the shared object
    assert list(mapped) == list(read) and all(np.array_equal(mapped.get(u), read.get(u)) for u in read)


def test_a_replica_that_cannot_get_the_shared_histories_reads_its_own(ray_session, capsys):
    """An object that cannot be fetched (its owner gone, as a `serve deploy` build task is): warn, read our own."""
    import ray

    from raykd.serve.app import shared_histories

    @ray.remote(num_cpus=0)
    def lost():
        raise RuntimeError("the owner of the histories died")

    assert shared_histories([lost.remote()]) is None
    assert "the shared histories are gone (RayTaskError" in capsys.readouterr().err
    assert shared_histories(None) is None
