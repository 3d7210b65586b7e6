"""A self-contained model bundle: one folder that a server or a batch job can use alone, anywhere.

    BUNDLE/
      model.safetensors   the weights (no pickle)
      model.json          how to rebuild the model (family, sizes, max_len) and its fingerprint
      items.parquet       item vocabulary: index (1..I) -> raw_id, and count (training popularity,
                          the fallback for histories with no known item)
      model.pt            TorchScript graph (--format torchscript)
      model.onnx          ONNX graph (--format onnx)
      users.parquet       user vocabulary: index -> raw_id          (--with-histories)
      sequences/          each user's known history, as prepared    (--with-histories)
      stats.json          data statistics of the run
      metrics.json        the model's training summary (validation metrics, KD settings), if any
      ann/                approximate index (--ann): index.faiss, ann.json (raykd.core.ann), with
                          the model's vocabulary digest and recall@10 against exact
      README.md           the model card
      manifest.json       written last: kind "bundle", format, source, the vocabulary digest the
                          model was trained on, each file with its size and SHA-256

`Recommender(BUNDLE)` (so `raykd serve BUNDLE` and, with histories, `raykd recommend BUNDLE`)
loads it as it loads a run's model, and refuses it when items.parquet is not the vocabulary of
the manifest's `vocab_digest`. The graphs need neither raykd nor its classes: they take
`history`, int64 [B, max_len] item indices left-padded with 0 (an item's index is its row in
items.parquet), and return `scores`, float32 [B, num_items + 1], the next-item scores (column 0
is padding and holds float32's most negative value). Every row needs at least one item.

Heavy (torch at import): imported by `raykd export` only when it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raykd.core import ann, models, rundir
from raykd.core.errors import RaykdError
from raykd.serve.recommender import MODEL_FILES

FORMATS = ("safetensors", "torchscript", "onnx")
GRAPH_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
PARITY_ATOL = 1e-3  # exported graphs must score within this of the in-process model


class LastScores(nn.Module):
    """The model as one graph: left-padded histories [B, max_len] -> next-item scores [B, num_items + 1]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.model.last_scores(seq)


class GRULastScores(nn.Module):
    """GRURec's last-position scores without packed sequences (which torch.export cannot trace).

    Histories are rotated to right padding and the GRU runs over every step; the output at the
    last real step is what the packed GRU gives there (padding comes after it). An empty row gets
    the packed model's zero state.
    """

    def __init__(self, model: models.GRURec):
        super().__init__()
        self.model = model

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        m = self.model
        seq = seq[:, -m.max_len:]
        length = seq.shape[1]
        lengths = (seq != 0).sum(1)
        steps = torch.arange(length, device=seq.device).unsqueeze(0)
        right = seq.gather(1, (steps + (length - lengths).unsqueeze(1)) % length)
        out, _ = m.gru(m.item_emb(right))
        last = out[torch.arange(seq.shape[0], device=seq.device), (lengths - 1).clamp(min=0)]
        return m.score(m.norm(last * (lengths > 0).unsqueeze(1).to(last.dtype)))


def exportable(model: nn.Module) -> nn.Module:
    """The graph to export for a model (eval mode)."""
    wrapper = GRULastScores(model) if isinstance(model, models.GRURec) else LastScores(model)
    return wrapper.eval()


def example_histories(desc: dict, rows: int = 64, seed: int = 0) -> torch.Tensor:
    """Left-padded histories of every length from 1 to max_len, for tracing and the parity check."""
    rng = np.random.default_rng(seed)
    lengths = np.resize(np.arange(1, desc["max_len"] + 1), rows)
    return models.left_pad([rng.integers(1, desc["num_items"] + 1, n) for n in lengths], desc["max_len"])


def require_onnx() -> None:
    """Fail before any work when the ONNX exporter's packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise RaykdError("--format onnx needs the onnx and onnxscript packages: pip install 'raykd[onnx]' "
                         "(onnxruntime, in the same extra, runs the exported model)") from None


def write_index(out: Path, data_dir: Path, vocab: str | None) -> dict:
    """Build the approximate index of the bundle's model into out/ann/; returns what the manifest keeps of it.

    Its recall@10 against exact scoring is measured on a seeded sample of the run's users (their
    whole histories excluded, as served), or of random histories when the data holds no users.
    """
    model, desc = models.load_model(out)
    queries, hists = ann.sample_queries(model, desc, data_dir)
    index = ann.build(model.item_table(), vocab, queries, hists)
    index.save(out / ann.INDEX_DIR)
    return {k: v for k, v in index.meta.items() if k != "table_digest"}


def copy_sources(out: Path, model_dir: Path, data_dir: Path, with_histories: bool) -> dict:
    """Copy the weights and the vocabulary (and histories), each folder as one version; returns the
    model's own manifest (read with its weights: a model published meanwhile is never mixed in)."""
    if with_histories and (not (data_dir / rundir.USERS).exists() or not (data_dir / "sequences").is_dir()):
        raise RaykdError(f"--with-histories: {data_dir} holds no user histories (users.parquet, sequences/)")
    rundir.copy_snapshot(model_dir, out, MODEL_FILES)
    source = rundir.read_manifest(out)
    (out / rundir.MANIFEST).unlink(missing_ok=True)  # the bundle writes its own, last
    histories = (rundir.USERS, "sequences") if with_histories else ()
    rundir.copy_snapshot(data_dir, out, (rundir.ITEMS, "stats.json", *histories))
    return source


def write_graph(out: Path, fmt: str) -> dict:
    """Export the bundle's model as the format's graph; returns the parity check's figures."""
    if fmt == "safetensors":
        return {}
    model, desc = models.load_model(out)
    path = out / GRAPH_FILES[fmt]
    (write_torchscript if fmt == "torchscript" else write_onnx)(model, desc, path)
    return parity(model, desc, path, fmt)


def write_torchscript(model: nn.Module, desc: dict, path: Path) -> None:
    graph = exportable(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes read as Python numbers
        traced = torch.jit.trace(graph, example_histories(desc), check_trace=False)
    torch.jit.save(traced, str(path))


def write_onnx(model: nn.Module, desc: dict, path: Path) -> None:
    require_onnx()
    graph = exportable(model)
    batch = torch.export.Dim("batch", min=1)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" lines
    try:
        with quiet[0], quiet[1], warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example_histories(desc),), str(path), input_names=["history"],
                              output_names=["scores"], dynamic_shapes={"seq": {0: batch}}, dynamo=True,
                              external_data=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter's many failure types: one clear message
        raise RaykdError(f"ONNX export of {desc['family']} failed ({type(err).__name__}: {str(err)[:300]}); "
                         "export --format torchscript or safetensors instead") from None
    finally:
        onnx_log.setLevel(level)


def run_graph(path: Path, fmt: str, histories: torch.Tensor) -> np.ndarray:
    """Scores of an exported graph, run the way a user without raykd would (torch.jit or onnxruntime)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(histories).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["scores"], {"history": histories.numpy()})[0]


def parity(model: nn.Module, desc: dict, path: Path, fmt: str) -> dict:
    """Check the exported graph against the in-process model on example histories; fail if they disagree."""
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return {"checked": False, "why": "onnxruntime is not installed"}
    histories = example_histories(desc, seed=1)
    with torch.no_grad():
        expected = model.last_scores(histories).numpy()
    got = run_graph(path, fmt, histories)
    diff = float(np.abs(got[:, 1:] - expected[:, 1:]).max())
    if got.shape != expected.shape or not diff <= PARITY_ATOL:
        raise RaykdError(f"the exported {fmt} graph scores differ from the model's by {diff:g} (shape {got.shape}): "
                         "please report this; export --format safetensors meanwhile")
    return {"checked": True, "histories": len(histories), "max_abs_diff": diff}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out: Path, info: dict) -> dict:
    """manifest.json, last and durably: kind "bundle", every file with its size and SHA-256, and `info`."""
    files = {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != rundir.MANIFEST}
    manifest = {"kind": "bundle", "bundle_version": 1, **info, "files": files}
    rundir.write_json_durable(out / rundir.MANIFEST, manifest)
    return manifest


def is_bundle(folder: Path) -> bool:
    """A folder `raykd export` wrote: its manifest says kind "bundle" (or, from before that field, has a
    bundle_version and no artifact key); a run's teacher/, student/ or data/ never does."""
    manifest = rundir.read_manifest(folder)
    return manifest.get("kind") == "bundle" or ("kind" not in manifest and "bundle_version" in manifest
                                                and "key" not in manifest)


def sync_files(folder: Path) -> None:
    """fsync every file and folder under `folder`, so a renamed bundle never holds empty files after a crash."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        rundir.fsync_dir(path)


def verify(folder: Path) -> list[str]:
    """Files of a bundle whose size or SHA-256 differ from its manifest (missing ones included)."""
    manifest = json.loads((Path(folder) / rundir.MANIFEST).read_text())
    bad = []
    for name, meta in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            bad.append(name)
    return bad
