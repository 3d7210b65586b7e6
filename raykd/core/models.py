"""Sequential recommenders: the SASRec teacher/student and a cheaper GRU student.

Every model shares one contract (RecBole-style), so training, soft labels, metrics and serving
never care which family they hold:

- `forward(seq [B, L]) -> hidden [B, L, D]`: position t predicts the item after `seq[:, t]`;
- `score(hidden [..., D]) -> logits [..., num_items + 1]`: dot product with the item table;
- `last_scores(seq [B, L]) -> [B, num_items + 1]`: next-item scores after the whole history;
- `item_table() -> [num_items + 1, D]`: the item vectors it scores against (dense, fused with
  text, or reconstructed from PQ codes: `item_table` in the description, core.item_tables).

Size (`count_params`, `count_bytes`) counts what a model reads at inference, not what it trains.

Conventions: item index 0 is padding, real items are 1..num_items. Histories are LEFT-padded
(`left_pad`), so the last position is always a real item when the history is non-empty. Inputs
longer than `max_len` keep their last `max_len` items. The padding column of every score tensor
holds `torch.finfo(dtype).min` (finite, not -inf): softmax gives it probability 0, and sums,
means or products with 0 never turn into NaN. Metrics exclude column 0 explicitly anyway.

Checkpoints are `model.safetensors` + `model.json` (the constructor description): no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from raykd.core import rundir
from raykd.core.item_tables import PQTable

DESC_KEYS = ("num_items", "dim", "layers", "heads", "max_len", "dropout")


def _init_embedding(emb: nn.Embedding) -> None:
    # GPT-2 style small init; nn.init overwrites the padding row, so zero it again.
    nn.init.normal_(emb.weight, std=0.02)
    if emb.padding_idx is not None:
        with torch.no_grad():
            emb.weight[emb.padding_idx].zero_()


def item_table_module(num_items: int, dim: int, item_table: dict | None) -> nn.Module:
    """The item table of a model: dense (nn.Embedding, row 0 padding) or, with
    `item_table: {kind: pq, codes, codebook}`, a product-quantised one (core.item_tables.PQTable)."""
    if not item_table:
        return nn.Embedding(num_items + 1, dim, padding_idx=0)  # the model inits it (_init_tables)
    if item_table.get("kind") != "pq":
        raise ValueError(f"unknown item table kind {item_table.get('kind')!r}; valid kinds: pq (or none: dense)")
    return PQTable(num_items, dim, int(item_table["codes"]), int(item_table.get("codebook", 256)))


def _init_tables(model: nn.Module) -> None:
    """Small init of a dense item table (a PQ table inits its own codebooks), last in the
    constructor so seeded models keep their random streams."""
    if isinstance(model.item_emb, nn.Embedding):
        _init_embedding(model.item_emb)


def _score(hidden: torch.Tensor, item_weight: torch.Tensor) -> torch.Tensor:
    """hidden @ items.T with the padding column pinned to the dtype's most negative value."""
    logits = hidden @ item_weight.T
    # In place is safe: matmul's backward needs its inputs, not its output.
    logits[..., 0] = torch.finfo(logits.dtype).min
    return logits


class _Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)); SASRec's FFN width."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed` [B, 1, L, L] bool: True where query t may attend to key s."""
        b, length, dim = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, Dh]
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, dim)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender (Kang & McAuley, ICDM 2018), pre-norm variant.

    Output scores are tied to the item table (dense, or a PQ table's reconstruction; one tensor,
    safe for safetensors).
    Position embeddings are right-aligned: the last history item always gets position
    max_len - 1, whatever the input length, so training and serving see the same positions.
    """

    def __init__(self, num_items: int, dim: int, layers: int, heads: int, max_len: int, dropout: float,
                 text_dim: int = 0, item_table: dict | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.num_items, self.dim, self.max_len = num_items, dim, max_len
        self.item_emb = item_table_module(num_items, dim, item_table)
        # Text fusion (teacher.item_text): a frozen language-model vector per item (a buffer, so it
        # travels in the safetensors file) through a trained projection, added to the id embedding.
        self.text_proj = nn.Linear(text_dim, dim, bias=False) if text_dim else None
        if text_dim:
            self.register_buffer("item_text", torch.zeros(num_items + 1, text_dim))
        self.pos_emb = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        _init_tables(self)
        _init_embedding(self.pos_emb)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        seq = seq[:, -self.max_len :]
        length = seq.shape[1]
        real = seq != 0
        pos = torch.arange(self.max_len - length, self.max_len, device=seq.device)
        # Zeroing pad rows keeps them from carrying a position signal into anything.
        # the history's rows only (a PQ table rebuilds just those), or the fused table's
        items = self.item_emb(seq) if self.text_proj is None else F.embedding(seq, self.item_table())
        x = self.drop(items + self.pos_emb(pos)) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        # Every query may see itself: a padding query would otherwise attend to nothing, and
        # softmax over an all-masked row is NaN. Real queries never see pads (keys are masked).
        allowed = (causal & real.unsqueeze(1)) | eye
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1))
        return self.norm(x)

    def item_table(self) -> torch.Tensor:
        """Item representations [V + 1, D]: id embedding (+ projected text vector when fused)."""
        if self.text_proj is None:
            return self.item_emb.weight
        return self.item_emb.weight + self.text_proj(self.item_text)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return _score(hidden, self.item_table())

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        return self.score(self.forward(seq)[:, -1])


class GRURec(nn.Module):
    """GRU4Rec-style student (Hidasi et al., ICLR 2016) with tied output embeddings.

    Left-padded inputs are rotated to right padding and packed, so the GRU state never runs
    over pads: outputs do not depend on how much padding a history has. `heads` is unused; it
    is accepted so both families share one constructor signature.
    """

    def __init__(self, num_items: int, dim: int, layers: int, heads: int, max_len: int, dropout: float,
                 item_table: dict | None = None):
        super().__init__()
        self.num_items, self.dim, self.max_len = num_items, dim, max_len
        self.item_emb = item_table_module(num_items, dim, item_table)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.norm = nn.LayerNorm(dim)
        _init_tables(self)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        seq = seq[:, -self.max_len :]
        length = seq.shape[1]
        lengths = (seq != 0).sum(1)
        steps = torch.arange(length, device=seq.device).unsqueeze(0)
        to_right = (steps + (length - lengths).unsqueeze(1)) % length
        to_left = (steps - (length - lengths).unsqueeze(1)) % length
        x = self.drop(self.item_emb(seq.gather(1, to_right)))
        # An all-pad row still runs one (zero) step: packing rejects zero lengths.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        out = out.gather(1, to_left.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        return self.norm(out)

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return _score(hidden, self.item_emb.weight)

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        return self.score(self.forward(seq)[:, -1])


class Ensemble(nn.Module):
    """Several trained models scored as one: the mean of their log-probabilities over the catalogue.

        log p_ens(j) = (1/N) Σ_n log softmax(s_n)_j     (a normalised geometric mean of the members)

    Scale-free, so members with differently sized logits count equally. The padding column stays
    the dtype's most negative value, as in every model here.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.max_len = max(m.max_len for m in members)
        self.num_items = members[0].num_items

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        out = torch.stack([x.float().log_softmax(-1) for x in logits]).mean(0)
        out[..., 0] = torch.finfo(out.dtype).min
        return out

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        return self.combine([m.last_scores(seq) for m in self.members])


FAMILIES: dict[str, type[nn.Module]] = {"sasrec": SASRec, "gru": GRURec}


def build_model(desc: dict) -> nn.Module:
    """Build a model from {"family", "num_items", "dim", "layers", "heads", "max_len", "dropout"}
    (optionally "text_dim", and "item_table": {"kind": "pq", "codes", "codebook", ...} for a PQ table).

    Other keys (e.g. "params" from model.json) are ignored, so a loaded model.json works as is.
    """
    family = desc.get("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")
    missing = [k for k in DESC_KEYS if k not in desc]
    if missing:
        raise ValueError(f"model description lacks {', '.join(missing)}")
    text_dim = int(desc.get("text_dim") or 0)
    if text_dim and family != "sasrec":
        raise ValueError("item text fusion (text_dim > 0) is implemented for the sasrec family only")
    extra = {"text_dim": text_dim} if text_dim else {}
    if desc.get("item_table"):
        extra["item_table"] = desc["item_table"]
    return FAMILIES[family](**{k: desc[k] for k in DESC_KEYS}, **extra)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    for _ in range(8):  # wrappers nest at most a couple of levels deep
        inner = getattr(model, "module", getattr(model, "_orig_mod", None))
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def inference_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the model reads to score at inference, each once: parameters and buffers (a
    PQ table's uint8 codes included). A text-fused model serves its item table folded into one
    dense [V + 1, D] table (id embedding + projected text, computed once), so that table stands
    for its parts (the id table, the projection and the frozen text buffer)."""
    model = unwrap(model)
    if isinstance(model, Ensemble):
        return [t for m in model.members for t in inference_tensors(m)]
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    if getattr(model, "text_proj", None) is not None:
        for t in (*model.item_emb.parameters(), *model.item_emb.buffers(), model.text_proj.weight, model.item_text):
            tensors.pop(id(t), None)
        with torch.no_grad():
            table = model.item_table()
        tensors[id(table)] = table
    return list(tensors.values())


def count_params(model: nn.Module) -> int:
    """The model's size in elements: every element of every tensor it reads at inference
    (`inference_tensors`: parameters and buffers; a stored code is one element, a tied tensor counts
    once). What report.json, the KD curve, Tune and the model card call `params`."""
    return sum(t.numel() for t in inference_tensors(model))


def count_bytes(model: nn.Module) -> int:
    """The model's size in bytes as stored: each element at its dtype's width (fp32 4, uint8 1)."""
    return sum(t.numel() * t.element_size() for t in inference_tensors(model))


def save_model(path: str | Path, model: nn.Module, desc: dict, extra: dict | None = None) -> None:
    """Write `path/model.safetensors` (weights, a PQ table's codes included) and `path/model.json`
    (desc + size in elements `params` and `bytes` + extra)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / rundir.WEIGHTS), metadata={"format": "pt"})
    meta = {"family": desc["family"], **{k: desc[k] for k in DESC_KEYS}, "params": count_params(model),
            "bytes": count_bytes(model)}
    for key in ("text_dim", "item_table"):
        if desc.get(key):
            meta[key] = desc[key]
    meta.update(extra or {})
    (path / rundir.MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model (in eval mode, on `device`); returns it and the whole model.json."""
    path = Path(path)
    desc = json.loads((path / rundir.MODEL_JSON).read_text())
    model = build_model(desc)
    model.load_state_dict(load_file(str(path / rundir.WEIGHTS)))
    return model.to(device).eval(), desc


def left_pad(histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """Left-pad 1-D item arrays with 0 into a LongTensor [B, max_len], keeping the last max_len."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, items in enumerate(histories):
        items = np.asarray(items, dtype=np.int64)[-max_len:]
        if len(items):
            out[row, max_len - len(items) :] = items
    return torch.from_numpy(out)
