"""Helpers and tiny logs shared by the prepare tests (test_prepare.py, test_prepare_errors.py)."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raykd.config import load_config
from raykd.core.errors import RaykdError
from raykd.data import readers as logs
from raykd.stages import prepare

# Three users with three items each, in an order that time must fix: (user, item, rating, time).
ROWS = [
    (1, 10, 5, 300), (1, 20, 4, 100), (1, 30, 3, 200),
    (2, 10, 5, 100), (2, 30, 1, 300), (2, 20, 5, 200),
    (3, 30, 4, 100), (3, 20, 5, 200), (3, 10, 2, 300),
]
# user -> (train, valid, test) in raw ids, ordered by time
EXPECTED = {1: ([20], 30, 10), 2: ([10], 20, 30), 3: ([30], 20, 10)}
LOOSE = ["data.min_user_interactions=3", "data.min_item_interactions=1"]


def config(run_dir, *overrides):
    return load_config(None, [f"output_dir={run_dir}", *LOOSE, *overrides])


def run(tmp_path, *overrides):
    """Prepare into tmp_path/run and return the data folder."""
    return prepare.run(config(tmp_path / "run", *overrides))


def sequences(data_dir) -> dict:
    """raw user -> (train raw items, valid raw item, test raw item), read back through the vocabularies."""
    users = pq.read_table(data_dir / "users.parquet").to_pydict()
    items = pq.read_table(data_dir / "items.parquet").to_pydict()
    user_raw = dict(zip(users["index"], users["raw_id"]))
    item_raw = dict(zip(items["index"], items["raw_id"]))
    seq = pq.read_table(data_dir / "sequences").to_pydict()
    return {user_raw[u]: ([item_raw[i] for i in train], item_raw[v], item_raw[t])
            for u, train, v, t in zip(seq["user"], seq["train"], seq["valid"], seq["test"])}


def stats(data_dir) -> dict:
    return json.loads((data_dir / "stats.json").read_text())


def write_text(path, lines, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + list(lines)))
    return path


def prepare_in_pieces(cfg, block_bytes):
    """prepare.run's steps with a chosen read block size (tiny blocks: many blocks per file)."""
    out = Path(cfg.output_dir) / "data"
    sources = logs.plan_sources(cfg.data, block_bytes=block_bytes)
    prepare.write(prepare.clean(prepare.read_all(sources), cfg.data, sources), out, cfg.data.num_shards)
    return out


def same_output(a, b) -> bool:
    files = ["users.parquet", "items.parquet", "stats.json"]
    files += sorted(p.name for p in (a / "sequences").glob("*.parquet"))
    assert sorted(p.name for p in (a / "sequences").glob("*.parquet")) == sorted(
        p.name for p in (b / "sequences").glob("*.parquet"))
    for f in files:
        sub = "sequences/" if f.startswith("part-") else ""
        if not filecmp.cmp(a / f"{sub}{f}", b / f"{sub}{f}", shallow=False):
            return False
    return True


def fails(tmp_path, *overrides) -> str:
    with pytest.raises(RaykdError) as err:
        run(tmp_path, *overrides)
    msg = str(err.value)
    assert "Traceback" not in msg
    return msg
