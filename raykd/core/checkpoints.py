"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint directory holds

    last/           model.safetensors + model.json: weights after the epoch (resume from here)
    best/           the same for the epoch that was best on validation NDCG@10 so far
    optimizer.safetensors  Adam state, flattened to `<param index>.<name>` tensors
    state.json      epoch, best epoch and metrics, epochs without gain, per-epoch history
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raykd.core import models, rundir


def save(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         desc: dict, best_weights: dict[str, torch.Tensor]) -> None:
    """Write a checkpoint: current weights, the best weights so far, optimizer and state."""
    path = Path(path)
    models.save_model(path / "last", model, desc)
    (path / "best").mkdir(parents=True, exist_ok=True)
    save_file(best_weights, str(path / "best" / rundir.WEIGHTS), metadata={"format": "pt"})
    shutil.copy(path / "last" / rundir.MODEL_JSON, path / "best" / rundir.MODEL_JSON)
    save_file(_flatten_optimizer(optimizer), str(path / "optimizer.safetensors"))
    (path / "state.json").write_text(json.dumps(state, indent=1))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (what `best/` is written from)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in models.unwrap(model).state_dict().items()}


def read_state(path: str | Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model weights and optimizer state in place; return the state and best weights."""
    path = Path(path)
    weights = load_file(str(path / "last" / rundir.WEIGHTS), device=str(device))
    models.unwrap(model).load_state_dict(weights)
    _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors"), device=str(device)))
    return read_state(path), load_file(str(path / "best" / rundir.WEIGHTS))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for name, value in per_param.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            flat[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return flat


def _restore_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, tensor in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    sd["state"] = state
    optimizer.load_state_dict(sd)
