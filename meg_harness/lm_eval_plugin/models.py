"""The lm-eval models ``meg`` (MeG: a generated neuron per query) and ``edited`` (a saved weight edit).

    lm_eval --model meg    --model_args pretrained=PATH_OR_ALIAS,meg_path=ARTIFACT_DIR ...
    lm_eval --model meg    --model_args pretrained=...,meg_path=...,route=all,ddim_steps=50 ...
    lm_eval --model edited --model_args pretrained=PATH_OR_ALIAS,delta=ARTIFACT_DIR ...
    lm_eval --model edited --model_args pretrained=PATH_OR_ALIAS ...        (the unedited model)

Each run loads a fresh model and applies the edit once; nothing is restored. Every other model arg is
HFLM's (``batch_size``, ``device``, ``max_length``, ...), plus ``template`` and ``cache_dir`` (see
:class:`PerRowHFLM`); ``meg`` also takes ``route`` and ``ddim_steps`` (see :class:`MegLM`). ``delta``
here is a meg-harness artifact folder, not HFLM's own ``delta``.

Bad model args and artifacts (missing, truncated, of the other model kind) are found before the model is
loaded; an artifact that does not fit the loaded model is a :class:`HarnessError` too. In the ``lm_eval``
command each is one line on stderr and exit code 2 (:mod:`meg_harness.lm_eval_plugin.cli_errors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lm_eval.models  # noqa: F401  (lm-eval's own table first: get_model imports it only when empty)
from lm_eval.api.registry import register_model

from meg_harness.editing.base import Edited, Editor
from meg_harness.errors import HarnessError
from meg_harness.lm_eval_plugin import cli_errors
from meg_harness.lm_eval_plugin.artifacts import (
    artifact_method,
    check_edit_artifact,
    check_tensor_files,
    load_artifact,
)
from meg_harness.lm_eval_plugin.perrow import PerRowHFLM
from meg_harness.meg.model import check_routing
from meg_harness.settings import POSITIVE, Rule, Settings, settings_from_mapping

log = logging.getLogger(__name__)
cli_errors.install()  # in the `lm_eval` command (also when registered without the start-up hook)

MEG_SOURCE = (
    "MeG artifacts come from `meg-harness run` with `methods: [meg]` (the folder <out>/meg/seed<k>/artifact)"
)


@dataclass(frozen=True)
class MegArgs(Settings):
    """``--model meg``'s own model args besides ``meg_path`` (see :class:`MegLM`)."""

    route: str = "auto"
    ddim_steps: int | None = None

    CHECKS: ClassVar[Mapping[str, Rule]] = {"ddim_steps": POSITIVE}

    def check(self) -> None:
        check_routing(self.route)

    @classmethod
    def parse(cls, route: Any, ddim_steps: Any) -> MegArgs:
        """From lm-eval's reading of ``--model_args`` (``none`` becomes None, ``-3`` becomes -3.0, words stay
        text). A value outside a field's rule is named as typed: ``ddim_steps must be a positive integer``."""
        values = {"route": "none" if route is None else str(route), "ddim_steps": _whole_number(ddim_steps)}
        try:
            return settings_from_mapping(cls, values, "meg model arg")
        except HarnessError as error:
            if error.field and error.reason.startswith("must be"):
                raise HarnessError(f"{error.field} {error.reason}", field=error.field) from None
            raise


def _whole_number(value: Any) -> Any:
    """An integral float or the text of an integer as an int (``-3.0``, ``"7"``); anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    return value


def check_meg_artifact(meg_path: str | Path) -> dict[str, Any]:
    """Check the MeG artifact in ``meg_path`` without loading any model; its ``config.json``."""
    path = Path(meg_path).expanduser()
    if not path.is_dir():
        raise HarnessError(
            f"the MeG artifact folder does not exist; {MEG_SOURCE}", file=path, field="meg_path"
        )
    method = artifact_method(path)
    if method is None:
        raise HarnessError(f"not a MeG artifact folder; {MEG_SOURCE}", file=path, field="meg_path")
    if method != "meg":
        raise HarnessError(
            f"this is a {method!r} artifact, not MeG's: use `--model edited --model_args delta=...`",
            file=path,
            field="meg_path",
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise HarnessError(f"unreadable MeG artifact config: {reason}", file=path / "config.json") from None
    if not isinstance(config, dict):
        raise HarnessError("the MeG artifact config is not a mapping", file=path / "config.json")
    for name in ("generator.safetensors", "normalizer.safetensors"):
        if not (path / name).is_file():
            raise HarnessError(f"the MeG artifact lacks {name}", file=path, field="meg_path")
    check_tensor_files(path)
    return config


def load_edited(meg_path: str | Path, model: Any, tokenizer: Any) -> Edited:
    """Apply the MeG artifact in ``meg_path`` to ``model`` (extension point).

    Dispatches to the ``meg`` Editor's :meth:`Editor.load` through the editing registry: once MeG's
    Editor implements ``load`` (encoder + familiarity network + generator -> a per-row :class:`Edited`),
    this works unchanged.
    """
    from meg_harness.editing.registry import get_editor_class

    check_meg_artifact(meg_path)
    try:
        editor = get_editor_class("meg")
    except HarnessError:
        editor = None
    if editor is None or editor.load.__func__ is Editor.load.__func__:
        raise HarnessError(
            f"this installation cannot load MeG artifacts yet (no `meg` editor with a loader); {MEG_SOURCE}",
            file=meg_path,
            field="meg_path",
        )
    return editor.load(Path(meg_path), model, tokenizer)


@register_model("meg")
class MegLM(PerRowHFLM):
    """MeG: each batch row gets the neuron generated for its own question (or none when routed away).

    Model args beyond :class:`PerRowHFLM`'s: ``meg_path`` (the artifact folder), ``route`` (``auto``: the
    familiarity network decides; ``all``: every query gets a generated neuron, the no-FN ablation; ``none``:
    no query does) and ``ddim_steps`` (overrides the artifact's DDIM step count).
    """

    def __init__(
        self,
        pretrained: str,
        meg_path: str | None = None,
        route: str | None = "auto",
        ddim_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not meg_path:
            raise HarnessError(f"--model meg needs meg_path=ARTIFACT_DIR; {MEG_SOURCE}", field="meg_path")
        self.meg_path = str(meg_path)
        args = MegArgs.parse(route, ddim_steps)
        self.route, self.ddim_steps = args.route, args.ddim_steps
        self.meg_config = check_meg_artifact(self.meg_path)  # before the model is loaded
        super().__init__(pretrained, **kwargs)

    def load_edited(self, model: Any, tokenizer: Any) -> Edited:
        edited = load_edited(self.meg_path, model, tokenizer)
        expected = self.meg_config.get("base_fingerprint")
        if expected:
            from meg_harness.models.loading import model_fingerprint

            if expected != model_fingerprint(model):
                log.warning(
                    "%s was fitted on another base model (%s, fingerprint %s)",
                    self.meg_path,
                    self.meg_config.get("base_model") or "?",
                    expected,
                )
        configure = getattr(edited, "configure", None)
        if configure is None:
            if self.route != "auto" or self.ddim_steps is not None:
                raise HarnessError("this MeG loader does not support route= or ddim_steps=", field="route")
            return edited
        configure(routing=self.route, ddim_steps=self.ddim_steps)
        return edited

    def artifact_folder(self) -> str | None:
        return self.meg_path

    def get_model_info(self) -> dict:
        """HFLM's model info plus the artifact's MeG settings (``meg_*``) and the routing counts so far."""
        info = super().get_model_info()
        info["meg_path"] = self.meg_path
        meg = getattr(self.edited, "meg", None)
        if meg is not None:
            info.update({f"meg_{k}": v for k, v in meg.describe().items()})
        stats = getattr(self.edited, "stats", None)
        if stats is not None:
            info.update({f"meg_{k}": v for k, v in stats.items()})
        return info


@register_model("edited")
class EditedLM(PerRowHFLM):
    """A model with a saved edit applied (``delta=`` an artifact folder); the unedited model without it."""

    def __init__(self, pretrained: str, delta: str | None = None, **kwargs: Any) -> None:
        self.delta_path = str(delta) if delta else None
        if self.delta_path is not None:
            check_edit_artifact(self.delta_path)  # before the model is loaded
        super().__init__(pretrained, **kwargs)

    def artifact_folder(self) -> str | None:
        return self.delta_path

    def load_edited(self, model: Any, tokenizer: Any) -> Edited:
        if self.delta_path is None:
            return Edited(model, tokenizer)
        return load_artifact(self.delta_path, model, tokenizer)
