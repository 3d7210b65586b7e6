"""Hostile requests against a real Ray Serve app: 4xx with a message, never a 5xx, and a schemathesis
fuzz run generated from the app's own OpenAPI schema (no 5xx, every answer as the schema declares)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pyarrow.parquet as pq
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from ray import serve
from schemathesis import GenerationMode

from raykd.config import ServeConfig
from raykd.serve.app import build_app

KEY = "fuzz-" + "0123456789abcdef" * 2
LIMIT = ServeConfig().max_body_bytes  # the default, 64 KiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tiny_run, tmp_path_factory):
    """Two apps on one Serve: `/` without a key, `/keyed` whose replicas read the key from a file."""
    port = _free_port()
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # max_history 20: no schema-valid body (20 ids of 256 escaped characters) reaches 64 KiB
    serve.run(build_app(str(tiny_run), ServeConfig(max_k=50, max_history=20)), name="raykd", route_prefix="/")
    serve.run(build_app(str(tiny_run), ServeConfig(api_key_file=str(key_file))), name="keyed", route_prefix="/keyed")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(base):
    with httpx.Client(base_url=base, timeout=30) as c:
        yield c


def _ok_4xx(r: httpx.Response, status: int | None = None) -> None:
    assert r.status_code < 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
    if r.status_code >= 400:
        body = r.json()
        assert body.get("error") or body.get("detail"), body


@pytest.mark.parametrize("body, status", [
    ('{"user_id": "--10"}', 404),
    ('{"user_id": "\\ud800"}', 422),
    ('{"history": ["\\ud800"]}', 422),
    ('{"history": ["a\\udfffb", 1]}', 422),
    ('{"\\ud800": 1, "history": [1]}', 422),
    ('{"history": ["' + "7" * 70_000 + '"]}', 413),  # over max_body_bytes
    ('{"history": ["' + "7" * 5000 + '"]}', 422),  # under it, but over the 256-character id bound
    ('{"history": [' + "7" * 4000 + "]}", 422),  # a 4000-digit JSON integer
    ('{"history": [' + "7" * 5000 + "]}", 400),  # beyond the digits Python's JSON parser accepts
    ('{"history": [' + "[" * 30_000 + "]" * 30_000 + "]}", 400),  # nested beyond the JSON parser's depth
    ('{"history": [], "user_id": null}', 422),
    ('{"user_id": 1, "history": null}', 422),
    ('{"history": [NaN, Infinity]}', 422),
    ('{"history": [1], "k": 1e400}', 422),
    ('{"history": [1], "k": 99999999999999999999999999}', 422),
    ('"just a string"', 422),
    ("null", 422),
    ("", 400),
])
def test_hostile_bodies_get_a_4xx_with_a_message(client, body, status):
    _ok_4xx(client.post("/recommend", content=body.encode(), headers={"content-type": "application/json"}), status)


def test_invalid_utf8_and_other_encodings(client):
    _ok_4xx(client.post("/recommend", content=b'{"history": ["\xff\xfe"]}'), 400)
    _ok_4xx(client.post("/recommend", content='{"history": [1]}'.encode("utf-16")), 200)  # JSON allows UTF-16


@pytest.mark.parametrize("raw", ["--5", "²", "０１０１", "٣", " ", "+1", "1e3", "0x10"])
def test_lookalike_ids_are_unknown_items_never_another_item(client, tiny_run, raw):
    r = client.post("/recommend", json={"history": [raw], "k": 3})
    _ok_4xx(r, 200)
    assert r.json()["unknown_items"] == [raw] and r.json()["fallback"] == "popularity"


def test_an_id_with_padding_or_as_text_is_the_same_item(client, tiny_run):
    raw = pq.read_table(tiny_run / "data" / "items.parquet")["raw_id"].to_pylist()[:3]
    answers = [client.post("/recommend", json={"history": h, "k": 5}).json()
               for h in (raw, [str(i) for i in raw], [f" {i}\t" for i in raw])]
    assert answers[0]["unknown_items"] == [] and answers[0] == answers[1] == answers[2]


def test_a_chunked_body_is_cut_at_max_body_bytes(client):
    def chunks(total):
        yield b'{"history": ['
        for _ in range(total // 2):
            yield b"1,"
        yield b"1]}"

    _ok_4xx(client.post("/recommend", content=chunks(20)), 200)  # chunked and small: answered
    _ok_4xx(client.post("/recommend", content=chunks(10 * LIMIT)), 413)


def _raw_exchange(base: str, head: bytes, body_parts: list[bytes], wait_s: float = 20) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        deadline, got = time.monotonic() + wait_s, b""
        while b"\r\n\r\n" not in got and time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            got += data
        return got


def test_an_endless_chunked_body_is_refused_before_it_ends(base):
    """The body is read as a stream: 413 arrives while the client is still sending (no final chunk)."""
    head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"1," * 4096
    parts = [b'%x\r\n{"history": [\r\n' % len(b'{"history": [')] + [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 12
    assert _raw_exchange(base, head, parts).startswith(b"HTTP/1.1 413")


def test_a_declared_huge_content_length_is_refused_at_once(base):
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n"
    assert _raw_exchange(base, head, [b'{"history"'])[:12] in (b"HTTP/1.1 413", b"HTTP/1.1 400")
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    assert _raw_exchange(base, head, [b'{"history"']).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("authorization, status", [
    (None, 401), ("", 401), (KEY, 401), (f"Basic {KEY}", 401), ("Bearer", 401), ("Bearer wrong", 401),
    (f"Bearer {KEY}{KEY}", 401), (b"Bearer \xff\xfe", 401), ("Bearer " + "x" * 4000, 401),
    (f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"BEARER {KEY}", 200),
])
def test_auth_schemes_on_a_keyed_app(client, authorization, status):
    headers = {} if authorization is None else {"Authorization": authorization}
    r = client.post("/keyed/recommend", json={"history": [1], "k": 2}, headers=headers)
    _ok_4xx(r, status)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    _ok_4xx(client.get("/keyed/model", headers=headers), status)


def test_unknown_paths_and_methods_are_4xx(client):
    for method, path in [("GET", "/recommend"), ("PUT", "/recommend"), ("DELETE", "/model"),
                         ("GET", "/nope"), ("POST", "/recommend/../../etc/passwd"), ("GET", "/%ff%fe"),
                         ("POST", "/recommend?k=%ff&history=\u00e9")]:
        r = client.request(method, path, content=b'{"history": [1]}')
        assert 200 <= r.status_code < 500, (method, path, r.status_code)
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------- fuzzing from the schema


@pytest.fixture(scope="module")
def api_schema(base):
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_from_the_openapi_schema(api_schema, mode):
    """Requests generated from /openapi.json, valid and invalid: no 5xx, and every answer as declared."""

    @given(case=api_schema.as_strategy(mode))
    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case):
        case.call_and_validate()

    call()


def test_the_schema_declares_answers_and_errors(client):
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/recommend"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "422"} <= set(responses)
    ok = responses["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/RecommendResponse"}
    assert json.dumps(spec)  # the whole schema encodes
