"""MALMEN on tiny models: the aggregated update is the ridge least-squares solution, meta-training lowers its
loss and raises held-out edit success, checkpoints resume exactly, the cache is reused, the delta round-trips
bit-exactly, and the shipped hparams files load."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from test_baselines_support import TEMPLATE, counterfact_records, deep_model, identical, snapshot

import meg_harness.baselines.malmen_train as malmen_train
from meg_harness.baselines.malmen import MALMEN
from meg_harness.baselines.malmen_net import RunningNorm, ridge_update
from meg_harness.baselines.malmen_train import MalmenHParams, answer_ids, meta_eval, meta_train
from meg_harness.baselines.params import from_mapping
from meg_harness.budget import TrainingStopped
from meg_harness.data.edit_case import EditCase, LocalityProbe
from meg_harness.editing.registry import get_editor_class
from meg_harness.errors import HarnessError
from meg_harness.prompts import encode_query, encode_target

HPARAMS_DIR = Path(__file__).resolve().parents[1] / "hparams" / "MALMEN"
SUBJECTS = [
    "France", "Germany", "Italy", "Spain", "Japan", "China", "Canada", "Australia", "Brazil", "Egypt",
    "India", "Russia", "Kenya", "Peru", "Norway", "Sweden", "Poland", "Mexico", "England", "Nepal",
]  # fmt: skip
TARGETS = [
    "Paris",
    "Berlin",
    "Rome",
    "Madrid",
    "Tokyo",
    "Beijing",
    "Ottawa",
    "Cairo",
    "Moscow",
    "Lima",
    "Oslo",
]
HP = dict(
    layers=[1, 2],
    rank=32,
    n_blocks=2,
    lr=1e-3,
    meta_lr=1e-3,
    train_n_edits=8,
    batch_size=8,
    editor_batch_size=64,
    n_epochs=4,
    checkpoint_every=1000,
)


def make_cases(subjects: list[str], tag: str, seed: int) -> list[EditCase]:
    rng = random.Random(seed)
    cases = []
    for i, s in enumerate(subjects):
        other = rng.choice(SUBJECTS)
        cases.append(
            EditCase(
                f"{tag}{i}",
                f"The capital of {s} is",
                s,
                rng.choice(TARGETS),
                rephrases=(f"The capital city of {s} is", f"{s}'s capital city is"),
                locality=(LocalityProbe(f"People in {other} speak", "French"),),
                prompt_template="The capital of {} is",
            )
        )
    return cases


TRAIN = make_cases(SUBJECTS[:16] * 4, "train", 0)  # 64 facts: 8 steps per epoch
HELD_OUT = make_cases(SUBJECTS[16:] + ["Chile", "Austria", "Greece", "Turkey"], "held", 1)


def editor(cache: Path, cases=TRAIN, **overrides) -> MALMEN:
    instance = get_editor_class("malmen")({**HP, **overrides})
    instance.progress = False
    instance.cache_dir = cache
    instance.train_cases = cases
    return instance


@torch.no_grad()
def tf_accuracy(model, tok, cases) -> float:
    """Mean over cases of the fraction of target tokens that are the argmax (the evaluator's TF)."""
    scores = []
    for case in cases:
        query = encode_query(tok, TEMPLATE, case.prompt)
        target = encode_target(tok, case.target_new)
        ids = torch.tensor([query + target])
        pred = model(input_ids=ids).logits[0, len(query) - 1 : -1].argmax(-1)
        scores.append(float((pred == torch.tensor(target)).float().mean()))
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hypernetwork meta-trained for 4 epochs (32 steps) on the gpt2 tiny model; returns (editor, cache)."""
    cache = tmp_path_factory.mktemp("malmen-cache")
    model, tok = deep_model("gpt2")
    instance = editor(cache)
    instance.hypernet(model, tok, TEMPLATE)
    return instance, cache


# -- the least-squares aggregation -----------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [7, 40])  # fewer rows than key dimensions (dual form) and more (primal)
def test_ridge_update_is_the_regularised_least_squares_solution(n_rows):
    g = torch.Generator().manual_seed(n_rows)
    keys = torch.randn(n_rows, 16, generator=g, dtype=torch.float64)
    shifts = torch.randn(n_rows, 5, generator=g, dtype=torch.float64)
    log_lambda = torch.tensor(0.7, dtype=torch.float64)
    # min ||K X - D||^2 + c ||X||^2  ==  lstsq on [K; sqrt(c) I] X = [D; 0]
    c = float(log_lambda.exp())
    a = torch.cat([keys, c**0.5 * torch.eye(16, dtype=torch.float64)])
    b = torch.cat([shifts, torch.zeros(16, 5, dtype=torch.float64)])
    expected = torch.linalg.lstsq(a, b).solution
    got = ridge_update(keys, shifts, log_lambda, torch.float64).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    got32 = ridge_update(keys.float(), shifts.float(), log_lambda.float(), torch.float32).double()
    assert float((got32 - expected).norm() / expected.norm()) < 1e-4
    # the gradient through the solve (what meta-training backpropagates) matches the closed form's
    d = shifts.clone().requires_grad_(True)
    lam = log_lambda.clone().requires_grad_(True)
    weight = torch.randn(16, 5, generator=g, dtype=torch.float64)
    (ridge_update(keys, d, lam, torch.float64).double() * weight).sum().backward()
    inv = torch.linalg.inv(keys.T @ keys + c * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(d.grad, keys @ inv @ weight)
    torch.testing.assert_close(lam.grad, -c * (inv @ weight * (inv @ keys.T @ shifts)).sum())


def test_running_norm_matches_the_batch_statistics():
    x = torch.randn(50, 6, dtype=torch.float64) * 3 + 1
    norm = RunningNorm(6)
    for part in (x[:7], x[7:8], x[8:]):
        norm.update(part)
    torch.testing.assert_close(norm.mean, x.mean(0))
    torch.testing.assert_close(norm.std(), x.std(0))


def _module_keys_and_grads(model, tok, cases, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and value gradients of ``module`` at the answer tokens, computed independently: all edits in one
    padded batch, the full model's logits, and the module's output made a leaf."""
    hp = MalmenHParams(**HP)
    rows, seen = [], {}
    for case in cases:
        query = encode_query(tok, TEMPLATE, case.prompt)
        answer = answer_ids(tok, TEMPLATE, case.target_new, hp, None)
        rows.append((query + answer[:-1], len(query) - 1, answer))
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (seq, _, _) in enumerate(rows):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1

    def hook(_m, args, output):
        seen["x"] = args[0].detach()
        seen["y"] = output.detach().requires_grad_(True)
        return seen["y"]

    handle = model.get_submodule(module).register_forward_hook(hook)
    try:
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    finally:
        handle.remove()
    loss = sum(
        -logp[i, start + torch.arange(len(ans)), torch.tensor(ans)].mean()
        for i, (_, start, ans) in enumerate(rows)
    )
    (grad,) = torch.autograd.grad(loss, seen["y"])
    where = [(i, start + j) for i, (_, start, ans) in enumerate(rows) for j in range(len(ans))]
    r, p = torch.tensor([w[0] for w in where]), torch.tensor([w[1] for w in where])
    return seen["x"][r, p].double(), grad[r, p].double()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D [in, out] and nn.Linear [out, in] weights
def test_edit_update_is_one_least_squares_solve_over_all_batches(arch, tmp_path):
    model, tok = deep_model(arch)
    # two LM batches of 3 edits and hypernetwork calls of 5 tokens: all aggregated into one solve per layer
    instance = editor(tmp_path, n_epochs=0, batch_size=3, editor_batch_size=5, solve_dtype="float64")
    cases = HELD_OUT[:6]
    edited = instance.fit(model, tok, cases, TEMPLATE)
    edited.restore()
    net = instance.trained.net
    assert edited.info["meta_steps"] == 0
    conv1d = arch == "gpt2"
    for i, module in enumerate(instance.modules(model)[0]):
        keys, grads = _module_keys_and_grads(model, tok, cases, module)
        assert keys.shape[0] == sum(
            len(answer_ids(tok, TEMPLATE, c.target_new, instance.hp, None)) for c in cases
        )
        layer_net, index = net.slot(i)
        with torch.no_grad():
            shifts = layer_net.shifts(keys.float(), grads.float(), index).double()
        c = net.log_lambda(i).exp().item()
        d_in = keys.shape[1]
        a = torch.cat([keys, c**0.5 * torch.eye(d_in, dtype=torch.float64)])
        b = torch.cat([shifts, torch.zeros(d_in, shifts.shape[1], dtype=torch.float64)])
        expected = torch.linalg.lstsq(a, b).solution  # [d_in, d_out]
        update = edited.delta.updates[f"{module}.weight"].double()
        got = update if conv1d else update.T
        assert float(expected.norm()) > 1e-3
        assert float((got - expected).norm() / expected.norm()) < 1e-4, module


def test_token_all_caches_every_token_and_the_answer_tokens_agree():
    model, tok = deep_model("llama")
    modules = ["model.layers.1.mlp.down_proj"]
    answers = MalmenHParams(**HP)
    every = MalmenHParams(**{**HP, "token": "all"})
    examples = malmen_train.edit_examples(tok, TEMPLATE, HELD_OUT[:3], answers)
    keys_a, grads_a, nll_a = malmen_train.cache_keys_and_grads(model, tok, examples, modules, answers)
    keys_e, grads_e, nll_e = malmen_train.cache_keys_and_grads(model, tok, examples, modules, every)
    assert keys_e[0].shape[0] == sum(len(e.ids) for e in examples) > keys_a[0].shape[0]
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e.ids))
    at = torch.tensor(
        [offsets[i] + e.start + j for i, e in enumerate(examples) for j in range(len(e.labels))]
    )
    torch.testing.assert_close(keys_e[0][at], keys_a[0])
    torch.testing.assert_close(grads_e[0][at], grads_a[0])
    assert nll_a == nll_e > 0
    assert float(grads_e[0].norm()) > float(grads_a[0].norm())  # earlier tokens influence the answer too


# -- meta-training ------------------------------------------------------------------------------------------


def test_meta_training_lowers_the_meta_loss(trained):
    instance, _ = trained
    history = instance.trained.state["history"]
    assert instance.trained.state["done"] and len(history) == 32
    first = sum(h["gen_loss"] for h in history[:4]) / 4
    last = sum(h["gen_loss"] for h in history[-16:]) / 16
    assert last < 0.85 * first, (first, last)
    # the same 16 training facts edited by the untrained and by the trained hypernetwork
    model, tok = deep_model("gpt2")
    modules = instance.modules(model)[0]
    fresh = editor(instance.cache_dir, n_epochs=0).hypernet(model, tok, TEMPLATE).net
    before = meta_eval(model, tok, TEMPLATE, fresh, modules, TRAIN[:16], instance.hp)
    after = meta_eval(model, tok, TEMPLATE, instance.trained.net, modules, TRAIN[:16], instance.hp)
    assert after["objective"] < before["objective"] - 0.5, (before, after)
    assert after["gen_loss"] < before["gen_loss"] - 1.0, (before, after)


def test_decoupled_meta_gradient_equals_end_to_end_backpropagation():
    """Steps 1-4 (cached keys/gradients, chunked hypernetwork backward) give the gradient of one graph
    through hypernetwork, solve and LM."""
    from meg_harness.baselines.malmen_net import ridge_update
    from meg_harness.models.nethook import frozen

    model, tok = deep_model("gpt2")
    hp = MalmenHParams(**{**HP, "batch_size": 3, "editor_batch_size": 7, "solve_dtype": "float64"})
    hp = from_mapping(MalmenHParams, {**hp.to_dict(), "max_grad_norm": 1e9}, "malmen")
    modules = [f"transformer.h.{layer}.mlp.c_proj" for layer in hp.layers]
    net = malmen_train.build_hypernet(
        malmen_train.module_shapes(model, modules, True), hp, torch.device("cpu")
    )
    with torch.no_grad():
        for block in (b for n in net.nets.values() for b in n.blocks):
            block.B.normal_(0, 0.01)  # non-zero so that every parameter has a gradient
    cases = TRAIN[:8]
    with frozen(model):
        malmen_train.meta_step(
            model, tok, TEMPLATE, net, torch.optim.SGD(net.parameters(), lr=0.0), modules, cases, hp, 0
        )
    decoupled = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    edits, gens, locs = malmen_train.step_examples(tok, TEMPLATE, cases, hp, 0)
    with frozen(model):
        keys, grads, _ = malmen_train.cache_keys_and_grads(model, tok, edits, modules, hp)
        deltas = []
        for i in range(len(modules)):
            layer_net, index = net.slot(i)
            shifts = layer_net.shifts(keys[i], grads[i], index)  # all tokens at once, graph kept
            deltas.append(ridge_update(keys[i], shifts, net.log_lambda(i), torch.float64))
        losses = []
        for examples in (gens, locs):
            rows = malmen_train._rows(examples, 1, torch.device("cpu"))
            with torch.no_grad():
                ref = torch.log_softmax(malmen_train._logits(model, rows), -1)
            with malmen_train.DeltaHooks(model, modules, deltas):
                logp = torch.log_softmax(malmen_train._logits(model, rows), -1)
            if examples is gens:
                losses.append(-logp.gather(1, rows.lab_ids[:, None]).mean())
            else:
                losses.append(hp.loc_coef * (ref.exp() * (ref - logp)).sum(-1).mean())
        sum(losses).backward()
    for name, param in net.named_parameters():
        assert float(param.grad.norm()) > 0, name
        assert float((decoupled[name] - param.grad).norm() / param.grad.norm()) < 1e-4, name


def test_meta_training_raises_held_out_edit_success(trained, tmp_path):
    instance, cache = trained
    model, tok = deep_model("gpt2")
    before = snapshot(model)
    base = tf_accuracy(model, tok, HELD_OUT)
    untrained = editor(tmp_path, n_epochs=0).fit(model, tok, HELD_OUT, TEMPLATE)
    acc_untrained = tf_accuracy(model, tok, HELD_OUT)
    untrained.restore()
    assert identical(model, before)
    fitted = editor(cache).fit(model, tok, HELD_OUT, TEMPLATE)  # the fixture's hypernetwork, from the cache
    acc_trained = tf_accuracy(model, tok, HELD_OUT)
    fitted.restore()
    assert fitted.info["meta_steps"] == 32 and fitted.info["train_overlap"] == 0
    assert base < 0.2 and acc_untrained < 0.3, (base, acc_untrained)
    assert acc_trained >= acc_untrained + 0.4, (acc_untrained, acc_trained)
    modules = instance.modules(model)[0]
    fresh = editor(tmp_path, n_epochs=0).hypernet(model, tok, TEMPLATE).net
    losses_untrained = meta_eval(model, tok, TEMPLATE, fresh, modules, HELD_OUT, instance.hp)
    losses_trained = meta_eval(model, tok, TEMPLATE, instance.trained.net, modules, HELD_OUT, instance.hp)
    assert losses_trained["gen_loss"] < losses_untrained["gen_loss"] - 1.0
    assert identical(model, before)


def _state(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _train(model, tok, cache: Path, **overrides):
    hp = MalmenHParams(**{**HP, "n_epochs": 1, "checkpoint_every": 2, **overrides})
    modules = [f"transformer.h.{layer}.mlp.c_proj" for layer in hp.layers]
    return meta_train(model, tok, TEMPLATE, hp, TRAIN, modules, True, cache, progress=False)


def test_resume_after_interruption_equals_uninterrupted_training(tmp_path, monkeypatch):
    model, tok = deep_model("gpt2")
    whole = _train(model, tok, tmp_path / "a")
    assert whole.state["step"] == 8 and whole.state["done"]

    original = malmen_train.meta_step

    def dies_at_step_5(*args, **kwargs):
        if args[-1] == 4:  # the step index
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(malmen_train, "meta_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(model, tok, tmp_path / "b")
    saved = json.loads(next((tmp_path / "b").glob("malmen/*/state.json")).read_text())
    assert saved["step"] == 4 and not saved["done"]
    monkeypatch.setattr(malmen_train, "meta_step", original)
    resumed = _train(model, tok, tmp_path / "b")
    assert resumed.state["step"] == 8 and resumed.state["done"]
    # the 4 steps of the interrupted process are read back, with the seconds they took there
    assert (whole.resumed_steps, whole.resumed_s, resumed.resumed_steps) == (0, 0.0, 4)
    assert resumed.resumed_s == saved["elapsed_s"] > 0
    a, b = _state(whole.net), _state(resumed.net)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert resumed.state["history"] == whole.state["history"]
    # a finished run is loaded, not trained again
    monkeypatch.setattr(malmen_train, "meta_step", lambda *a, **k: pytest.fail("trained again"))
    again = _train(model, tok, tmp_path / "b")
    assert all(torch.equal(v, _state(again.net)[k]) for k, v in a.items())


def test_time_limit_stops_without_a_result_and_the_next_call_finishes_the_same_run(tmp_path):
    model, tok = deep_model("gpt2")
    whole = _train(model, tok, tmp_path / "whole")
    with pytest.raises(TrainingStopped, match=r"max_minutes=1e-09 after step 1 of 8 .*from step 1"):
        _train(model, tok, tmp_path / "b", max_minutes=1e-9)  # a limit, not a budget: no partial result
    saved = json.loads(next((tmp_path / "b").glob("malmen/*/state.json")).read_text())
    assert saved["step"] == 1 and not saved["done"]
    with pytest.raises(TrainingStopped, match="after step 2 of 8"):  # each call is limited on its own
        _train(model, tok, tmp_path / "b", max_minutes=1e-9)
    rest = _train(model, tok, tmp_path / "b", max_minutes=60)  # same cache entry: max_minutes is not hashed
    assert rest.state["step"] == 8 and rest.state["done"]
    assert [h["step"] for h in rest.state["history"]] == list(range(1, 9))
    assert rest.state["history"] == whole.state["history"]
    a, b = _state(whole.net), _state(rest.net)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the result is the steps', not the clock's


def test_time_limit_never_starts_a_step_that_would_end_past_it(tmp_path, monkeypatch):
    """Steps of 60 s (a fake clock), a 150 s limit: two steps (120 s), not a third ending at 180 s."""
    clock = [0.0]
    monkeypatch.setattr(malmen_train.time, "monotonic", lambda: clock[0])

    def one_minute_step(*args, **kwargs):
        clock[0] += 60.0
        return {"gen_loss": 1.0, "loc_loss": 0.0}

    monkeypatch.setattr(malmen_train, "meta_step", one_minute_step)
    model, tok = deep_model("gpt2")
    with pytest.raises(TrainingStopped, match="after step 2 of 8"):
        _train(model, tok, tmp_path, max_minutes=2.5)
    saved = json.loads(next(tmp_path.glob("malmen/*/state.json")).read_text())
    assert saved["step"] == 2 and saved["elapsed_s"] == 120.0


# -- the editor ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_delta_artifact_roundtrip_is_bit_exact(arch, tmp_path, capsys):
    model, tok = deep_model(arch)
    before = snapshot(model)
    # training facts from a file (CounterFact format), as a run config would give them
    records = counterfact_records(TRAIN[:16])
    (tmp_path / "train.json").write_text(json.dumps(records))
    train = dict(train_dataset="counterfact", train_path=str(tmp_path / "train.json"), n_epochs=1)
    instance = editor(tmp_path / "cache", cases=None, **train)
    instance.progress = True
    edited = instance.fit(model, tok, HELD_OUT[:4], TEMPLATE)
    assert edited.info["meta_steps"] == 2 and edited.info["train_facts"] == 16
    assert edited.info["meta_train_s"] > 0
    assert "2 of 2 steps" in capsys.readouterr().out  # training time and peak memory are printed
    after = snapshot(model)
    assert not identical(model, before)
    instance.save(edited, tmp_path / "artifact")
    assert (tmp_path / "artifact" / "delta.safetensors").is_file()
    info = json.loads((tmp_path / "artifact" / "edit.json").read_text())
    assert info["method"] == "malmen" and len(info["tensors"]) == 2
    edited.restore()
    assert identical(model, before)
    loaded = MALMEN.load(tmp_path / "artifact", model, tok)
    assert identical(model, after)
    loaded.restore()
    assert identical(model, before)


def test_bad_hparams_and_missing_training_data_are_reported(tmp_path):
    with pytest.raises(HarnessError, match="unknown malmen hparam"):
        get_editor_class("malmen")({"rnak": 4})
    with pytest.raises(HarnessError, match="token"):
        get_editor_class("malmen")({"token": "subject"})
    model, tok = deep_model("gpt2")
    with pytest.raises(HarnessError, match="train_path"):
        get_editor_class("malmen")(HP).fit(model, tok, HELD_OUT[:2], TEMPLATE)
    with pytest.raises(HarnessError, match="exceeds"):
        editor(tmp_path, cases=TRAIN[:4]).fit(model, tok, HELD_OUT[:2], TEMPLATE)
    with pytest.raises(HarnessError, match="out of range"):
        editor(tmp_path, layers=[9]).fit(model, tok, HELD_OUT[:2], TEMPLATE)


DEPTHS = {"gpt-j-6b": 28, "phi-2": 32, "llama3-8b": 32, "smollm2-135m": 30}


def test_shipped_hparams_files_load():
    files = sorted(HPARAMS_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(DEPTHS)
    for path in files:
        hp = from_mapping(MalmenHParams, yaml.safe_load(path.read_text()), "malmen")
        assert len(hp.layers) == 6 and all(0 <= layer < DEPTHS[path.stem] for layer in hp.layers)
        assert hp.train_path and hp.n_blocks == 2


def test_runner_fits_scores_and_saves_malmen(tmp_path):
    from meg_harness.cli import main

    model, tok = deep_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    (tmp_path / "train.json").write_text(json.dumps(counterfact_records(TRAIN[:32])))
    (tmp_path / "edit.json").write_text(json.dumps(counterfact_records(HELD_OUT, first_id=100)))
    hparams = {
        **HP,
        "n_epochs": 1,
        "train_dataset": "counterfact",
        "train_path": str(tmp_path / "train.json"),
    }
    config = {
        "model": str(tmp_path / "model"),
        "dataset": "counterfact",
        "data_path": str(tmp_path / "edit.json"),
        "n_edits": 4,
        "seeds": [0],
        "methods": ["malmen"],
        "hparams": {"malmen": hparams},
        "batch_size": 4,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 0
    seed_dir = tmp_path / "out" / "malmen" / "seed0"
    metrics = json.loads((seed_dir / "metrics.json").read_text())
    assert metrics["counts"]["cases"] == 4 and metrics["method"] == "malmen"
    assert metrics["reliability_tf"] > 0
    info = json.loads((seed_dir / "artifact" / "edit.json").read_text())
    assert info["method"] == "malmen" and info["meta_steps"] == 4 and len(info["tensors"]) == 2
