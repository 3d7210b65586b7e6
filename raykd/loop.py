"""The training step and epoch for teacher and students, without Ray.

`train.train_loop` runs these on Ray Train workers (DDP); `fit_local` runs them in one process
(notebooks, benchmarks, tests). A run is described by one dict, the loop config:

    desc         model description (models.build_model), incl. text_dim when text is fused
    train        TrainConfig as a dict (epochs, batch_size, lr, weight_decay, patience, min_epochs, loss, ...)
    seed         init and shuffle seed
    alpha, temperature, kd_loss   distillation settings (alpha 0 = hard labels only)
    item_text    embed-items' vectors.parquet, or None
    text_mode    "fuse" | "init" | "both": how a text teacher uses the reduced vectors
    init_from    teacher folder(s) whose item representations initialise this model's items, or None
    init_std     per-column std of an initialised item table
    row_negatives  a student: with `loss: sampled` and alpha 0, negatives drawn per position

Batches are dicts of NumPy arrays: input/target [B, L] (0 = padding) and, when distilling,
t_idx/t_logits/t_rest, one bytes object per window holding its real slots' soft labels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raykd import checkpoints, losses, metrics, models, sampled_losses, sequences, text


def build(config: dict) -> torch.nn.Module:
    """The model for this run, with text vectors and item-table initialisation applied."""
    torch.manual_seed(config["seed"])
    model = models.build_model(config["desc"])
    if config.get("item_text"):
        raw = load_vectors(config["item_text"])
        mode = config.get("text_mode", "fuse")
        if mode in ("fuse", "both"):
            width = config["desc"]["text_dim"]
            reduced = text.reduce(raw, width)
            model.item_text[:, :reduced.shape[1]] = torch.from_numpy(reduced)  # rank < width: zero columns
        if mode in ("init", "both"):
            text.init_item_table(model, text.reduce(raw, model.dim), config.get("init_std", 0.02))
    if config.get("init_from"):
        folders = config["init_from"] if isinstance(config["init_from"], list) else [config["init_from"]]
        # an ensemble's members side by side: PCA finds the directions they share
        items = np.concatenate([text.teacher_items(models.load_model(f)[0]) for f in folders], 1)
        reduced = text.reduce(items, model.dim)
        text.init_item_table(model, reduced, config.get("init_std", 0.02))
    return model


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
    counts = pq.read_table(Path(data_dir) / "items.parquet", columns=["count"])["count"].to_numpy()
    q = np.concatenate([[1.0], counts + 1.0])
    return np.log(q / q.sum()).tolist()


KD_NEGATIVES = 64  # `train.loss: sampled` with a KD term: negatives drawn per training position


def train_epoch(model, core, optimizer, batches, config: dict, device, amp, log_q) -> tuple[float, int]:
    """One pass over `batches`; returns (summed loss, number of batches).

    `train.loss: sampled` never builds the [N, V] logits: with a KD term (alpha > 0) every position
    scores its teacher's top-K, its target and `kd_negatives` (default KD_NEGATIVES) items drawn for
    it (sampled_losses.sampled_distill_loss); a student without one (`row_negatives`: a no-KD twin) scores
    its target and as many drawn items (sampled_losses.row_sampled_softmax_loss); a teacher uses the log-Q
    sampled softmax over `num_negatives` negatives shared by the batch. `full` scores the whole catalogue (losses.distill_loss).
    """
    tc = config["train"]
    model.train()
    loss_sum, count = 0.0, 0
    alpha = config["alpha"]
    for batch in batches:
        inp = torch.as_tensor(matrix(batch["input"]), device=device)
        target = torch.as_tensor(matrix(batch["target"]), device=device)
        mask = target > 0
        t_idx, t_logit, t_rest = soft(batch, device) if alpha > 0 else (None, None, None)
        with amp:
            hidden = model(inp)[mask]
            if tc["loss"] == "sampled" and alpha == 0 and config.get("row_negatives"):  # a no-KD student
                loss = sampled_losses.row_sampled_softmax_loss(hidden, core.item_table(), target[mask],
                                                       tc.get("kd_negatives", KD_NEGATIVES), log_q)
            elif tc["loss"] == "sampled":
                loss, _, _ = sampled_losses.sampled_distill_loss(hidden, core.item_table(), target[mask], t_idx, t_logit,
                                                         alpha, config["temperature"], config["kd_loss"],
                                                         tc["num_negatives"], log_q, teacher_rest=t_rest,
                                                         row_negatives=tc.get("kd_negatives", KD_NEGATIVES))
            else:
                loss, _, _ = losses.distill_loss(core.score(hidden).float(), target[mask], t_idx, t_logit,
                                                 alpha, config["temperature"], config["kd_loss"],
                                                 teacher_rest=t_rest)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        count += 1
    return loss_sum, count


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


def should_stop(state: dict, tc: dict) -> bool:
    """Early stopping: `patience` epochs without a gain, never before `min_epochs` epochs ran.

    The floor keeps a distilled student from being stopped in the plateau it often goes through
    before it climbs (seen when more workers made fewer, larger steps per epoch).
    """
    return state["bad_epochs"] >= tc["patience"] and state["epoch"] + 1 >= tc.get("min_epochs", 0)


def checkpoint_due(improved: bool, final: bool, epoch_s: float, save_s: float, cheap: float = 0.05) -> bool:
    """Whether to write a checkpoint after this epoch: always while the last one took at most
    `cheap` of an epoch; otherwise when validation improved (the best model) and after the last
    epoch (what resume and export read). A restart then redoes at most the epochs since the best."""
    return improved or final or save_s <= cheap * epoch_s


def worker_batch(batch_size: int, world: int) -> int:
    """Per-worker batch for a global `batch_size`: the global batch (and so the number of steps
    per epoch and the learning-rate schedule) does not change with the number of workers."""
    return max(1, -(-batch_size // world))


def windows_in_memory(data_dir: str | Path, max_len: int, soft_dir: str | Path | None = None) -> dict:
    """All training windows of a prepared run as NumPy arrays: input/target [W, max_len] int32 and,
    with soft labels, t_idx/t_logits [R, K] (t_rest [R]) for the R real slots in window order, and
    t_start [W + 1], where each window's rows begin. Plain numeric arrays: `ray.put` shares them."""
    parts = [sequences.window_arrays(p, max_len, Path(soft_dir) / p.name if soft_dir else None)
             for p in sequences.shard_paths(data_dir)]
    cols = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    if soft_dir:
        cols["t_start"] = np.concatenate([[0], np.cumsum((cols["target"] > 0).sum(1), dtype=np.int64)])
    return cols


def shuffled_batches(cols: dict, batch_size: int, seed: int):
    """Batches of `cols` in a seeded random order (the in-process twin of Ray Data's shuffle)."""
    order = np.random.default_rng(seed).permutation(len(cols["input"]))
    for start in range(0, len(order), batch_size):
        yield take(cols, order[start:start + batch_size])


def take(cols: dict, rows: np.ndarray) -> dict:
    """The windows `rows` of `cols`, with their soft-label rows gathered in one vectorised step."""
    batch = {"input": cols["input"][rows], "target": cols["target"][rows]}
    if "t_start" in cols:
        first, count = cols["t_start"][rows], np.diff(cols["t_start"])[rows]
        slots = np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())
        batch.update({k: cols[k][slots] for k in sequences.SOFT_COLUMNS if k in cols})
    return batch


VAL_KEYS = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20")  # what train.train_loop records per epoch


class LocalRun:
    """One model trained in this process: the epoch, validation, early-stopping state and
    checkpoints (raykd.checkpoints, the format Ray Train writes) that `fit_local` and an in-process
    Tune trial (raykd.tune_trial) share. `cols`: windows already in memory (else read here)."""

    def __init__(self, config: dict, data_dir: str | Path, cols: dict | None = None, device: str = "cpu"):
        tc = config["train"]
        self.config, self.device = config, device
        self.model = build(config).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
        soft_dir = config.get("soft_dir") if config["alpha"] > 0 else None
        self.cols = cols if cols is not None else windows_in_memory(data_dir, config["desc"]["max_len"], soft_dir)
        self.valid = sequences.eval_inputs(sequences.read_split(data_dir), "valid")
        self.log_q = torch.tensor(item_log_q(data_dir), device=device) if tc["loss"] == "sampled" else None
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                    else torch.autocast("cpu", enabled=False))
        self.state = {"epoch": -1, "best": {"epoch": -1, "metrics": {"ndcg@10": -1.0}}, "bad_epochs": 0,
                      "history": []}
        self.best = checkpoints.weights(self.model)

    def epoch(self, epoch: int) -> dict:
        """Train epoch `epoch` (from 0), validate, update the state; return its history entry."""
        t0 = time.perf_counter()
        tc, state = self.config["train"], self.state
        batches = shuffled_batches(self.cols, tc["batch_size"], self.config["seed"] * 1000 + epoch)
        loss_sum, n = train_epoch(self.model, self.model, self.optimizer, batches, self.config, self.device,
                                  self.amp, self.log_q)
        val = metrics.evaluate_model(self.model, *self.valid, device=self.device)
        val = {k: val[k] for k in VAL_KEYS}
        state["epoch"] = epoch
        improved = val["ndcg@10"] > state["best"]["metrics"]["ndcg@10"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if improved:
            state["best"] = {"epoch": epoch, "metrics": val}
            self.best = checkpoints.weights(self.model)
        entry = {"epoch": epoch, "loss": loss_sum / max(n, 1), **val, "seconds": time.perf_counter() - t0,
                 "steps": n}
        state["history"].append(entry)
        return entry

    def stop(self) -> bool:
        return should_stop(self.state, self.config["train"])

    def save(self, path: str | Path) -> None:
        checkpoints.save(path, self.model, self.optimizer, self.state, self.config["desc"], self.best)

    def restore(self, path: str | Path) -> None:
        self.state, self.best = checkpoints.load(path, self.model, self.optimizer, self.device)
        self.state["resumed"] = self.state.get("resumed", 0) + 1

    def summary(self) -> dict:
        """Best epoch counted from 1, valid metrics, history (epochs from 1), parameters."""
        state = self.state
        return {"best_epoch": state["best"]["epoch"] + 1, "valid": state["best"]["metrics"],
                "epochs_run": state["epoch"] + 1, "history": [{**h, "epoch": h["epoch"] + 1} for h in state["history"]],
                "params": models.count_params(self.model)}


def fit_local(config: dict, data_dir: str | Path, soft_dir: str | Path | None = None, device: str = "cpu",
              log=print) -> tuple[torch.nn.Module, dict]:
    """Train one model in this process with the same step, epoch and early stopping as Ray Train.

    Returns the best-on-validation model and a summary (best_epoch counted from 1, valid metrics, history).
    """
    run = LocalRun({**config, "soft_dir": soft_dir or config.get("soft_dir")}, data_dir, device=device)
    epochs = config["train"]["epochs"]
    for epoch in range(epochs):
        h = run.epoch(epoch)
        log(f"{config.get('name', 'train')}: epoch {epoch + 1}/{epochs} loss {h['loss']:.4f} "
            f"val NDCG@10 {h['ndcg@10']:.4f} ({h['seconds']:.1f}s)")
        if run.stop():
            break
    run.model.load_state_dict(run.best)
    return run.model.eval(), run.summary()
