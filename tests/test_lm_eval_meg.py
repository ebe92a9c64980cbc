"""``--model meg`` on a tiny MeG artifact: loading, the ``route`` and ``ddim_steps`` args, model info."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from meg_harness.data import load_cases  # noqa: E402
from meg_harness.editing.registry import get_editor_class  # noqa: E402
from meg_harness.errors import HarnessError  # noqa: E402
from meg_harness.evaluate.templates import get_template  # noqa: E402
from meg_harness.meg.encoder import make_tiny_text_encoder  # noqa: E402
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
