"""raykd recommend: every user's top k on a Ray Data actor pool, exactly what the server answers."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd import cli
from raykd.core.errors import RaykdError
from raykd.core.scoring import top_k
from raykd.serve import recommend
from raykd.serve.recommender import Recommender


def run_recommend(run_dir, out, *flags) -> pa.Table:
    assert cli.main(["recommend", str(run_dir), "--out", str(out), *flags]) == 0
    return pq.read_table(out)


def served(rec: Recommender, user, k: int, exclude_seen: bool = True) -> tuple[list, list]:
    """What POST /recommend answers for this user (the deployment calls these two methods)."""
    (answer,) = rec.recommend_many([rec.parse({"user_id": user, "k": k, "exclude_seen": exclude_seen})])
    return answer["items"], answer["scores"]


@pytest.fixture(scope="module")
def every_user(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("recommend") / "recs.parquet"
    return run_recommend(tiny_run, out, "--k", "10", "--batch-size", "64")


def test_every_prepared_user_gets_what_the_server_answers(every_user, tiny_run):
    rec = Recommender(tiny_run)
    raw_users = pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()
    assert every_user.column_names == ["user_id", "items", "scores"]
    assert every_user.schema.field("user_id").type == pa.int64()  # the raw ids' own type
    assert every_user["user_id"].to_pylist() == raw_users  # every user, in the prepared order
    for row in every_user.to_pylist():
        assert (row["items"], row["scores"]) == served(rec, row["user_id"], 10), row["user_id"]


def test_output_does_not_depend_on_the_number_of_workers(every_user, tiny_run, tmp_path):
    pq.write_table(every_user.slice(0, 3), tmp_path / "two.parquet")  # an earlier version's single-file output
    two = run_recommend(tiny_run, tmp_path / "two.parquet", "--k", "10", "--batch-size", "64", "--workers", "2",
                        "--part-users", "50")
    assert two.equals(every_user)  # parts of 50 users on two actors: the same table as one part on one
    assert (tmp_path / "two.parquet").is_dir() and recommend.is_output(tmp_path / "two.parquet")


def test_the_console_shows_only_raykds_lines(tiny_run, tmp_path):
    # A user's own shell: a fresh process that starts its own Ray. Ray's start-up warning, its C++
    # core's actor notice and Ray Data's progress lines go to <run>/logs/, as in every stage.
    import subprocess

    res = subprocess.run(["raykd", "recommend", str(tiny_run), "--out", str(tmp_path / "r.parquet"), "--k", "3"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    lines = (res.stdout + res.stderr).splitlines()
    assert lines and all(line.startswith(("recommend: ", "ray: ")) for line in lines), lines
    assert "streaming_executor" in (tiny_run / "logs" / "ray-driver.log").read_text()


def test_listed_users_and_unknown_ids_in_a_side_file(tiny_run, tmp_path, capsys):
    raw_users = pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()
    listed = [str(raw_users[5]), "nobody", str(raw_users[2]), " 10000000000 ", str(raw_users[5]), "007"]
    (tmp_path / "users.txt").write_text("\n".join(listed) + "\n\n")
    out = tmp_path / "some.parquet"
    table = run_recommend(tiny_run, out, "--users", str(tmp_path / "users.txt"), "--k", "5", "--no-exclude-seen")
    assert table["user_id"].to_pylist() == [raw_users[2], raw_users[5]]  # prepared order, each once
    rec = Recommender(tiny_run)
    for row in table.to_pylist():
        assert (row["items"], row["scores"]) == served(rec, row["user_id"], 5, exclude_seen=False)
    side = tmp_path / "some.unknown_users.csv"
    assert recommend.unknown_users_path(out) == side
    assert pd.read_csv(side, dtype=str)["user_id"].tolist() == ["nobody", "10000000000", "007"]
    assert "3 listed user id(s) are not prepared users" in capsys.readouterr().err


def test_user_lists_read_from_csv_and_parquet(tiny_run, tmp_path):
    data = tiny_run / "data"
    raw_users = pq.read_table(data / "users.parquet")["raw_id"].to_pylist()
    pd.DataFrame({"name": ["a", "b"], "user_id": [str(raw_users[3]), "x"]}).to_csv(tmp_path / "u.csv", index=False)
    pq.write_table(pa.table({"id": [float(raw_users[4]), None]}), tmp_path / "u.parquet")
    assert recommend.match_users(recommend.read_user_list(str(tmp_path / "u.csv")), data) == ([3], ["x"])
    assert recommend.match_users(recommend.read_user_list(str(tmp_path / "u.parquet")), data) == ([4], [])
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(RaykdError, match="name the column of user ids user_id"):
        recommend.read_user_list(str(tmp_path / "two.csv"))


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "--k must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--users", "/no/such/file.txt"], "--users /no/such/file.txt: no such file"),
])
def test_bad_arguments_are_one_clear_line(tiny_run, tmp_path, capsys, flags, message):
    assert cli.main(["recommend", str(tiny_run), "--out", str(tmp_path / "r.parquet"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("raykd recommend: error: ") and message in err
    assert not (tmp_path / "r.parquet").exists()


def test_an_output_folder_or_a_model_without_histories_is_refused(tiny_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(["recommend", str(tiny_run), "--out", str(mine)]) == 1
    assert "is a folder that raykd recommend did not write" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    bundle = tmp_path / "bundle"
    assert cli.main(["export", str(tiny_run), "--out", str(bundle)]) == 0  # no --with-histories
    assert cli.main(["recommend", str(bundle), "--out", str(tmp_path / "r.parquet")]) == 1
    assert "--with-histories" in capsys.readouterr().err


def test_an_answer_does_not_depend_on_the_batch_it_is_scored_in(tiny_run):
    """Alone, in sevens or all together (the server's @serve.batch, /recommend/batch, recommend's chunks)."""
    rec = Recommender(tiny_run)
    bodies = [{"user_id": u, "k": 10} for u in list(rec.histories)[:60]]
    together = rec.recommend_batch(bodies)
    assert [rec.recommend_batch([b])[0] for b in bodies] == together
    assert [a for i in range(0, len(bodies), 7) for a in rec.recommend_batch(bodies[i:i + 7])] == together


@pytest.mark.parametrize("n", [5, 119, 128, 129, 1000, 20_001])
def test_top_k_is_torch_topk(n):
    torch.manual_seed(n)
    scores = torch.randn(9, n)
    scores[:, 0] = -torch.inf
    scores[3, : n // 2] = -torch.inf  # masked items, as seen items are
    for k in {1, min(10, n)}:
        values, columns = top_k(scores, k)
        expected = torch.topk(scores, k)
        assert torch.equal(values, expected.values)
        finite = torch.isfinite(values)
        assert torch.equal(columns[finite], expected.indices[finite])


def test_ann_answers_come_from_one_index_built_by_the_driver(every_user, tiny_run, tmp_path):
    """--ann: the driver builds the index once, every actor answers from it; the output records its
    recall and holds no copy of it; answers keep the exact path's rules (k items, no seen item)."""
    import json

    ann = run_recommend(tiny_run, tmp_path / "ann.parquet", "--k", "10", "--ann", "--workers", "2")
    meta = json.loads((tmp_path / "ann.parquet" / recommend.MANIFEST).read_text())["ann"]
    assert 0.9 <= meta["recall@10"] <= 1.0
    assert not (tmp_path / "ann.parquet" / recommend.ANN_DIR).exists()
    assert ann["user_id"].to_pylist() == every_user["user_id"].to_pylist()
    rec = Recommender(tiny_run)
    exact = every_user.to_pylist()
    overlap = []
    for row, ex in zip(ann.to_pylist(), exact):
        seen = {rec.raw_item(i) for i in rec.histories.get(row["user_id"])}
        assert len(row["items"]) == 10 and not seen & set(row["items"])
        overlap.append(len(set(row["items"]) & set(ex["items"])) / 10)
    assert sum(overlap) / len(overlap) >= 0.9


@pytest.mark.parametrize("raw_ids", [pa.array(["u1", "u2", "u3", "9"]), pa.array([11, 12, 13, 9], pa.int64())])
def test_listed_users_match_in_list_order_each_once(tmp_path, raw_ids):
    """Matched by Arrow's hash lookup (no dict of every user); the rules of raykd.core.ids still hold."""
    pq.write_table(pa.table({"raw_id": raw_ids}), tmp_path / "users.parquet")
    if pa.types.is_integer(raw_ids.type):
        listed = ["13", " 11", 9, "13", "oops", "99999999999999999999", "12"]
        assert recommend.match_users(listed, tmp_path) == ([2, 0, 3, 1], ["oops", "99999999999999999999"])
    else:
        listed = ["u3", "u1 ", 9, "u3", "U2", "u2"]
        assert recommend.match_users(listed, tmp_path) == ([2, 0, 3, 1], ["U2"])
    assert recommend.match_users([], tmp_path) == ([], [])
