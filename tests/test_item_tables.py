"""Product-quantised item tables (raykd.core.item_tables): reconstruction, code assignment, fitting."""

import numpy as np
import pytest
import torch

from raykd.core import item_tables, models
from raykd.core.item_tables import PQTable


def _table() -> PQTable:
    """3 items, width 4, 2 codes over 2-row codebooks, every value chosen by hand."""
    t = PQTable(num_items=3, dim=4, codes=2, codebook=2)
    with torch.no_grad():
        t.codebooks.copy_(torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]))
    t.set_codes(np.array([[0, 1], [1, 0], [1, 1]]))
    return t


def test_bounds_split_the_width_like_array_split():
    assert item_tables.bounds(4, 2) == [(0, 2), (2, 4)]
    assert item_tables.bounds(64, 3) == [(0, 22), (22, 43), (43, 64)]
    with pytest.raises(ValueError, match="codes <= dim"):
        item_tables.bounds(4, 5)


def test_reconstruction_concatenates_the_picked_codewords():
    t = _table()
    # item 1: codes (0, 1) -> [1, 2 | 7, 8]; item 2: (1, 0) -> [5, 6 | 3, 4]; item 3: (1, 1) -> [5, 6 | 7, 8]
    expected = torch.tensor([[0.0, 0, 0, 0], [1, 2, 7, 8], [5, 6, 3, 4], [5, 6, 7, 8]])
    assert torch.equal(t.weight, expected)
    assert torch.equal(t(torch.tensor([[0, 2], [3, 1]])), expected[torch.tensor([[0, 2], [3, 1]])])
    assert t.codes.dtype == torch.uint8


def test_gradients_reach_only_the_codewords_used():
    t = _table()
    t(torch.tensor([1])).sum().backward()  # item 1 uses codeword 0 of sub-space 0, codeword 1 of sub-space 1
    assert torch.equal(t.codebooks.grad, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))


def test_kmeans_codes_on_a_hand_made_table():
    # sub-space 0 (column 0) has clusters {0, 0.1} and {5, 5.1}; sub-space 1 has {10, 10.1} and {0, 0.1}
    table = np.array([[0, 10], [0.1, 10.1], [5, 0], [5.1, 0.1]], np.float32)
    codes, centroids = item_tables.kmeans_codes(table, codes=2, codebook=2, seed=0)
    for c in range(2):
        assert codes[0, c] == codes[1, c] != codes[2, c] == codes[3, c]
    assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.05, 5.05])
    assert sorted(centroids[:, 1].tolist()) == pytest.approx([0.05, 10.05])
    # reconstruction = the centroids of each item's clusters, within 0.05 of every value
    t = PQTable(num_items=4, dim=2, codes=2, codebook=2)
    t.set_codes(codes)
    with torch.no_grad():
        t.codebooks.copy_(torch.from_numpy(centroids))
    assert np.abs(t.weight[1:].detach().numpy() - table).max() == pytest.approx(0.05, abs=1e-6)


def test_kmeans_is_seeded():
    x = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    a, b = item_tables.kmeans(x, 8, seed=3), item_tables.kmeans(x, 8, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_svd_codes_put_co_consumed_items_together():
    # users 0-2 take items 1 and 2, user 3 takes items 3 and 4: the top singular vector loads on
    # items 1, 2 only, so 2 quantile bins over 4 items split {1, 2} from {3, 4}
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    items = np.array([1, 2, 1, 2, 1, 2, 3, 4])
    codes = item_tables.svd_codes(users, items, num_items=4, codes=1, codebook=2, seed=0)
    assert codes.dtype == np.uint8 and codes.shape == (4, 1)
    assert codes[0, 0] == codes[1, 0] != codes[2, 0] == codes[3, 0]


def test_fit_sets_codewords_to_the_means_of_their_items():
    t = _table()  # codes: item 1 (0, 1), item 2 (1, 0), item 3 (1, 1)
    target = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [3, 3, 3, 3], [5, 5, 5, 5]], np.float32)
    t.fit(target)
    # sub-space 0: codeword 0 <- item 1 (1); codeword 1 <- mean of items 2, 3 (4)
    # sub-space 1: codeword 0 <- item 2 (3); codeword 1 <- mean of items 1, 3 (3)
    assert torch.equal(t.codebooks.detach(), torch.tensor([[1.0, 1, 3, 3], [4, 4, 3, 3]]))


def test_a_pq_model_saves_and_loads_its_codes(tmp_path):
    desc = {"family": "sasrec", "num_items": 10, "dim": 4, "layers": 1, "heads": 1, "max_len": 5, "dropout": 0.0,
            "item_table": {"kind": "pq", "codes": 2, "codebook": 4, "assign": "svd"}}
    model = models.build_model(desc).eval()
    model.item_emb.set_codes(np.random.default_rng(0).integers(0, 4, (10, 2)))
    models.save_model(tmp_path, model, desc)
    loaded, meta = models.load_model(tmp_path)
    assert meta["item_table"]["codes"] == 2
    assert torch.equal(loaded.item_emb.codes, model.item_emb.codes)
    seq = torch.tensor([[0, 0, 3, 1, 7]])
    assert torch.equal(loaded.last_scores(seq), model.last_scores(seq))


def test_the_item_table_keys_are_checked_when_the_config_loads():
    from raykd.config import load_config
    from raykd.core.errors import RaykdError

    def load(*overrides):
        return load_config("configs/quickstart.yaml", list(overrides))

    cfg = load("distill.model.item_table={codes: 2}")
    assert cfg.distill.model.item_table.model_dump() == {"kind": "pq", "codes": 2, "codebook": 256, "assign": "svd"}
    for bad, says in (("distill.model.item_table={codes: 2, bits: 8}", "bits"),
                      ("distill.model.item_table={codes: 17}", "cannot exceed dim"),
                      ("distill.model.item_table={codes: 2, codebook: 300}", "256"),
                      ("distill.model.item_table={codes: 2, assign: teacher}", "distill.transfer"),
                      ("teacher.model.item_table={codes: 2, assign: teacher}", "a teacher has no teacher"),
                      ("teacher.model.item_table={codes: 2, assign: text}", "teacher.item_text")):
        with pytest.raises((RaykdError, ValueError), match=says):
            load(bad)


def test_the_no_kd_twin_of_a_teacher_coded_student_gets_svd_codes():
    from raykd.config import ModelConfig
    from raykd.training.plan import teacher_free

    coded = ModelConfig(dim=8, heads=1, item_table={"codes": 2, "assign": "teacher"})
    assert teacher_free(coded).item_table.assign == "svd"
    assert teacher_free(coded).model_copy(update={"item_table": coded.item_table}) == coded  # nothing else changes
    text = ModelConfig(dim=8, heads=1, item_table={"codes": 2, "assign": "text"})
    assert teacher_free(text) == text  # already teacher-free


def test_distill_sizes_name_pq_students_beside_dense_widths():
    from raykd.config import load_config
    from raykd.core.errors import RaykdError
    from raykd.training.plan import curve_pair, sized

    cfg = load_config("configs/quickstart.yaml", ["distill.sizes=[8, pq4]"])
    assert cfg.distill.sizes == [8, "pq4"]
    assert curve_pair(cfg, "pq4") == ("kd_curve/pq4/student", "kd_curve/pq4/student_nokd")
    assert curve_pair(cfg, 8) == ("kd_curve/d8/student", "kd_curve/d8/student_nokd")
    pq4 = sized(cfg.distill.model, "pq4")  # the student's width (16), 4 codes, default codebook and assign
    assert (pq4.dim, pq4.item_table.codes, pq4.item_table.codebook, pq4.item_table.assign) == (16, 4, 256, "svd")
    coded = cfg.distill.model.model_copy(update={"item_table": pq4.item_table})
    assert sized(coded, 8).item_table is None and sized(coded, 8).dim == 8  # an integer is a dense width
    for bad in ("[pq99]", "[q4]", "[1]"):
        with pytest.raises((RaykdError, ValueError), match="distill.sizes entry"):
            load_config("configs/quickstart.yaml", [f"distill.sizes={bad}"])


def test_lookup_rows_offset_each_code_by_its_sub_space_and_follow_new_codes():
    table = item_tables.PQTable(num_items=2, dim=4, codes=2, codebook=3)
    table.set_codes(np.array([[0, 2], [2, 1]]))
    assert table.lookup_rows().tolist() == [[0, 3], [0, 5], [2, 4]]  # row 0: padding, codes 0
    assert table.lookup_rows().dtype == torch.int32
    table.set_codes(np.array([[1, 1], [0, 0]]))  # a rebuilt cache, not the stale one
    assert table.lookup_rows().tolist() == [[0, 3], [1, 4], [0, 3]]
    state = {k: v.clone() for k, v in table.state_dict().items()}
    assert set(state) == {"codes", "codebooks"}  # the cache is never saved
    state["codes"][1] = torch.tensor([2, 2], dtype=torch.uint8)
    table.load_state_dict(state)
    assert table.lookup_rows()[1].tolist() == [2, 5]
