"""Auth that fails closed, the key kept secret, the id rule, and ids matched by their own vocabulary.

Ray-free: configs, the CLI, the Serve application builder (without deploying), the Recommender on
a tiny servable folder written here, and external teacher scores on prepared files written here.
"""

from __future__ import annotations

import hmac
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raykd import cli
from raykd.config import ServeConfig, auth, load_config
from raykd.core import ids, models, rundir
from raykd.core.errors import RaykdError
from raykd.data import teacher_scores
from raykd.serve import app as raykd_serve
from raykd.serve.recommender import BadRequest, Recommender
from raykd.stages import prepare

KEY = "k3y-" + "s3cr3t" * 5


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    monkeypatch.delenv(auth.API_KEY_FILE_ENV, raising=False)


# ------------------------------------------------------------------------------ auth fails closed

@pytest.mark.parametrize("host", ["0.0.0.0", "'::'", "10.1.2.3", "example.com", "'[::]'"])
def test_exposed_host_without_a_key_is_refused_by_the_config(host):
    with pytest.raises(RaykdError, match=r"serve: .*reachable from other machines.*RAYKD_API_KEY"):
        load_config(None, [f"serve.host={host}"])


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.9", "localhost", "::1"])
def test_loopback_needs_no_key(host):
    assert load_config(None, [f"serve.host={host}"]).serve.api_key is None


def test_exposed_host_with_a_key_from_env_file_or_config(monkeypatch, tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    assert load_config(None, ["serve.host=0.0.0.0", f"serve.api_key_file={tmp_path / 'key'}"])
    cfg = load_config(None, ["serve.host=0.0.0.0", f"serve.api_key={KEY}"])
    assert KEY not in repr(cfg) and KEY not in str(cfg.serve)  # a SecretStr: never in logs
    monkeypatch.setenv(auth.API_KEY_ENV, KEY)
    assert load_config(None, ["serve.host=0.0.0.0"]).serve.host == "0.0.0.0"


def test_cli_refuses_an_exposed_bind_without_a_key_and_a_key_on_its_command_line(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 1
    assert "reachable from other machines" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), f"serve.api_key={KEY}"]) == 1
    err = capsys.readouterr().err
    assert "RAYKD_API_KEY" in err and KEY not in err


def test_job_entrypoint_refuses_a_key_on_its_command_line():
    out = subprocess.run([sys.executable, "jobs/serve.py", "--config", "configs/quickstart.yaml",
                          f"serve.api_key={KEY}"], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "RAYKD_API_KEY" in out.stderr and KEY not in out.stderr + out.stdout


def _unchecked(**changes) -> ServeConfig:
    """Settings that skipped validation (as a Serve config file's args could reach the builder)."""
    return ServeConfig.model_construct(**{**ServeConfig().model_dump(), **changes})


@pytest.fixture
def student_here(tmp_path, monkeypatch):
    """A folder `student/` in the working directory: the builder resolves and digests the model it serves."""
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model.json").write_text("{}")
    monkeypatch.chdir(tmp_path)


def test_builder_refuses_an_exposed_bind_without_a_key(monkeypatch, student_here):
    with pytest.raises(RaykdError, match="reachable from other machines"):
        raykd_serve.build_app("student", _unchecked(host="0.0.0.0"))
    with pytest.raises(ValueError, match="reachable from other machines"):
        raykd_serve.app_builder({"path": "student", "host": "0.0.0.0"})
    with pytest.raises(RaykdError, match="api_key in a Serve config file"):
        raykd_serve.app_builder({"path": "student", "api_key": KEY})
    # the builder also checks where Serve's proxy really listens (a Serve config's http_options)
    monkeypatch.setattr(raykd_serve, "_proxy_host", lambda: "0.0.0.0")
    with pytest.raises(RaykdError, match="Serve's HTTP proxy host=0.0.0.0"):
        raykd_serve.build_app("student", ServeConfig())
    monkeypatch.setenv(auth.API_KEY_ENV, KEY)
    assert raykd_serve.build_app("student", ServeConfig())


@pytest.mark.parametrize("source", ["config", "env", "file"])
def test_the_key_is_never_in_the_deployment_arguments(monkeypatch, tmp_path, source, student_here):
    settings = ServeConfig(host="0.0.0.0", api_key=KEY) if source == "config" else ServeConfig()
    if source == "env":
        monkeypatch.setenv(auth.API_KEY_ENV, KEY)
    if source == "file":
        (tmp_path / "key").write_text(KEY)
        settings = ServeConfig(api_key_file=str(tmp_path / "key"))
    bound = raykd_serve.build_app("student", settings)._bound_deployment
    rc = bound._replica_config  # what Serve stores and ships to replicas
    blob = pickle.dumps((bound.init_args, bound.init_kwargs)) + rc.serialized_init_args + rc.serialized_init_kwargs
    assert KEY.encode() not in blob and KEY.encode("utf-16-le") not in blob
    salt, digest = bound.init_args[2]  # what replicas without a key of their own check against
    assert auth.Verifier(salt, digest).accepts(f"Bearer {KEY}")


def test_dump_config_never_writes_the_key_and_makes_the_run_directory_owner_only(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"serve.api_key={KEY}"])
    rundir.dump_config(cfg, tmp_path / "run")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert KEY not in text and "api_key:" not in text.replace("api_key_file", "")
    assert load_config(tmp_path / "run" / "config.yaml").serve.api_key is None  # never a key of '*****'
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700


def test_verifier_constant_time_and_case_insensitive_scheme(monkeypatch):
    calls = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    v = auth.Verifier.for_key(KEY)
    for ok in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"  Bearer   {KEY}  "):
        assert v.accepts(ok), ok
    for bad in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", "Bearer ", f"Token {KEY}",
                "Bearer \u00e9\u00ff" * 100, f"Bearer{KEY}"):
        assert not v.accepts(bad), bad
    assert calls and all(len(a) == len(b) == 32 for a, b in calls)  # fixed-length digests, compare_digest


def test_key_sources_in_order(monkeypatch, tmp_path):
    (tmp_path / "a").write_text("from-file-a\n")
    (tmp_path / "b").write_text("from-file-b")
    (tmp_path / "empty").write_text("\n")
    assert auth.resolve_key(None, None) is None
    assert auth.resolve_key("inline", None) == "inline"
    monkeypatch.setenv(auth.API_KEY_ENV, "from-env")
    assert auth.resolve_key("inline", None) == "from-env"
    monkeypatch.setenv(auth.API_KEY_FILE_ENV, str(tmp_path / "b"))
    assert auth.resolve_key("inline", None) == "from-file-b"
    assert auth.resolve_key("inline", str(tmp_path / "a")) == "from-file-a"
    with pytest.raises(RaykdError, match="is empty"):
        auth.resolve_key(None, str(tmp_path / "empty"))
    with pytest.raises(RaykdError, match="cannot read the API key file"):
        auth.resolve_key(None, str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ the id rule

@settings(database=None)
@given(st.integers(ids.INT64_MIN, ids.INT64_MAX))
def test_every_int64_round_trips_as_text_and_as_a_number(i):
    assert ids.lookup_key(str(i), True) == i and ids.lookup_key(i, True) == i
    assert ids.lookup_key(i, False) == str(i) and ids.problem(i) is None


@settings(database=None)
@given(st.text(max_size=40) | st.text(st.sampled_from("-+0123456789 \t²٣０１e."), max_size=25))
def test_any_text_is_an_integer_only_in_canonical_ascii_decimal(s):
    key = ids.lookup_key(s, True)
    assert key is None or (type(key) is int and str(key) == s.strip(ids.WHITESPACE))
    assert ids.lookup_key(s, False) == s.strip(ids.WHITESPACE)


@settings(database=None)
@given(st.one_of(st.integers(max_value=ids.INT64_MIN - 1), st.integers(min_value=ids.INT64_MAX + 1)))
def test_integers_beyond_64_bits_are_refused(i):
    assert ids.problem(i) and ids.lookup_key(str(i), True) is None


@pytest.mark.parametrize("text", ["--5", "²", "０１０１", "٣", "007", "+7", "1e3", "-0", "7.0", "", " ", "1" * 5000,
                                  "9223372036854775808"])
def test_lookalike_integers_are_unknown_ids(text):
    assert ids.lookup_key(text, True) is None


def test_bounds_and_whitespace():
    assert ids.lookup_key(" 7\t", True) == 7 and ids.lookup_key(" a b ", False) == "a b"
    assert "at most 256" in ids.problem("x" * 257) and ids.problem("x" * 256) is None
    assert "lone surrogate" in ids.problem("a\ud800")


# ----------------------------------------------- serving: each id in the vocabulary of its own kind

def servable(root: Path, users: list, items: list) -> Path:
    """A run folder's data and a random 1-layer student (returned: a model folder, served as itself);
    every user's history is items 1, 2, 3 (+ its index)."""
    lengths = np.full(len(users), 4)
    seq = np.concatenate([[1, 2, 3, 4 + u % (len(items) - 3)] for u in range(len(users))]).astype(np.int32)
    prepare.write({"user_raw": pa.array(users), "item_raw": pa.array(items), "items": seq, "lengths": lengths,
                   "stats": {}}, root / "data", None)
    desc = {"family": "sasrec", "num_items": len(items), "dim": 8, "layers": 1, "heads": 1, "max_len": 10,
            "dropout": 0.0}
    models.save_model(root / "student", models.build_model(desc), desc)
    return root / "student"


def test_user_ids_follow_the_user_vocabulary_and_item_ids_the_item_vocabulary(tmp_path):
    # integer users, text items: user 10 exists (it used to be looked up as "10": 404)
    rec = Recommender(servable(tmp_path / "a", [10, 11, 12], ["a", "b", "c", "d", "e", "101"]))
    for user in (10, "10"):
        hist, *_ = rec.parse({"user_id": user})
        assert hist.tolist() == [1, 2, 3, 4]
    known, unknown, *_ = rec.parse({"history": [101, "a", "zz"]})
    assert known.tolist() == [6, 1] and unknown == ["zz"]
    # text users "007" and "7" are two users; integer items
    rec = Recommender(servable(tmp_path / "b", ["007", "7", "x"], [5, 6, 7, 8, 101, 102]))
    assert rec.parse({"user_id": "007"})[0][-1] == 4 and rec.parse({"user_id": "7"})[0][-1] == 5
    assert rec.parse({"user_id": 7})[0][-1] == 5
    for nobody in ("--10", "²", "7 x", "0007"):
        with pytest.raises(BadRequest) as err:
            rec.parse({"user_id": nobody})
        assert err.value.status == 404
    known, unknown, *_ = rec.parse({"history": ["０１０１", "--5", "²", "101", " 102 ", "0101"]})
    assert known.tolist() == [5, 6] and unknown == ["０１０１", "--5", "²", "0101"]
    json.dumps(rec.recommend_many([rec.parse({"history": ["--5", "²"]})]), ensure_ascii=False).encode()


@pytest.mark.parametrize("body", [{"history": ["\ud800"]}, {"user_id": "a\udfff"}, {"history": ["1" * 5000]},
                                  {"history": [2**64]}, {"user_id": -(2**63) - 1}])
def test_ids_out_of_bounds_get_422(tmp_path, body):
    rec = Recommender(servable(tmp_path, [1, 2, 3], [1, 2, 3, 4, 5]))
    with pytest.raises(BadRequest) as err:
        rec.parse(body)
    assert err.value.status == 422 and err.value.message.encode("utf-8")


# ----------------------------------------------------------------------- external teacher scores

@pytest.mark.parametrize("per_position", [False, True])
def test_duplicate_teacher_score_rows_are_an_error_with_counts(tmp_path, per_position):
    servable(tmp_path, [1, 2, 3], [10, 20, 30, 40, 50])  # each user: 1 training position
    rows = [{"user_id": u, **({"position": p} if per_position else {}), "items": [10, 20], "scores": [1.0, 0.5]}
            for u in (1, 2, 3) for p in ((1,) if per_position else (0,))]
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.Table.from_pylist(rows), ok)
    assert teacher_scores.load(ok, tmp_path / "data")[1] == 2
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_pylist(rows + [{**rows[0], "scores": [0.0, 9.0]}, rows[0], rows[-1]]), dup)
    what = r"\(user_id, position\) pair" if per_position else "user_id"
    with pytest.raises(RaykdError, match=rf"3 rows repeat a {what} given by an earlier row \(2 distinct"):
        teacher_scores.load(dup, tmp_path / "data")


def test_teacher_score_ids_follow_the_id_rule(tmp_path):
    servable(tmp_path, [1, 2, 3], [10, 20, 30, 40, 50])
    rows = [{"user_id": f" {u} ", "items": [" 10", "20 "], "scores": [1.0, 0.5]} for u in (1, 2, 3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    assert teacher_scores.load(tmp_path / "s.parquet", tmp_path / "data")[1] == 2


# ---------------------------------------------------------------------------- KubeRay manifests

def _containers(cluster: dict) -> list[tuple[dict, dict]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [(c, g["template"]["spec"]) for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("manifest", sorted(Path("deploy/kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests_serve_only_with_a_required_key_file(manifest):
    import yaml

    for doc in yaml.safe_load_all(manifest.read_text()):
        spec = (doc or {}).get("spec", {})
        if "serveConfigV2" not in spec:
            continue
        serve_cfg = yaml.safe_load(spec["serveConfigV2"])
        exposed = not auth.is_loopback(serve_cfg.get("http_options", {}).get("host", "127.0.0.1"))
        for app in serve_cfg["applications"]:
            args = app["args"]
            assert "api_key" not in args  # the key itself never in a stored Serve config
            raykd_serve.AppArgs.model_validate(args)  # no key in this test's environment: the file must be set
            if exposed:
                assert not auth.is_loopback(args["host"]) and args["api_key_file"]
                key_dir = str(Path(args["api_key_file"]).parent)
                for container, pod in _containers(spec["rayClusterConfig"]):  # every pod can build or host it
                    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == key_dir)
                    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                    assert volume["secret"]["secretName"] and not volume["secret"].get("optional", False)
        assert "optional: true" not in manifest.read_text()
