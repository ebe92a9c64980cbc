"""lm-evaluation-harness integration: the ``meg`` and ``edited`` models, the knowledge-editing task classes
and their registration (see README.md beside this file).

Importing this package is light (no torch, no lm_eval): the ``.pth`` start-up hook imports it in every
Python process.
"""

from __future__ import annotations

MODELS: dict[str, str] = {
    "meg": "meg_harness.lm_eval_plugin.models:MegLM",
    "edited": "meg_harness.lm_eval_plugin.models:EditedLM",
}


def register() -> None:
    """Register ``meg`` and ``edited`` in lm-eval's model registry as lazy ``"module:Class"`` strings.

    lm-eval's ``get_model`` imports its built-in model table only when the registry is empty, so the
    built-in table is imported first (it is light: name -> string pairs); our classes (torch,
    transformers) are imported only when ``--model meg|edited`` is asked for. In the ``lm_eval`` command it
    also installs the one-line error display of :mod:`meg_harness.lm_eval_plugin.cli_errors`.
    """
    import lm_eval.models  # noqa: F401  (registers hf, vllm, ... lazily)
    from lm_eval.api.registry import model_registry

    from meg_harness.lm_eval_plugin.cli_errors import install

    install()  # in the `lm_eval` command: our errors as one line, exit code 2

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)
