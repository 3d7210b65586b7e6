"""The training step, the loss and the one epoch runner for teacher and students, without Ray.

A run is a `raykd.training.spec.RunSpec` (a frozen dataclass: model, train settings, seed, KD and text
settings) and the prepared data it trains on. The spec travels as it is to the process that
trains: a Ray Train worker (`raykd.cluster.train.train_loop`), a Ray task (`raykd.cluster.task`), a Tune
trial (`raykd.stages.tune.trial`) or this process (`fit_local`: notebooks, benchmarks, tests). Each of
them builds one `EpochRunner`, which owns the epoch bookkeeping: the state, the best weights,
early stopping, resume and the per-epoch report. The drivers differ only in where batches come
from, how validation is reduced and where reports and checkpoints go.

Batches are dicts of NumPy arrays: input/target [B, L] (0 = padding) and, when distilling,
t_idx/t_logits/t_rest, one bytes object per window holding its real slots' soft labels (Ray
Data), or the rows themselves as arrays (batches streamed in this process, `streamed_batches`).
Nothing reads the whole training set: a Ray Train worker iterates its share of a streamed Ray
Data dataset (raykd.cluster.train.window_dataset), and every other driver reads the shards as it
goes, a chunk of users at a time, shuffled within a bounded buffer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch

from raykd.config import SAMPLED_ABOVE_ITEMS, TrainConfig
from raykd.core import (
    checkpoints,
    console,
    item_tables,
    losses,
    metrics,
    models,
    rundir,
    sampled_losses,
    sequences,
    text,
)
from raykd.core.errors import RaykdError
from raykd.training.spec import RunSpec

VECTORS = "vectors.parquet"  # embed-items' file in <run>/item_text/
VAL_KEYS = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20")  # what every run records per epoch


# ---------------------------------------------------------------- the model of a run

def model_desc(spec: RunSpec, data_dir: str | Path) -> dict:
    """The model description (models.build_model, model.json) of `spec` on this prepared data."""
    desc = {"family": spec.model.family, "num_items": sequences.num_items(data_dir),
            **spec.model.model_dump(exclude={"family"})}
    if spec.text is not None and spec.text.mode in ("fuse", "both"):
        desc["text_dim"] = text_dim(spec.text.vectors, spec.model.dim)
    return desc


def build(spec: RunSpec, desc: dict, data_dir: str | Path | None = None) -> torch.nn.Module:
    """The seeded model of this run, with its item codes (a PQ table), text vectors and item-table
    initialisation applied. `data_dir` (the prepared data) is needed by a PQ table only."""
    torch.manual_seed(spec.seed)
    model = models.build_model(desc)
    if desc.get("item_table"):
        model.item_emb.set_codes(item_codes(spec, desc, data_dir))
    t = spec.text
    if t is not None:
        raw = load_vectors(t.vectors)
        if t.mode in ("fuse", "both"):
            reduced = text.reduce(raw, desc["text_dim"])
            model.item_text[:, :reduced.shape[1]] = torch.from_numpy(reduced)  # rank < width: zero columns
        if t.mode in ("init", "both"):
            text.init_item_table(model, text.reduce(raw, model.dim), t.init_std)
    if spec.kd is not None and spec.kd.transfer_from:
        # an ensemble's members side by side: PCA finds the directions they share
        text.init_item_table(model, teacher_table(spec.kd.transfer_from, model.dim), spec.kd.init_std)
    if sparse_table(spec, desc):
        model.item_emb.sparse = True  # before DDP wraps it: DDP then expects (and all-reduces) sparse rows
    return model


def sparse_table(spec: RunSpec, desc: dict) -> bool:
    """Whether a step updates only the item-table rows it uses (`train.sparse_table`): with a sampled
    softmax (the full one reads every row), a dense table (a PQ table's rows are codebooks) without
    text fusion (the fused table is a product over the whole catalogue), on CPU (gloo all-reduces
    sparse gradients; NCCL does not)."""
    tc = spec.train
    return (tc.sparse_table and sampled_softmax(tc, desc["num_items"]) and not desc.get("item_table")
            and not desc.get("text_dim") and not tc.use_gpu)


class TableAndRest:
    """SparseAdam for a sparse item table, Adam (with weight decay) for every other parameter: one
    optimizer to the epoch runner and the checkpoints (`state_dict` numbers the parameters as one
    Adam over `model.parameters()` would, the table among them)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float):
        table = model.item_emb.weight
        params = list(model.parameters())
        self.table_index = next(i for i, p in enumerate(params) if p is table)
        self.dense = torch.optim.Adam([p for p in params if p is not table], lr=lr, weight_decay=weight_decay)
        self.table = torch.optim.SparseAdam([table], lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.table.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.table.step()

    def _to_one(self, i: int) -> int:  # a dense optimizer's index -> the whole model's
        return i + (i >= self.table_index)

    def state_dict(self) -> dict:
        dense, table = self.dense.state_dict(), self.table.state_dict()
        state = {self._to_one(i): v for i, v in dense["state"].items()}
        if table["state"]:  # SparseAdam's one parameter, once it has stepped
            state[self.table_index] = table["state"][0]
        return {"state": state, "param_groups": dense["param_groups"] + table["param_groups"]}

    def load_state_dict(self, sd: dict) -> None:
        dense, table = self.dense.state_dict(), self.table.state_dict()
        back = {self._to_one(i): i for i in range(len(dense["param_groups"][0]["params"]))}
        dense["state"] = {back[i]: v for i, v in sd["state"].items() if i != self.table_index}
        table["state"] = {0: sd["state"][self.table_index]} if self.table_index in sd["state"] else {}
        self.dense.load_state_dict(dense)
        self.table.load_state_dict(table)


def make_optimizer(core: torch.nn.Module, tc, world: int):
    """Adam over every parameter, or TableAndRest when the item table is sparse (`sparse_table`)."""
    lr = worker_lr(tc, world)
    if getattr(getattr(core, "item_emb", None), "sparse", False):
        return TableAndRest(core, lr, tc.weight_decay)
    return torch.optim.Adam(core.parameters(), lr=lr, weight_decay=tc.weight_decay)


def teacher_table(folders: tuple[Path, ...], dim: int) -> np.ndarray:
    """The teachers' item representations [V + 1, dim], PCA-whitened to `dim` (distill.transfer)."""
    items = np.concatenate([text.teacher_items(models.load_model(f)[0]) for f in folders], 1)
    return text.reduce(items, dim)


def item_codes(spec: RunSpec, desc: dict, data_dir: str | Path | None) -> np.ndarray:
    """The fixed PQ codes [V, C] of a run's item table, from `item_table.assign` (seeded):
    svd of the train interactions, k-means over the item text vectors or over the teacher's table."""
    table, seed = desc["item_table"], spec.seed
    codes, size, assign = int(table["codes"]), int(table.get("codebook", 256)), table.get("assign", "svd")
    if data_dir is None:
        raise ValueError("a PQ item table needs the prepared data (build(spec, desc, data_dir))")
    if assign == "svd":
        users, items = train_interactions(data_dir)
        return item_tables.svd_codes(users, items, desc["num_items"], codes, size, seed)
    if assign == "text":
        vectors = spec.text.vectors if spec.text is not None else Path(data_dir).parent / rundir.ITEM_TEXT / VECTORS
        if not Path(vectors).exists():
            raise RaykdError(f"item_table.assign text needs the item text vectors {vectors}: run `raykd embed-items "
                             "CONFIG` (teacher.item_text=true, data.item_text set)")
        vecs = text.reduce(load_vectors(vectors), desc["dim"])
    elif assign == "teacher":
        if spec.kd is None or not spec.kd.transfer_from:
            raise RaykdError("item_table.assign teacher needs the teacher's item table: set distill.transfer=true")
        vecs = teacher_table(spec.kd.transfer_from, desc["dim"])
    else:
        raise ValueError(f"unknown item_table.assign {assign!r}; valid: svd, text, teacher")
    return item_tables.kmeans_codes(vecs[1:], codes, size, seed)[0]


def train_interactions(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Every training interaction as (user row, item index) arrays, read a shard at a time."""
    users, items, start = [], [], 0
    for path in sequences.shard_paths(data_dir):
        train = pq.read_table(path, columns=["train"])["train"].combine_chunks()
        lengths = np.diff(train.offsets.to_numpy())
        users.append(np.repeat(np.arange(start, start + len(lengths)), lengths))
        items.append(train.values.to_numpy().astype(np.int64))
        start += len(lengths)
    return np.concatenate(users), np.concatenate(items)


def text_dim(item_text: str | Path, model_dim: int) -> int:
    """Width of the fused text vectors: the model's width, or fewer if the vectors have less rank."""
    return min(model_dim, pq.read_schema(item_text).field("vector").type.list_size)


def load_vectors(path: str | Path) -> np.ndarray:
    """[V + 1, d] float32 item text vectors from embed-items' vectors.parquet (row 0 = padding)."""
    table = pq.read_table(path)
    d = table.schema.field("vector").type.list_size
    out = np.zeros((table.num_rows + 1, d), np.float32)
    out[table["index"].to_numpy()] = table["vector"].combine_chunks().values.to_numpy().reshape(-1, d)
    return out


def item_log_q(data_dir: str | Path) -> list[float]:
    """log of each item's share of training interactions (add-one smoothed; entry 0 = padding)."""
    counts = pq.read_table(Path(data_dir) / rundir.ITEMS, columns=["count"])["count"].to_numpy()
    q = np.concatenate([[1.0], counts + 1.0])
    return np.log(q / q.sum()).tolist()


# ---------------------------------------------------------------- the loss, chosen once

Soft = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # teacher idx, logits, rest


class Loss(Protocol):
    def __call__(self, hidden: torch.Tensor, core: torch.nn.Module, target: torch.Tensor, soft: Soft) -> torch.Tensor:
        """The loss of the real positions: hidden [N, D], their targets [N], their soft labels."""


def sampled_softmax(train: TrainConfig, num_items: int) -> bool:
    """Whether a run trains with the sampled softmax: `loss: sampled`, or `auto` on a large catalogue."""
    return train.loss == "sampled" or (train.loss == "auto" and num_items > SAMPLED_ABOVE_ITEMS)


def sampling_log_q(spec: RunSpec, desc: dict, data_dir: str | Path, device) -> torch.Tensor | None:
    """log Q(item) of the sampler when this run samples its softmax (else None: a full softmax)."""
    if not sampled_softmax(spec.train, desc["num_items"]):
        return None
    return torch.tensor(item_log_q(data_dir), device=device)


def make_loss(spec: RunSpec, log_q: torch.Tensor | None, sparse: bool = False) -> Loss:
    """The training loss of this run, built once from its spec.

    `train.loss: full` scores the whole catalogue (losses.distill_loss; cross-entropy alone without
    a KD term). `sampled` never builds the [N, V] logits: with a KD term every position scores its
    teacher's top-K, its target and `kd_negatives` items drawn for it
    (sampled_losses.sampled_distill_loss); a student without one (a no-KD twin, or alpha 0) scores
    its target and as many drawn items (row_sampled_softmax_loss); a teacher uses the log-Q
    sampled softmax over `num_negatives` negatives shared by the batch. `sparse`: the sampled losses
    gather table rows with sparse gradients (`sparse_table`).
    """
    tc, kd = spec.train, spec.kd
    if kd is not None and kd.loss not in losses.KINDS:
        raise ValueError(f"unknown distillation loss {kd.loss!r}; valid kinds: {', '.join(losses.KINDS)}")
    sampled = log_q is not None  # sampling_log_q: the sampled softmax, as `sampled_softmax` decided
    if kd is None or kd.alpha == 0:
        if sampled and spec.role != "teacher":
            return lambda h, core, y, soft: sampled_losses.row_sampled_softmax_loss(
                h, core.item_table(), y, tc.kd_negatives, log_q, sparse=sparse)
        if sampled:
            return lambda h, core, y, soft: sampled_losses.sampled_softmax_loss(
                h, core.item_table(), y, tc.num_negatives, log_q, sparse=sparse)
        return lambda h, core, y, soft: losses.cross_entropy(core.score(h).float(), y)
    if sampled:
        return lambda h, core, y, soft: sampled_losses.sampled_distill_loss(
            h, core.item_table(), y, soft[0], soft[1], kd.alpha, kd.temperature, kd.loss, tc.num_negatives, log_q,
            teacher_rest=soft[2], row_negatives=tc.kd_negatives, sparse=sparse)[0]
    return lambda h, core, y, soft: losses.distill_loss(
        core.score(h).float(), y, soft[0], soft[1], kd.alpha, kd.temperature, kd.loss, teacher_rest=soft[2])[0]


# ---------------------------------------------------------------- batches

def matrix(column: np.ndarray) -> np.ndarray:
    """A fixed-size-list column as an int64 matrix (Ray Data hands it over as rows of arrays)."""
    return np.stack(column).astype(np.int64) if column.dtype == object else column.astype(np.int64)


def soft(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Soft labels of the batch's real slots, in row-major slot order (matches `hidden[mask]`).

    Ray Data batches carry one bytes value per window (sequences.window_table): joined and viewed
    as arrays in one go; in-memory batches (shuffled_batches) already hold the rows as arrays.
    """
    idx, logit, rest = (batch.get(k) for k in sequences.SOFT_COLUMNS)
    if idx.dtype == object:
        rows = max(int((matrix(batch["target"]) > 0).sum()), 1)
        idx = np.frombuffer(b"".join(idx), dtype=np.int32)
        logit = np.frombuffer(b"".join(logit), dtype=np.float16).reshape(-1, len(idx) // rows)
        idx = idx.reshape(logit.shape)
        rest = None if rest is None else np.frombuffer(b"".join(rest), dtype=np.float32)
    if rest is not None:
        rest = torch.as_tensor(np.array(rest, dtype=np.float32), device=device)
    return (torch.as_tensor(idx.astype(np.int64), device=device),
            torch.as_tensor(logit.astype(np.float32), device=device), rest)


def worker_batch(batch_size: int, world: int, scaling: str = "fixed") -> int:
    """Windows a worker takes per step (`train.batch_scaling`). `fixed`: a global `batch_size` split over
    the workers, so the global batch (the number of steps per epoch and the learning-rate schedule) does
    not change with the number of workers; `per_worker`: every worker takes `batch_size`, so the global
    batch grows with the cluster and each of N workers takes 1/N of the steps."""
    return batch_size if scaling == "per_worker" else max(1, -(-batch_size // world))


def worker_lr(train: TrainConfig, world: int) -> float:
    """The learning rate of a run on `world` workers: `lr`, or lr × sqrt(world) under `batch_scaling:
    per_worker`, whose global batch is `world` times larger (square-root scaling, the rule for Adam:
    Krizhevsky 2014; Malladi et al., NeurIPS 2022)."""
    return train.lr * math.sqrt(world) if train.batch_scaling == "per_worker" else train.lr


SHUFFLE_WINDOWS = 4096  # windows shuffled together when streaming: with K=100 soft labels about 0.1 GB


def soft_dir_of(spec: RunSpec) -> Path | None:
    """The soft labels a run trains on: its KD soft labels when it distils (alpha > 0), else none."""
    return Path(spec.kd.soft_labels) if spec.kd is not None and spec.kd.alpha > 0 else None


def streamed_batches(data_dir: str | Path, max_len: int, soft_dir: str | Path | None, batch_size: int,
                     seed: int, buffer: int = SHUFFLE_WINDOWS) -> Iterator[dict]:
    """One epoch's batches, read from the Parquet shards as they go: the shards in a seeded order, each
    cut `sequences.CHUNK_USERS` users at a time with its soft-label shard, and shuffled within a
    bounded buffer (shuffled_batches). Memory holds at most `buffer` windows and one chunk, whatever
    the size of the log; `seed` (the run's seed and the epoch) fixes the order."""
    rng = np.random.default_rng(seed)
    pairs = sequences.training_shards(data_dir, soft_dir)
    chunks = (chunk for i in rng.permutation(len(pairs))
              for chunk in sequences.window_chunks(pairs[i][0], max_len, pairs[i][1]))
    yield from shuffled_batches(chunks, batch_size, buffer, rng)


def shuffled_batches(chunks: Iterable[dict], batch_size: int, buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """Batches of a stream of window dicts (sequences.window_chunks), shuffled within a bounded buffer.

    Chunks are pooled until the pool holds `buffer` windows; the pool is permuted and cut into whole
    batches, and the windows short of a whole batch wait in the next pool. So at most `buffer` windows
    and one chunk are held; the last batch of the stream may be short.
    """
    held, count = [], 0
    for chunk in chunks:
        held.append(chunk)
        count += len(chunk["input"])
        if count >= buffer:
            rest = yield from _pool_batches(held, batch_size, rng, whole_only=True)
            held, count = [rest], len(rest["input"])
    if count:
        yield from _pool_batches(held, batch_size, rng, whole_only=False)


def _pool_batches(held: list[dict], batch_size: int, rng: np.random.Generator, whole_only: bool):
    """Yield the pooled windows in a random order, batch by batch; return those short of a whole batch."""
    pool = sequences.concat(held)
    held.clear()  # the pool is the only copy now
    order = rng.permutation(len(pool["input"]))
    stop = len(order) - len(order) % batch_size if whole_only else len(order)
    for start in range(0, stop, batch_size):
        yield sequences.take(pool, order[start:min(start + batch_size, stop)])
    return sequences.take(pool, order[stop:])


def trim_padding(inp: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch cut to its longest real window: the leading columns that are padding in every window go.

    Windows are right-aligned (sequences.windows: inputs left-padded), so only leading columns can be
    all padding; position embeddings are right-aligned too (models.SASRec: the last column is always
    position max_len - 1), pads are masked as keys, and the real slots keep their row-major order, so
    the loss, `hidden[target > 0]` and the soft labels are those of the untrimmed batch.
    """
    real = (target > 0).any(0)
    first = int(real.argmax()) if real.any() else target.shape[1] - 1
    return inp[:, first:], target[:, first:]


def windows_in_memory(data_dir: str | Path, max_len: int, soft_dir: str | Path | None = None) -> dict:
    """All training windows of a prepared run as one window dict (sequences.window_chunks). For tests
    and benchmarks on small data: training streams its windows (streamed_batches, Ray Data)."""
    return sequences.concat([sequences.window_arrays(shard, max_len, soft)
                             for shard, soft in sequences.training_shards(data_dir, soft_dir)])


# ---------------------------------------------------------------- the step and the epoch

def validation_users(num_users: int, sample: int, seed: int) -> np.ndarray:
    """The users validation scores during training: all of them, or a fixed seeded sample of `sample`.

    Sorted, and the same on every rank and every epoch (so epochs compare like with like); a DDP
    run then splits them over ranks. `sample` 0 (or at least `num_users`) means every user.
    """
    if sample == 0 or sample >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, sample, replace=False))


class Progress:
    """A line every `every_s` seconds inside a long epoch: steps, windows/s and, when the epoch's
    size is known, the ETA. Short epochs print nothing (the epoch line follows soon)."""

    def __init__(self, name: str, epoch: int, every_s: float, windows: int | None, say=print):
        self.name, self.epoch, self.every_s, self.windows, self.say = name, epoch, every_s, windows, say
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, steps: int, windows: int) -> None:
        self.done += windows
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = ""
        if self.windows:
            eta = f", {100 * self.done / self.windows:.0f}% of the epoch, ETA {_clock(max(self.windows - self.done, 0) / rate)}"
        self.say(f"{self.name}: epoch {self.epoch + 1} step {steps}, {rate:,.0f} windows/s{eta}")


class ValidationProgress:
    """A line every `every_s` seconds while an epoch's validation runs: users done, users/s, ETA
    (for a DDP run, rank 0's share). A short validation prints nothing."""

    def __init__(self, name: str, epoch: int, every_s: float, say=print):
        self.name, self.epoch, self.every_s, self.say = name, epoch, every_s, say
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        self.say(f"{self.name}: epoch {self.epoch + 1} validation, {done:,} of {total:,} users "
                 f"({100 * done / max(total, 1):.0f}%), {rate:,.0f} users/s, ETA {_clock(max(total - done, 0) / rate)}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def train_epoch(model, core, optimizer, batches: Iterable[dict], loss: Loss, distill: bool, device,
                amp, progress: Progress | None = None) -> tuple[float, int]:
    """One pass over `batches`; returns (summed loss, number of batches)."""
    model.train()
    loss_sum, count = 0.0, 0
    for batch in batches:
        inp, target = trim_padding(matrix(batch["input"]), matrix(batch["target"]))
        inp, target = torch.as_tensor(inp, device=device), torch.as_tensor(target, device=device)
        mask = target > 0
        labels = soft(batch, device) if distill else (None, None, None)
        with amp:
            value = loss(model(inp)[mask], core, target[mask], labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        loss_sum += float(value.detach())
        count += 1
        if progress is not None:
            progress.step(count, len(inp))
    return loss_sum, count


def should_stop(state: dict, patience: int, min_epochs: int = 0) -> bool:
    """Early stopping: `patience` epochs without a gain, never before `min_epochs` epochs ran.

    The floor keeps a distilled student from being stopped in the plateau it often goes through
    before it climbs (seen when more workers made fewer, larger steps per epoch).
    """
    return state["bad_epochs"] >= patience and state["epoch"] + 1 >= min_epochs


def checkpoint_due(improved: bool, final: bool, epoch_s: float, save_s: float, cheap: float = 0.05) -> bool:
    """Whether to write a checkpoint after this epoch: always while the last one took at most
    `cheap` of an epoch; otherwise when validation improved (the best model) and after the last
    epoch (what resume and export read). A restart then redoes at most the epochs since the best."""
    return improved or final or save_s <= cheap * epoch_s


def epoch_report(state: dict, h: dict, final: bool) -> dict:
    """The report of one epoch (epochs from 0: ASHA's clock; epoch lines and tracking show them from 1)."""
    best = state["best"]
    return {"epoch": h["epoch"], "loss": h["loss"], "val_ndcg@10": h["ndcg@10"],
            **{f"val_{k}": h[k] for k in VAL_KEYS if k != "ndcg@10"},
            "best_val_ndcg@10": best["metrics"]["ndcg@10"], "best_epoch": best["epoch"],
            "epoch_s": h["seconds"], "final": final}


Report = Callable[[dict, bool], "float | None"]  # (epoch report, checkpoint due) -> seconds the checkpoint took


class EpochRunner:
    """The one owner of a run's epochs: state, best weights, early stopping, resume, the report.

    `model` may be wrapped (DDP); `batches(epoch)` yields that epoch's batches and
    `validate(core, progress)` returns the VAL_KEYS metrics (a DDP run reduces them over ranks
    inside it), calling `progress(done, total)` (None: no lines) as users are scored. `run(report)` trains
    the remaining epochs and calls `report(epoch_report, checkpoint_due)` after each; the driver
    saves a checkpoint there (`save`) when it is due, or whenever it likes.
    """

    say: Callable[[str], None] | None = None  # where in-epoch progress lines go (None: none)
    windows: int | None = None  # this process's windows per epoch, when known (for the ETA)

    def __init__(self, spec: RunSpec, model: torch.nn.Module, desc: dict, device,
                 batches: Callable[[int], Iterable[dict]],
                 validate: Callable[[torch.nn.Module, Callable[[int, int], None] | None], dict],
                 log_q: torch.Tensor | None, world: int = 1):
        self.spec, self.model, self.core, self.desc, self.device = spec, model, models.unwrap(model), desc, device
        self.batches, self.validate = batches, validate
        tc = spec.train
        self.optimizer = make_optimizer(self.core, tc, world)
        self.loss = make_loss(spec, log_q, sparse=isinstance(self.optimizer, TableAndRest))
        self.distill = spec.kd is not None and spec.kd.alpha > 0
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        self.state = {"epoch": -1, "best": {"epoch": -1, "metrics": {"ndcg@10": -1.0}}, "bad_epochs": 0,
                      "history": []}
        self.best = checkpoints.weights(self.core)

    def epoch(self, epoch: int) -> dict:
        """Train epoch `epoch` (from 0), validate, update the state; return its history entry."""
        t0 = time.perf_counter()
        progress = None
        if self.say is not None:
            progress = Progress(self.spec.name, epoch, self.spec.train.progress_s, self.windows, self.say)
        loss_sum, n = train_epoch(self.model, self.core, self.optimizer, self.batches(epoch), self.loss,
                                  self.distill, self.device, self.amp, progress)
        said = None if self.say is None else ValidationProgress(self.spec.name, epoch, self.spec.train.progress_s,
                                                                 self.say)
        val = self.validate(self.core, said)
        val = {k: val[k] for k in VAL_KEYS}
        state = self.state
        state["epoch"] = epoch
        improved = val["ndcg@10"] > state["best"]["metrics"]["ndcg@10"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if improved:
            state["best"] = {"epoch": epoch, "metrics": val}
            self.best = checkpoints.weights(self.core)
        entry = {"epoch": epoch, "loss": loss_sum / max(n, 1), **val, "seconds": time.perf_counter() - t0,
                 "steps": n}
        state["history"].append(entry)
        return entry

    def stop(self) -> bool:
        return should_stop(self.state, self.spec.train.patience, self.spec.train.min_epochs)

    def run(self, report: Report) -> None:
        """Train from after the last finished epoch to the end or an early stop."""
        epochs, save_s = self.spec.train.epochs, 0.0
        for epoch in range(self.state["epoch"] + 1, epochs):
            if self.stop():  # resumed a run that had already stopped early
                break
            if self.spec.before_epoch is not None:
                self.spec.before_epoch(epoch)  # a test hook (fault injection); None in real runs
            h = self.epoch(epoch)
            stop = self.stop()
            entry = epoch_report(self.state, h, final=stop or epoch + 1 >= epochs)
            due = checkpoint_due(self.state["bad_epochs"] == 0, entry["final"], h["seconds"], save_s)
            seconds = report(entry, due)
            save_s = save_s if seconds is None else seconds
            if stop:
                break

    def save(self, path: str | Path) -> None:
        checkpoints.save(path, self.core, self.optimizer, self.state, self.desc, self.best)

    def restore(self, path: str | Path) -> None:
        self.state, self.best = checkpoints.load(path, self.core, self.optimizer, self.device)
        self.state["resumed"] = self.state.get("resumed", 0) + 1

    def summary(self) -> dict:
        """Best epoch counted from 1, valid metrics, history (epochs from 1), parameters."""
        state = self.state
        return {"best_epoch": state["best"]["epoch"] + 1, "valid": state["best"]["metrics"],
                "epochs_run": state["epoch"] + 1, "history": [{**h, "epoch": h["epoch"] + 1} for h in state["history"]],
                "params": models.count_params(self.core), "sparse_table": sparse_table(self.spec, self.desc)}


def local_runner(spec: RunSpec, data_dir: str | Path, device: str = "cpu") -> EpochRunner:
    """An EpochRunner in this process: windows streamed from the shards (streamed_batches, seeded per
    epoch), validation over `validation_users`; progress lines through `console.say`."""
    desc = model_desc(spec, data_dir)
    model = build(spec, desc, data_dir).to(device)
    soft_dir, max_len, batch_size = soft_dir_of(spec), desc["max_len"], spec.train.batch_size
    users = validation_users(sequences.num_users(data_dir), spec.train.val_users, spec.seed)
    valid = sequences.eval_inputs(sequences.read_split(data_dir, users), "valid")  # only those users read
    log_q = sampling_log_q(spec, desc, data_dir, device)
    runner = EpochRunner(spec, model, desc, device,
                         batches=lambda epoch: streamed_batches(data_dir, max_len, soft_dir, batch_size,
                                                                spec.seed * 1000 + epoch),
                         validate=lambda core, progress: metrics.evaluate_model(core, *valid, device=device,
                                                                                progress=progress),
                         log_q=log_q)
    runner.say, runner.windows = console.say, sequences.count_windows(data_dir, max_len)
    return runner


def fit_local(spec: RunSpec, data_dir: str | Path, device: str = "cpu", log=print) -> tuple[torch.nn.Module, dict]:
    """Train one model in this process with the same step, epoch and early stopping as Ray Train.

    Returns the best-on-validation model and a summary (best_epoch counted from 1, valid metrics, history).
    """
    runner = local_runner(spec, data_dir, device=device)
    epochs = spec.train.epochs

    def line(report: dict, due: bool) -> None:
        log(f"{spec.name}: epoch {report['epoch'] + 1}/{epochs} loss {report['loss']:.4f} "
            f"val NDCG@10 {report['val_ndcg@10']:.4f} ({report['epoch_s']:.1f}s)")

    runner.run(line)
    runner.core.load_state_dict(runner.best)
    return runner.core.eval(), runner.summary()
