"""Inputs read faithfully (issue 26, second round): external teacher scores beyond float16 keep
their softmax (item 2); epoch seconds and milliseconds in one time column are an error (item 5);
inputs are fingerprinted by path and content, not by size and modification time (item 14)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prepare_cases import config, run, sequences, write_text

from raykd.core import losses, rundir
from raykd.core import sequences as seqs
from raykd.core.errors import RaykdError
from raykd.data import readers as logs
from raykd.stages import prepare, soft_labels

# ------------------------------------------------------------------ item 2: external scores

ITEMS = [10, 20, 30, 40, 50]
# user -> the teacher's scores for items 10, 20, 30, 40 (one training position per user)
SCORES = {
    1: [70000.0, 1000.3, 1000.4, -70000.0],  # beyond float16 (max 65,504)
    2: [1000.3, 1000.4, 999.0, 1002.0],  # close scores: float16 steps by 0.5 near 1000
    3: [0.25, -3.0, 2.0, 1.5],  # ordinary logits
}


def _data(root):
    """A prepared data/ of three users whose histories are 4 items: one training position each."""
    seq = np.concatenate([[1, 2, 3, 4 + u] for u in range(3)]).astype(np.int32)
    prepare.write({"user_raw": pa.array(list(SCORES)), "item_raw": pa.array(ITEMS), "items": seq,
                   "lengths": np.full(3, 4), "stats": {}}, root / "data", None)
    return root / "data"


def _scores_file(path, scores=SCORES):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"user_id": u, "items": ITEMS[:4], "scores": s} for u, s in scores.items()]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _import(scores_path, data, out):
    return soft_labels.import_external(scores_path, data, out, {rundir.DATA: "data-key"})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_external_scores_beyond_float16_keep_their_softmax(tmp_path, temperature):
    data = _data(tmp_path)
    _import(_scores_file(tmp_path / "scores.parquet"), data, tmp_path / "soft_labels")
    shard = seqs.shard_paths(data)[0]
    stored = seqs.window_arrays(shard, 10, tmp_path / "soft_labels" / shard.name)  # what distill reads
    idx, logits = stored["t_idx"], stored["t_logits"].astype(np.float32)
    assert np.isfinite(logits).all()
    given = np.array(list(SCORES.values()), dtype=np.float64)
    order = np.argsort(-given, axis=1, kind="stable")
    assert (idx == np.take_along_axis(np.array([[1, 2, 3, 4]]), order, 1)).all()  # best first, same items
    want = torch.softmax(torch.tensor(np.take_along_axis(given, order, 1)) / temperature, 1)
    got = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, 1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-3)
    # the KD loss reads them as the teacher meant: a student scoring exactly the teacher's numbers learns nothing
    student = torch.full((3, len(ITEMS) + 1), -1e4)
    student[:, 1:5] = torch.tensor(given, dtype=torch.float32)
    kd = losses.kd_kl(student, torch.tensor(idx, dtype=torch.long), torch.tensor(stored["t_logits"]), temperature)
    assert float(kd) < 1e-3


# --------------------------------------------------------- item 5: epoch units in one column

def _clean(cfg) -> dict:
    """prepare's read and clean steps in this process (no Ray): the checks run in `clean`."""
    sources = logs.plan_sources(cfg.data)
    table = pa.concat_tables([t for s in sources for t in logs.read_source(s)])
    return prepare.clean(table, cfg.data, sources)


S, MS = 1_600_000_000, 1_600_000_000_000
LOG = [(1, 10, S + 100), (1, 20, S + 200), (1, 30, S + 300),
       (2, 10, S + 100), (2, 20, S + 200), (2, 30, S + 300)]


def _mixed(rows):
    """The log with user 1's second interaction written in milliseconds (it sorts last as a number)."""
    return [(u, i, t * 1000 if (u, i) == (1, 20) else t) for u, i, t in rows]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "parquet files"])
def test_epoch_seconds_and_milliseconds_in_one_time_column_are_an_error(tmp_path, fmt):
    if fmt == "csv":
        path = write_text(tmp_path / "log.csv", [f"{u},{i},{t}" for u, i, t in _mixed(LOG)], "user_id,item_id,ts")
        where = "log.csv line 3"
    elif fmt == "parquet":
        path = tmp_path / "log.parquet"
        pq.write_table(pa.table(dict(zip(["user_id", "item_id", "ts"], map(list, zip(*_mixed(LOG)))))), path)
        where = "log.parquet row 2"
    else:  # each file in one unit, the two files in two units
        path = tmp_path / "logs"
        path.mkdir()
        for name, rows in (("a.parquet", LOG[:3]), ("b.parquet", [(u, i, t * 1000) for u, i, t in LOG[3:]])):
            pq.write_table(pa.table(dict(zip(["user_id", "item_id", "ts"], map(list, zip(*rows))))), path / name)
        where = "b.parquet row 1"
    cfg = config(tmp_path / "run", f"data.format={fmt.split()[0]}", f"data.path={path}", "data.time_col=ts")
    with pytest.raises(RaykdError) as err:
        _clean(cfg)
    msg = str(err.value)
    assert "seconds" in msg and "milliseconds" in msg and where in msg, msg


def test_one_epoch_unit_per_column_is_read_as_it_is(tmp_path):
    for unit, scale in (("s", 1), ("ms", 1000)):
        path = write_text(tmp_path / f"{unit}.csv", [f"{u},{i},{t * scale}" for u, i, t in LOG], "user_id,item_id,ts")
        cfg = config(tmp_path / "run", "data.format=csv", f"data.path={path}", "data.time_col=ts")
        assert _clean(cfg)["items"].tolist() == [1, 2, 3, 1, 2, 3]
    # numbers under 1e8 (seconds before March 1973, or an event counter) have no unit to clash with
    early = [(u, i, t - S + 50_000_000 if u == 1 else t) for u, i, t in LOG]
    path = write_text(tmp_path / "n.csv", [f"{u},{i},{t}" for u, i, t in early], "user_id,item_id,ts")
    cfg = config(tmp_path / "run", "data.format=csv", f"data.path={path}", "data.time_col=ts")
    assert _clean(cfg)["items"].tolist() == [1, 2, 3, 1, 2, 3]


# ------------------------------------------------------------------- item 14: fingerprints

def _same_size_and_mtime(path, content: bytes):
    """Replace the file's content (same length), keeping its modification time."""
    st = path.stat()
    assert len(content) == st.st_size
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.usefixtures("ray_session")
def test_a_log_replaced_with_the_same_size_and_mtime_is_prepared_again(tmp_path, capsys):
    rows = [(u, i, t) for u, i, t in LOG] + [(3, 10, S + 300), (3, 20, S + 200), (3, 30, S + 100)]
    path = write_text(tmp_path / "log.csv", [f"{u},{i},{t}" for u, i, t in rows], "user_id,item_id,ts")
    args = ["data.format=csv", f"data.path={path}", "data.time_col=ts"]
    data = run(tmp_path, *args)
    assert sequences(data)[3] == ([30], 20, 10)
    run(tmp_path, *args)
    assert "reusing" in capsys.readouterr().out
    flipped = rows[:6] + [(3, 10, S + 100), (3, 20, S + 200), (3, 30, S + 300)]  # user 3's order reversed
    _same_size_and_mtime(path, ("user_id,item_id,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in flipped)).encode())
    run(tmp_path, *args)
    assert "reusing" not in capsys.readouterr().out
    assert sequences(data)[3] == ([10], 20, 30)


def test_external_scores_replaced_or_elsewhere_are_imported_again(tmp_path):
    data, out = _data(tmp_path), tmp_path / "soft_labels"
    first = _scores_file(tmp_path / "a" / "scores.parquet")
    _import(first, data, out)
    assert _import(first, data, out).get("reused")
    # another file of the same name elsewhere (a byte-identical copy, even with the same mtime)
    other = tmp_path / "b" / "scores.parquet"
    other.parent.mkdir()
    shutil.copy2(first, other)
    assert "reused" not in _import(other, data, out)
    # the first file replaced by one of the same size and modification time
    swapped = _scores_file(tmp_path / "c" / "scores.parquet", {1: SCORES[1], 2: SCORES[3], 3: SCORES[2]})
    _same_size_and_mtime(first, swapped.read_bytes())
    assert "reused" not in _import(first, data, out)
    stored = pq.read_table(out / "part-00000.parquet")["logits"].to_pylist()
    np.testing.assert_allclose(np.diff(stored[1]), np.diff(sorted(SCORES[3], reverse=True)), atol=1e-2)  # user 2: user 3's
    assert rundir.read_manifest(out)["source"] == str(first)
