"""Build step (pyproject ``[tool.setuptools.cmdclass] build_py``): ships ``meg_harness_lm_eval.pth``.

A ``.pth`` file at the root of site-packages whose line starts with ``import`` is executed at interpreter
start; ours installs the lazy hook of :mod:`meg_harness.lm_eval_plugin._startup`, so that the plain
``lm_eval --model meg|edited`` CLI finds our models (lm-eval 0.4.13 has no model entry points).

setuptools loads this file by path at build time: standard library and setuptools imports only.
Regular wheel: the file is written to ``build_lib`` (the wheel's root = site-packages). Editable install
(PEP 660): setuptools collects only package files from ``build_lib`` and copies the ``install`` command's
``install_lib`` (the unpacked editable wheel) as is, so the file is written there.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "meg_harness_lm_eval.pth"
PTH_LINE = "import meg_harness.lm_eval_plugin._startup as _mh_startup; _mh_startup.install()\n"


class BuildPyWithPth(build_py):
    """``build_py`` that also writes :data:`PTH_NAME`."""

    def run(self) -> None:
        super().run()
        directory = self._pth_dir()
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)

    def _pth_dir(self) -> str:
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs
