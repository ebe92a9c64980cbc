"""``--model meg`` on a tiny MeG artifact: loading, the ``route`` and ``ddim_steps`` args, model info."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from meg_harness.data import load_cases  # noqa: E402
from meg_harness.editing.registry import get_editor_class  # noqa: E402
from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.meg.encoder import make_tiny_text_encoder  # noqa: E402
from meg_harness.prompts import get_template  # noqa: E402
from tests.test_meg_editor import tiny_hparams  # noqa: E402

TEMPLATE = get_template("gptj")


@pytest.fixture(scope="module")
def cases():
    return load_cases("counterfact", None)[:4]


@pytest.fixture(scope="module")
def artifact(tiny_models, cases, tmp_path_factory):
    """A tiny MeG artifact (fit on the tiny llama, a short generator training: seconds)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder_dir = tmp_path_factory.mktemp("encoder")
        make_tiny_text_encoder().save(encoder_dir)
        model, tokenizer = tiny_models("llama")
        hparams = tiny_hparams(str(encoder_dir), train={"max_steps": 300, "eval_every": 300})
        editor = get_editor_class("meg")(hparams)
        editor.cache_dir = tmp_path_factory.mktemp("cache")
        edited = editor.fit(model, tokenizer, cases, TEMPLATE)
        folder = tmp_path_factory.mktemp("meg") / "artifact"
        editor.save(edited, folder)
    finally:
        torch.set_num_threads(previous)
    return folder


def _requests(cases) -> list[Instance]:
    args = [(TEMPLATE.format(c.prompt), " " + c.target_new) for c in cases]
    args += [(TEMPLATE.format("Who painted the tiny unrelated picture?"), " Monet")]
    return [Instance("loglikelihood", {}, a, i, metadata=("t", i, 1)) for i, a in enumerate(args)]


def _meg(model_dir, artifact, extra: str = ""):
    from lm_eval.api.registry import get_model

    arg_string = f"pretrained={model_dir},meg_path={artifact}{extra}"
    return get_model("meg").create_from_arg_string(arg_string, {"batch_size": 4, "device": "cpu"})


def test_route_none_is_the_base_model_and_all_routes_everything(tiny_model_dir, artifact, cases):
    from lm_eval.models.huggingface import HFLM

    model_dir = tiny_model_dir("llama")
    hf = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32")
    base = [ll for ll, _ in hf.loglikelihood(_requests(cases))]

    none = _meg(model_dir, artifact, ",route=none")  # lm-eval parses the text "none" as None
    assert none.edited.meg.routing == "none"
    assert [ll for ll, _ in none.loglikelihood(_requests(cases))] == base
    assert none.edited.stats["routed"] == 0

    forced = _meg(model_dir, artifact, ",route=all,template=gptj")
    routed_all = [ll for ll, _ in forced.loglikelihood(_requests(cases))]
    assert forced.edited.stats["queries"] == forced.edited.stats["routed"] == len(cases) + 1
    assert all(abs(a - b) > 1e-4 for a, b in zip(routed_all, base))

    auto = _meg(model_dir, artifact, ",template=gptj")
    routed_auto = [ll for ll, _ in auto.loglikelihood(_requests(cases))]
    assert auto.edited.routed([c.prompt for c in cases]) == [True] * len(cases)  # the edits are familiar
    assert routed_auto[: len(cases)] == pytest.approx(routed_all[: len(cases)], abs=1e-4)


def test_model_info_reports_the_artifact_and_ddim_steps_override(tiny_model_dir, artifact, cases):
    import json

    config = json.loads((artifact / "config.json").read_text())
    lm = _meg(tiny_model_dir("llama"), artifact, ",ddim_steps=3,route=all")
    assert lm.edited.meg.diffusion.ddim_steps == 3 != config["ddim_steps"]
    info = lm.get_model_info()
    assert info["meg_layer"] == config["layer"] == 1
    assert info["meg_threshold"] == config["threshold"]
    assert (info["meg_ddim_steps"], info["meg_routing"], info["meg_familiarity"]) == (3, "all", True)
    assert info["meg_n_edits"] == len(cases)
    assert info["meg_base_model"] == config["base_model"]
    assert info["meg_path"] == str(artifact)
    json.dumps(info, default=str)  # lm-eval writes it into the results file


def test_bad_model_args_name_the_field(tiny_model_dir, artifact):
    from meg_harness.lm_eval_plugin.models import MegLM

    for extra, field in ((",route=sometimes", "route"), (",ddim_steps=0", "ddim_steps")):
        with pytest.raises(HarnessError) as error:
            _meg(tiny_model_dir("llama"), artifact, extra)
        assert error.value.field == field
    lm = MegLM(pretrained=str(tiny_model_dir("llama")), meg_path=str(artifact), route="none", device="cpu")
    assert lm.edited.meg.routing == "none"


def _general_data(folder):
    """A few records of sst2, rte and mmlu in the shared data's formats (written here, not copied)."""
    import json

    folder.mkdir()
    reviews = [("a fine film .", 1), ("dull .", 0)]
    sst2 = [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate(reviews)]
    rte = [
        {"sentence1": "Paris is in France.", "sentence2": "Paris is in Europe.", "label": 0, "idx": 0},
        {"sentence1": "The cat sleeps.", "sentence2": "The dog barks.", "label": 1, "idx": 1},
    ]
    mmlu = [
        {"question": f"What is {a} + {a}?", "subject": s, "choices": [str(2 * a), "1", "0", "7"], "answer": 0}
        for a, s in ((2, "elementary_mathematics"), (3, "elementary_mathematics"), (4, "astronomy"))
    ]
    for name, records in (("sst2", sst2), ("rte", rte), ("mmlu", mmlu)):
        (folder / f"{name}.json").write_text(json.dumps(records))
    return folder


def test_an_artifact_that_routes_every_query_away_equals_the_base_model_on_general_tasks(
    tiny_model_dir, artifact, tmp_path
):
    """Issue 7 b: threshold 0 (binary entropy is never below it) -> ``--model meg`` is ``--model hf``."""
    import json
    import shutil

    from lm_eval.api.registry import get_model

    from tests.test_lm_eval_support import evaluate_tasks

    never = tmp_path / "never-routes"
    shutil.copytree(artifact, never)
    config = json.loads((never / "config.json").read_text())
    (never / "config.json").write_text(json.dumps({**config, "threshold": 0.0}))
    model_dir = tiny_model_dir("llama")
    tasks = ["sst2_meg_local", "rte_meg_local", "mmlu_meg_local"]
    data = {"general_data": str(_general_data(tmp_path / "general"))}
    meg = _meg(model_dir, never)
    hf = get_model("hf").create_from_arg_string(f"pretrained={model_dir}", {"batch_size": 4, "device": "cpu"})
    outputs = {}
    for name, lm in (("meg", meg), ("hf", hf)):
        responses = []
        for method in ("generate_until", "loglikelihood"):  # every request the tasks send, and scores
            original = getattr(lm, method)

            def record(requests, _original=original, _responses=responses, **kwargs):
                result = _original(requests, **kwargs)
                _responses.extend(result)
                return result

            setattr(lm, method, record)
        outputs[name] = (evaluate_tasks(lm, tasks, **data), responses)
    assert meg.edited.stats["queries"] > 0 and meg.edited.stats["routed"] == 0
    assert outputs["meg"][1] == outputs["hf"][1] and len(outputs["hf"][1]) == 2 + 2 + 3
    assert outputs["meg"][0] == outputs["hf"][0]
    # the same requests scored: log-likelihoods identical too
    requests = _requests(load_cases("counterfact", None)[:2])
    assert [ll for ll, _ in meg.loglikelihood(requests)] == [ll for ll, _ in hf.loglikelihood(requests)]
