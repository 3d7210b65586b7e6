"""POST /recommend/batch on real Ray Serve, serving a moved bundle: order, per-entry errors, limits, auth."""

from __future__ import annotations

import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.parquet as pq
import pytest
from ray import serve

from raykd import cli
from raykd.config import ServeConfig
from raykd.serve.app import build_app
from raykd.serve.recommender import Recommender

KEY = "batch-" + "0123456789abcdef" * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    """The tiny run's student exported with histories, then moved away from the run."""
    made = tmp_path_factory.mktemp("made") / "bundle"
    assert cli.main(["export", str(tiny_run), "--out", str(made), "--with-histories"]) == 0
    where = tmp_path_factory.mktemp("served") / "bundle"
    shutil.move(made, where)
    return where


@pytest.fixture(scope="module")
def client(bundle, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(bundle), ServeConfig(max_k=50, max_history=200, api_key_file=str(key_file))),
              name="batch", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c
    serve.shutdown()


@pytest.fixture(scope="module")
def users(tiny_run) -> list:
    return pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()


def test_answers_in_order_and_a_bad_entry_gets_its_own_error(client, users, bundle):
    raw_items = [None, *pq.read_table(bundle / "items.parquet")["raw_id"].to_pylist()]
    good = [{"user_id": users[0], "k": 5}, {"history": [raw_items[3], raw_items[9], "no-such-item"], "k": 3},
            {"user_id": users[7], "k": 4, "exclude_seen": False}]
    bad = [({"history": [raw_items[1]], "k": 0}, 422), ({"user_id": "nobody-at-all"}, 404), ("not a body", 422),
           ({"history": [1], "surprise": True}, 422), ({"history": [1], "k": 51}, 422)]
    entries = [good[0], good[1], *(b for b, _ in bad), good[2]]
    r = client.post("/recommend/batch", json={"requests": entries})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(entries)
    for entry, result in zip(entries, results):
        alone = client.post("/recommend", json=entry)
        if alone.status_code == 200:
            assert result == alone.json()  # the same answer as /recommend gives this body alone
        else:
            assert result == {"error": alone.json()["error"], "status": alone.status_code}
    assert [r.get("status") for r in results[2:7]] == [s for _, s in bad]
    assert results[1]["unknown_items"] == ["no-such-item"]


def test_concurrent_batches_each_get_their_own_answers(client, users, bundle):
    rec = Recommender(bundle)
    batches = [[{"user_id": u, "k": 5} for u in users[i:i + 64]] for i in range(0, 256, 32)]

    def ask(batch):
        return client.post("/recommend/batch", json={"requests": batch}).json()["results"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, batches))
    for batch, results in zip(batches, answers):
        assert results == rec.recommend_batch(batch)


def test_over_the_limit_or_malformed_batches_are_refused_whole(client, users):
    spec = client.get("/openapi.json").json()
    limit = spec["paths"]["/recommend/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["requests"]["maxItems"]
    assert client.get("/model").json()["limits"]["max_batch_users"] == limit
    r = client.post("/recommend/batch", json={"requests": [{"user_id": users[0], "k": 1}] * (limit + 1)})
    assert r.status_code in (413, 422) and f"at most {limit} per batch" in r.json()["error"]
    assert client.post("/recommend/batch", json={"requests": [{"user_id": users[0], "k": 1}] * limit}).status_code == 200
    for body, status in [(b"{nope", 400), (b"[1]", 422), (b"{}", 422), (b'{"requests": []}', 422),
                         (b'{"requests": {"user_id": 1}}', 422), (b'{"requests": [], "k": 3}', 422),
                         (b'{"requests": [{"history": [' + b"1," * 40_000 + b"1]}]}", 413)]:
        r = client.post("/recommend/batch", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"], (body[:40], r.text)


def test_the_key_is_required(client, users):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-key"}):
        r = client.post("/recommend/batch", json={"requests": [{"user_id": users[0]}]}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_the_openapi_schema_declares_the_batch_endpoint(client):
    op = client.get("/openapi.json").json()["paths"]["/recommend/batch"]["post"]
    assert {"200", "400", "401", "413", "422"} <= set(op["responses"])
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BatchResponse"}


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_from_the_openapi_schema(client, mode):
    """Bodies generated from the deployment's own schema, valid and invalid: no 5xx, every answer as declared."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(str(client.base_url.join("/openapi.json"))).include(path="/recommend/batch")
    strategy = schema.as_strategy(GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE)

    @given(case=strategy)
    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})

    call()
