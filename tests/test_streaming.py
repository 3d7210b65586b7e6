"""Training data streamed from the Parquet shards: chunks, the bounded shuffle buffer, padding trimmed
before the forward pass, the Ray Data dataset Train workers read, and the batch that grows with
the cluster (issue 23 item 1)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd.config import ModelConfig, TrainConfig
from raykd.core import models, sequences
from raykd.training import loop
from raykd.training.spec import RunSpec


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data folder of 90 users over 30 items in 3 shards, with fake soft labels (K=4,
    each position's first index = its shard-local position number, so alignment is checkable)."""
    from raykd.stages import prepare

    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 40, 90)
    items = rng.integers(1, 31, int(lengths.sum())).astype(np.int32)
    out = tmp_path_factory.mktemp("streamed")
    prepare.write({"lengths": lengths, "items": items, "user_raw": np.arange(90).astype(str),
                   "item_raw": np.arange(1, 31).astype(str), "stats": {"users": 90, "items": 30}}, out, num_shards=3)
    soft = out / "soft"
    soft.mkdir()
    for shard in sequences.shard_paths(out):
        n = int(np.maximum(np.diff(pq.read_table(shard)["train"].combine_chunks().offsets.to_numpy()) - 1, 0).sum())
        idx = np.stack([np.arange(n), *(rng.integers(1, 31, n) for _ in range(3))], 1).astype(np.int32)
        logits = rng.normal(size=(n, 4)).astype(np.float16)
        pq.write_table(pa.table({"idx": pa.FixedSizeListArray.from_arrays(pa.array(idx.ravel()), 4),
                                 "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), 4),
                                 "rest": pa.array(rng.normal(size=n).astype(np.float32))}),
                       soft / shard.name, row_group_size=50)  # many small record batches to read across
    return out


def _rows(w: dict) -> list[tuple]:
    """Every window with its soft-label rows, as hashable tuples (order-free comparisons)."""
    starts = w["t_start"]
    return sorted((tuple(w["input"][i]), tuple(w["target"][i]), w["t_idx"][starts[i]:starts[i + 1]].tobytes(),
                   w["t_logits"][starts[i]:starts[i + 1]].tobytes(), w["t_rest"][starts[i]:starts[i + 1]].tobytes())
                  for i in range(len(w["input"])))


def test_chunks_of_users_are_the_whole_shard_cut_in_pieces_with_aligned_soft_labels(prepared):
    for shard in sequences.shard_paths(prepared):
        whole = sequences.window_arrays(shard, 10, prepared / "soft" / shard.name)
        chunks = list(sequences.window_chunks(shard, 10, prepared / "soft" / shard.name, users=7))
        assert len(chunks) == -(-pq.ParquetFile(shard).metadata.num_rows // 7)
        joined = sequences.concat(chunks)
        for key in whole:
            assert np.array_equal(joined[key], whole[key]), key
        # the reference: windows() over the whole shard, soft rows looked up by position number
        pos = sequences.windows(pq.read_table(shard)["train"].combine_chunks(), 10)["pos"]
        assert np.array_equal(whole["t_idx"][:, 0], pos[pos >= 0])
        assert whole["t_start"][-1] == len(whole["t_idx"]) == int((whole["target"] > 0).sum())


def test_soft_labels_of_another_length_are_refused(prepared, tmp_path):
    from raykd.core.errors import RaykdError

    shard = sequences.shard_paths(prepared)[0]
    table = pq.read_table(prepared / "soft" / shard.name)
    pq.write_table(table.slice(1), tmp_path / shard.name)
    with pytest.raises(RaykdError, match="regenerate"):
        next(sequences.window_chunks(shard, 10, tmp_path / shard.name))


def test_take_gathers_soft_rows_of_the_chosen_windows(prepared):
    shard = sequences.shard_paths(prepared)[0]
    cols = sequences.window_arrays(shard, 10, prepared / "soft" / shard.name)
    rows = np.array([5, 0, 3])
    got = sequences.take(cols, rows)
    want = np.concatenate([cols["t_idx"][cols["t_start"][r]:cols["t_start"][r + 1]] for r in rows])
    assert np.array_equal(got["t_idx"], want) and np.array_equal(got["input"], cols["input"][rows])
    assert np.array_equal(np.diff(got["t_start"]), (got["target"] > 0).sum(1))


def _chunk(start: int, n: int) -> dict:
    return {"input": np.arange(start, start + n, dtype=np.int32)[:, None] + 1,
            "target": np.arange(start, start + n, dtype=np.int32)[:, None] + 1}


def test_the_shuffle_buffer_holds_a_bounded_number_of_windows_and_loses_none():
    pulled = [0]

    def chunks():
        for c in range(20):  # 20 chunks of 30 windows; a buffer of 100; batches of 16
            pulled[0] += 30
            yield _chunk(30 * c, 30)

    seen, alive = [], []
    for batch in loop.shuffled_batches(chunks(), 16, 100, np.random.default_rng(1)):
        seen.extend(batch["input"][:, 0].tolist())
        alive.append(pulled[0] - len(seen))  # windows read but not yet handed out
        assert len(batch["input"]) == 16 or len(seen) == 600  # only the stream's last batch is short
    assert sorted(seen) == list(range(1, 601))
    assert max(alive) <= 100 + 30  # the buffer and one chunk, whatever the stream's length
    assert seen != sorted(seen)  # shuffled


def test_streamed_batches_cover_every_window_once_in_a_seeded_order_per_epoch(prepared):
    soft = prepared / "soft"
    every = _rows(loop.windows_in_memory(prepared, 10, soft))

    def epoch(seed):
        batches = list(loop.streamed_batches(prepared, 10, soft, 8, seed, buffer=24))
        return [b["input"][:, -1].tolist() for b in batches], sequences.concat(batches)

    order, joined = epoch(3)
    assert _rows(joined) == every  # each window once, with its own soft labels
    assert epoch(3)[0] == order and epoch(4)[0] != order
    assert sequences.count_windows(prepared, 10) == len(every)


def test_trimmed_and_untrimmed_batches_give_the_same_loss(prepared):
    shard = sequences.shard_paths(prepared)[0]
    cols = sequences.window_arrays(shard, 40, prepared / "soft" / shard.name)
    short = np.argsort((cols["target"] > 0).sum(1))[:6]  # the shortest windows: most columns are padding
    batch = sequences.take(cols, short)
    inp, target = loop.trim_padding(batch["input"], batch["target"])
    assert inp.shape[1] == (batch["target"] > 0).sum(1).max() < 40
    assert np.array_equal(target, batch["target"][:, -inp.shape[1]:])
    for family in ("sasrec", "gru"):
        spec = RunSpec("student", ModelConfig(family=family, dim=8, layers=2, heads=2, max_len=40, dropout=0.0),
                       TrainConfig(loss="full"), seed=2)
        model = models.build_model({"family": family, "num_items": 30, **spec.model.model_dump(exclude={"family"})})
        loss = loop.make_loss(spec, None)
        values = []
        for i, t in ((inp, target), (batch["input"], batch["target"])):
            i, t = torch.as_tensor(i.astype(np.int64)), torch.as_tensor(t.astype(np.int64))
            with torch.no_grad():
                values.append(float(loss(model(i)[t > 0], model, t[t > 0], (None, None, None))))
        assert values[0] == pytest.approx(values[1], abs=1e-6)
    widths = []  # and the training step feeds the model the trimmed batch
    model.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    optimizer = torch.optim.Adam(model.parameters())
    loop.train_epoch(model, model, optimizer, [batch], loss, False, "cpu", torch.autocast("cpu", enabled=False))
    assert widths == [inp.shape[1]]


def test_batch_scaling_per_worker_grows_the_global_batch_and_scales_the_learning_rate():
    fixed, grown = TrainConfig(batch_size=128, lr=1e-3), TrainConfig(batch_size=128, lr=1e-3, batch_scaling="per_worker")
    assert [loop.worker_batch(128, w, fixed.batch_scaling) for w in (1, 2, 4)] == [128, 64, 32]
    assert [loop.worker_batch(128, w, grown.batch_scaling) for w in (1, 2, 4)] == [128, 128, 128]
    assert loop.worker_lr(fixed, 4) == 1e-3 and loop.worker_lr(grown, 1) == 1e-3
    assert loop.worker_lr(grown, 4) == pytest.approx(2e-3) and loop.worker_lr(grown, 2) == pytest.approx(1e-3 * math.sqrt(2))


def test_train_workers_read_a_lazy_dataset_reshuffled_every_epoch(ray_session, prepared):
    from ray.data.dataset import MaterializedDataset

    from raykd.cluster import train

    soft = prepared / "soft"
    ds = train.window_dataset(prepared, 10, soft, seed=5, block_bytes=4096)
    assert not isinstance(ds, MaterializedDataset)  # nothing held between epochs
    every = _rows(loop.windows_in_memory(prepared, 10, soft))
    epochs = []
    for _ in range(2):  # each iteration is a new execution: a new file order and window shuffle
        blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))  # one batch per block
        # blocks of at most 4 KiB (windows of ~100-400 bytes here), not whole shards (~75 windows each)
        assert len(blocks) > 10 and max(len(b["input"]) for b in blocks) <= 40
        joined = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
        assert len(joined["input"]) == len(every)
        epochs.append(np.stack(joined["input"])[:, -1].tolist())
        decoded = {"input": np.stack(joined["input"]), "target": np.stack(joined["target"])}
        labels = loop.soft({**decoded, **{k: joined[k] for k in sequences.SOFT_COLUMNS}}, "cpu")
        decoded.update(t_idx=labels[0].numpy().astype(np.int32), t_logits=labels[1].numpy().astype(np.float16),
                       t_rest=labels[2].numpy(), t_start=np.concatenate([[0], np.cumsum((decoded["target"] > 0).sum(1))]))
        assert _rows(decoded) == every  # every window once per epoch, with its own soft labels
    assert epochs[0] != epochs[1]


def test_windows_stream_while_train_workers_hold_every_cpu(ray_session, prepared):
    """Train workers may take every CPU of the cluster (one per 1-CPU node): the dataset's tasks must
    still run, or training waits for windows forever (the multinode distill hung this way)."""
    import concurrent.futures

    import ray

    from raykd.cluster import train

    @ray.remote(num_cpus=ray.cluster_resources()["CPU"])
    class Workers:  # stands in for the Train worker group holding every CPU
        def ready(self) -> bool:
            return True

    pool = concurrent.futures.ThreadPoolExecutor(1)  # not `with`: a hung iteration must fail, not wait
    held = Workers.remote()
    assert ray.get(held.ready.remote())
    try:
        ds = train.window_dataset(prepared, 10, prepared / "soft", seed=1)
        rows = pool.submit(lambda: sum(len(b["input"]) for b in ds.iter_batches(batch_size=None)))
        assert rows.result(timeout=120) == len(loop.windows_in_memory(prepared, 10, prepared / "soft")["input"])
    finally:
        ray.kill(held)  # frees the CPUs: a hung iteration then ends too
        pool.shutdown(wait=False)
