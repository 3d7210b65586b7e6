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

Batches are dicts of NumPy arrays: input/target [B, L] (0 = padding) and, when distilling,
t_idx/t_logits/t_rest, one bytes object per window holding its real slots' soft labels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raykd import losses, metrics, models, sequences, text


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


def train_epoch(model, core, optimizer, batches, config: dict, device, amp, log_q) -> tuple[float, int]:
    """One pass over `batches`; returns (summed loss, number of batches)."""
    tc = config["train"]
    model.train()
    loss_sum, count = 0.0, 0
    for batch in batches:
        inp = torch.as_tensor(matrix(batch["input"]), device=device)
        target = torch.as_tensor(matrix(batch["target"]), device=device)
        mask = target > 0
        with amp:
            hidden = model(inp)[mask]
            if tc["loss"] == "sampled" and config["alpha"] == 0:
                loss = losses.sampled_softmax_loss(hidden, core.item_table(), target[mask],
                                                   tc["num_negatives"], log_q)
            else:
                t_idx, t_logit, t_rest = soft(batch, device) if config["alpha"] > 0 else (None, None, None)
                loss, _, _ = losses.distill_loss(core.score(hidden).float(), target[mask], t_idx, t_logit,
                                                 config["alpha"], config["temperature"], config["kd_loss"],
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
    """Soft labels of the batch's real slots, in row-major slot order (matches `hidden[mask]`)."""
    idx = np.frombuffer(b"".join(batch["t_idx"]), dtype=np.int32)
    logit = np.frombuffer(b"".join(batch["t_logits"]), dtype=np.float16)
    rows = max(int((matrix(batch["target"]) > 0).sum()), 1)
    k = len(idx) // rows
    rest = None
    if "t_rest" in batch:
        rest = torch.as_tensor(np.frombuffer(b"".join(batch["t_rest"]), dtype=np.float32).copy(), device=device)
    return (torch.as_tensor(idx.reshape(-1, k).astype(np.int64), device=device),
            torch.as_tensor(logit.reshape(-1, k).astype(np.float32), device=device), rest)


def should_stop(state: dict, tc: dict) -> bool:
    """Early stopping: `patience` epochs without a gain, never before `min_epochs` epochs ran.

    The floor keeps a distilled student from being stopped in the plateau it often goes through
    before it climbs (seen when more workers made fewer, larger steps per epoch).
    """
    return state["bad_epochs"] >= tc["patience"] and state["epoch"] + 1 >= tc.get("min_epochs", 0)


def worker_batch(batch_size: int, world: int) -> int:
    """Per-worker batch for a global `batch_size`: the global batch (and so the number of steps
    per epoch and the learning-rate schedule) does not change with the number of workers."""
    return max(1, -(-batch_size // world))


def windows_in_memory(data_dir: str | Path, max_len: int, soft_dir: str | Path | None = None) -> dict:
    """All training windows of a prepared run as NumPy columns (soft labels attached when given)."""
    tables = [sequences.window_table(p, max_len, Path(soft_dir) / p.name if soft_dir else None)
              for p in sequences.shard_paths(data_dir)]
    cols = {}
    for name in tables[0].column_names:
        parts = [t[name].combine_chunks() for t in tables]
        if name in ("input", "target"):
            cols[name] = np.concatenate([p.values.to_numpy().reshape(len(p), -1) for p in parts])
        else:
            cols[name] = np.array([v for p in parts for v in p.to_pylist()], dtype=object)
    return cols


def shuffled_batches(cols: dict, batch_size: int, seed: int):
    """Batches of `cols` in a seeded random order (the in-process twin of Ray Data's shuffle)."""
    order = np.random.default_rng(seed).permutation(len(cols["input"]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield {k: v[rows] for k, v in cols.items()}


def fit_local(config: dict, data_dir: str | Path, soft_dir: str | Path | None = None, device: str = "cpu",
              log=print) -> tuple[torch.nn.Module, dict]:
    """Train one model in this process with the same step, epoch and early stopping as Ray Train.

    Returns the best-on-validation model and a summary (best_epoch counted from 1, valid metrics, history).
    """
    tc = config["train"]
    soft_dir = soft_dir or config.get("soft_dir")
    model = build(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    cols = windows_in_memory(data_dir, config["desc"]["max_len"], soft_dir if config["alpha"] > 0 else None)
    split = sequences.read_split(data_dir)
    hist, targets, seen = sequences.eval_inputs(split, "valid")
    log_q = torch.tensor(item_log_q(data_dir), device=device) if tc["loss"] == "sampled" else None
    state = {"epoch": -1, "best": {"epoch": -1, "metrics": {"ndcg@10": -1.0}}, "bad_epochs": 0, "history": []}
    best = {k: v.clone() for k, v in model.state_dict().items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    for epoch in range(tc["epochs"]):
        t0 = time.perf_counter()
        batches = shuffled_batches(cols, tc["batch_size"], config["seed"] * 1000 + epoch)
        loss_sum, n = train_epoch(model, model, optimizer, batches, config, device, amp, log_q)
        val = metrics.evaluate_model(model, hist, targets, seen, device=device)
        state["epoch"] = epoch
        improved = val["ndcg@10"] > state["best"]["metrics"]["ndcg@10"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if improved:
            state["best"] = {"epoch": epoch, "metrics": val}
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["history"].append({"epoch": epoch + 1, "loss": loss_sum / max(n, 1), "ndcg@10": val["ndcg@10"],
                                 "seconds": time.perf_counter() - t0})
        log(f"{config.get('name', 'train')}: epoch {epoch + 1}/{tc['epochs']} loss {loss_sum / max(n, 1):.4f} "
            f"val NDCG@10 {val['ndcg@10']:.4f} ({time.perf_counter() - t0:.1f}s)")
        if should_stop(state, tc):
            break
    model.load_state_dict(best)
    summary = {"best_epoch": state["best"]["epoch"] + 1, "valid": state["best"]["metrics"],
               "epochs_run": state["epoch"] + 1, "history": state["history"],
               "params": models.count_params(model)}
    return model.eval(), summary
