"""Reduced language-model vectors, item-table initialisation and the Ray-free loop helpers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from raykd.config import ModelConfig, TrainConfig
from raykd.core import models, text
from raykd.training import loop
from raykd.training.spec import KD, RunSpec


def test_reduce_whitens_and_keeps_empty_rows_zero():
    rng = np.random.default_rng(0)
    # Anisotropic vectors: a big shared direction plus small noise (high mean cosine).
    v = np.zeros((51, 8))
    v[1:] = np.array([5.0, 0, 0, 0, 0, 0, 0, 0]) + rng.normal(size=(50, 8)) * [3, 2, 1, 0.5, 0.1, 0.1, 0.1, 0.1]
    v[7] = 0.0  # an item without text
    z = text.reduce(v, 3)
    assert z.shape == (51, 3)
    assert not z[0].any() and not z[7].any()
    has = np.abs(v).sum(1) > 0
    assert np.allclose(z[has].mean(0), 0, atol=1e-6)
    assert np.allclose(z[has].std(0, ddof=1), 1, atol=1e-6)  # whitened
    assert np.allclose(np.corrcoef(z[has].T), np.eye(3), atol=1e-6)  # decorrelated
    assert np.array_equal(z, text.reduce(v, 3))  # deterministic


def test_reduce_cuts_to_rank():
    v = np.zeros((6, 4))
    v[1:, 0] = [1, 2, 3, 4, 5]  # rank 1 after centring
    assert text.reduce(v, 3).shape == (6, 1)


def test_init_item_table_scales_columns_and_keeps_padding():
    model = models.build_model({"family": "sasrec", "num_items": 20, "dim": 4, "layers": 1, "heads": 1,
                                "max_len": 5, "dropout": 0.0})
    reduced = np.random.default_rng(1).normal(size=(21, 3)).astype(np.float32)
    before = model.item_emb.weight[:, 3].clone()
    text.init_item_table(model, reduced, std=0.5)
    w = model.item_emb.weight.detach()
    assert not w[0].any()
    assert torch.allclose(w[1:, :3].std(0, unbiased=False), torch.full((3,), 0.5), atol=1e-5)
    assert torch.equal(w[1:, 3], before[1:])  # a column beyond the reduced width keeps its init
    with pytest.raises(ValueError, match="items"):
        text.init_item_table(model, reduced[:10], std=0.5)


def test_worker_batch_keeps_the_global_batch():
    assert loop.worker_batch(128, 1) == 128
    assert loop.worker_batch(128, 2) == 64
    assert loop.worker_batch(128, 3) == 43  # rounded up: never fewer windows per step


def test_should_stop_waits_for_min_epochs():
    assert not loop.should_stop({"bad_epochs": 3, "epoch": 5}, 3, 10)  # epoch 6 of at least 10
    assert loop.should_stop({"bad_epochs": 3, "epoch": 9}, 3, 10)
    assert not loop.should_stop({"bad_epochs": 2, "epoch": 20}, 3, 10)
    assert loop.should_stop({"bad_epochs": 3, "epoch": 0}, 3)


def test_checkpoint_cadence_every_epoch_only_while_cheap():
    # a checkpoint of 0.04 s after a 1 s epoch is cheap (<= 5 %): every epoch
    assert loop.checkpoint_due(improved=False, final=False, epoch_s=1.0, save_s=0.04)
    # 0.2 s after a 1 s epoch is not: only the best epochs and the last one
    assert not loop.checkpoint_due(improved=False, final=False, epoch_s=1.0, save_s=0.2)
    assert loop.checkpoint_due(improved=True, final=False, epoch_s=1.0, save_s=0.2)
    assert loop.checkpoint_due(improved=False, final=True, epoch_s=1.0, save_s=0.2)


def test_embedding_transfer_starts_the_student_from_the_teachers_items(tmp_path):
    desc = {"family": "sasrec", "num_items": 30, "layers": 1, "heads": 1, "max_len": 5, "dropout": 0.0}
    torch.manual_seed(3)
    teacher = models.build_model({**desc, "dim": 16})
    models.save_model(tmp_path / "teacher", teacher, {**desc, "dim": 16})
    model = ModelConfig(dim=4, layers=1, heads=1, max_len=5, dropout=0.0)
    kd = KD(tmp_path / "soft", 0.5, 1.0, "kl", (tmp_path / "teacher",), 0.1)
    student_desc = {**desc, "dim": 4}
    student = loop.build(RunSpec("student", model, TrainConfig(), 0, kd=kd), student_desc)
    expected = text.reduce(text.teacher_items(teacher), 4)
    got = student.item_emb.weight.detach().numpy()
    # the same principal directions, rescaled column by column to std 0.1
    assert np.allclose(got[1:] / got[1:].std(0), expected[1:] / expected[1:].std(0), atol=1e-4)
    assert np.allclose(got[1:].std(0), 0.1, atol=1e-5) and not got[0].any()
    plain = loop.build(RunSpec("student", model, TrainConfig(), 0, kd=replace(kd, transfer_from=())), student_desc)
    assert not np.allclose(plain.item_emb.weight.detach().numpy(), got)
