"""MeG familiarity network (eq. 6, 9, 10) and its threshold calibration (A.5, Table 16)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from meg_harness.errors import HarnessError
from meg_harness.meg.calibration import (
    PAPER_THRESHOLDS,
    best_threshold,
    calibrate,
    calibration_markdown,
    entropy_auc,
)
from meg_harness.meg.familiarity import NUM_CLASSES, FamiliarityNetwork, train_familiarity

DIM = 32


@pytest.fixture(scope="module")
def trained():
    """A network trained on 40 random embeddings, with those embeddings."""
    points = torch.randn(40, DIM, generator=torch.Generator().manual_seed(0))
    return train_familiarity(points, seed=0, hidden=128, progress=False), points


class _StubFN:
    """Anything with ``entropy`` works for the calibration functions."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values = values

    def entropy(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.values[int(k)] for k in embeddings[:, 0]])


def _ids(*ids: int) -> torch.Tensor:
    return torch.tensor([[float(i)] for i in ids])


def test_paper_shape():
    net = FamiliarityNetwork(768)
    linears = [m for m in net.blocks if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and net.head.out_features == 10  # 5 FFN blocks + head, K = 10


def test_memorises_random_labels_and_is_familiar_with_its_training_points(trained):
    net, points = trained
    info = net.train_info
    assert info["accuracy"] == 100.0 and info["converged"] and info["loss"] < 1e-4
    gen = torch.Generator().manual_seed(1)
    h_train = net.entropy(points).mean()
    h_near = net.entropy(points + 0.05 * torch.randn(points.shape, generator=gen)).mean()
    h_fresh = net.entropy(torch.randn(200, DIM, generator=gen)).mean()
    assert h_train < h_near < h_fresh
    assert h_fresh > 10 * h_near


def test_entropy_is_eq9_in_nats():
    net = FamiliarityNetwork(DIM, hidden=16)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    h = net.entropy(torch.randn(3, DIM))
    assert torch.allclose(h, torch.full((3,), math.log(10)))  # uniform over K = 10: ln 10 nats
    net.head.bias.data = torch.tensor([50.0] + [0.0] * 9)
    assert float(net.entropy(torch.randn(1, DIM))) < 1e-12
    logits = net(torch.randn(4, DIM))
    p = logits.softmax(-1)
    assert torch.allclose(net.entropy(torch.randn(4, DIM)), -(p * p.log()).sum(-1), atol=1e-6)


def test_route_is_entropy_below_threshold(trained):
    net, points = trained
    queries = torch.cat([points[:5], torch.randn(5, DIM, generator=torch.Generator().manual_seed(2))])
    h = net.entropy(queries)
    for threshold in (0.0, 0.05, 0.1, float(h.median()), 3.0):
        assert torch.equal(net.route(queries, threshold), h < threshold)
    assert not net.route(queries, 0.0).any() and net.route(queries, math.log(10) + 1e-3).all()
    assert net.route(points, 0.1).all()  # the default threshold (A.5) keeps every memorised edit


def test_training_is_seeded_and_labels_can_be_given():
    points = torch.randn(12, DIM, generator=torch.Generator().manual_seed(3))
    kw = dict(hidden=32, max_epochs=5, progress=False)
    a, b = train_familiarity(points, seed=7, **kw), train_familiarity(points, seed=7, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    labels = torch.arange(12) % 10
    net = train_familiarity(points, labels=labels, hidden=64, progress=False)
    assert torch.equal(net(points).argmax(-1), labels)
    with pytest.raises(HarnessError, match="labels"):
        train_familiarity(points, labels=torch.full((12,), 10), progress=False)


def test_save_load_roundtrip_is_bit_identical(trained, tmp_path):
    net, points = trained
    net.save(tmp_path / "fn")
    loaded = FamiliarityNetwork.load(tmp_path / "fn")
    assert loaded.config == net.config and loaded.train_info == net.train_info
    assert torch.equal(loaded(points), net(points))
    assert torch.equal(loaded.entropy(points), net.entropy(points))
    with pytest.raises(HarnessError, match="not a saved familiarity network"):
        FamiliarityNetwork.load(tmp_path / "missing")


def test_bad_embedding_shape_is_a_harness_error(trained):
    net, _ = trained
    with pytest.raises(HarnessError, match="expected embeddings of shape"):
        net.entropy(torch.randn(3, DIM + 1))


def test_entropy_auc_matches_sklearn_on_a_hand_case():
    fn = _StubFN({0: 0.1, 1: 0.5, 2: 0.3, 3: 0.9})
    auc = entropy_auc(fn, _ids(0, 1), _ids(2, 3))
    # positives score -0.1, -0.5; negatives -0.3, -0.9: 3 of the 4 (positive, negative) pairs in order
    assert auc == pytest.approx(0.75)
    assert auc == pytest.approx(roc_auc_score([1, 1, 0, 0], [-0.1, -0.5, -0.3, -0.9]))


def test_calibration_rates_best_threshold_and_markdown():
    fn = _StubFN({0: 0.01, 1: 0.02, 2: 0.08, 3: 0.12, 4: 0.2, 5: 0.6, 6: 0.25, 7: 0.9})
    rows = calibrate(fn, _ids(0, 1), _ids(2, 3, 4, 5), _ids(6, 7), thresholds=(0.05, 0.1, 0.15, 0.3))
    assert [r["threshold"] for r in rows] == [0.05, 0.1, 0.15, 0.3]
    assert [r["edit_routed"] for r in rows] == [100.0] * 4
    assert [r["paraphrase_routed"] for r in rows] == [0.0, 25.0, 50.0, 75.0]
    assert [r["unrelated_routed"] for r in rows] == [0.0, 0.0, 0.0, 50.0]
    assert best_threshold(rows) == 0.15  # paraphrases routed minus unrelated routed: 0, 25, 50, 25
    assert best_threshold([{**r, "unrelated_routed": 0.0, "paraphrase_routed": 50.0} for r in rows]) == 0.05
    table = calibration_markdown(rows, auc=0.8125)
    assert table.count("\n|") == 5 and "| 0.15 | 100.00 | 50.00 | 0.00 | 100.00 |" in table
    assert "0.8125" in table
    assert PAPER_THRESHOLDS == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # Table 16's grid


def _relation_world(n_subjects: int, seed: int) -> torch.Tensor:
    """CounterFact-like embeddings: one of 4 shared relation directions plus a subject of its own, so
    prompts about new subjects lie near the edits (same relation) without being any of them."""
    gen = torch.Generator().manual_seed(seed)
    relations = torch.randn(4, DIM, generator=torch.Generator().manual_seed(99))
    subjects = torch.randn(n_subjects, DIM, generator=gen)
    return relations[torch.arange(n_subjects) % 4] + 0.6 * subjects


def test_negatives_push_unrelated_same_relation_prompts_to_high_entropy_and_keep_the_edits():
    edits, negatives, unseen = _relation_world(64, 1), _relation_world(400, 2), _relation_world(200, 3)
    paraphrases = edits + 0.1 * torch.randn(edits.shape, generator=torch.Generator().manual_seed(4))
    plain = train_familiarity(edits, seed=0, hidden=128, progress=False)
    trained = train_familiarity(edits, seed=0, hidden=128, progress=False, negatives=negatives)
    info = trained.train_info
    assert info["accuracy"] == 100.0 and info["negatives"] == 400
    assert info["negatives_mean_entropy"] > 0.9 * math.log(NUM_CLASSES)
    assert trained.route(edits, 0.1).all()
    assert trained.route(paraphrases, 0.1).float().mean() >= 0.9
    unseen_routed = trained.route(unseen, 0.1).float().mean()
    assert unseen_routed <= 0.1 < plain.route(unseen, 0.1).float().mean()
    assert entropy_auc(trained, paraphrases, unseen) > entropy_auc(plain, paraphrases, unseen) + 0.05


def test_without_negatives_training_is_unchanged():
    points = torch.randn(30, DIM, generator=torch.Generator().manual_seed(5))
    a = train_familiarity(points, seed=3, hidden=64, progress=False)
    b = train_familiarity(points, seed=3, hidden=64, progress=False, negatives=torch.empty(0, DIM))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert b.train_info["negatives"] == 0 and b.train_info["negatives_mean_entropy"] is None
