"""Build step (pyproject ``[tool.setuptools.cmdclass] build_py``): ships the repository's ``hparams/`` and
``tasks/`` folders with the package, and ``meg_harness_lm_eval.pth``.

- ``hparams/`` and ``tasks/`` stay at the top of the repository (their one source); a regular build copies
  them to ``meg_harness/_resources/`` in ``build_lib``, which the wheel installs, and
  :func:`meg_harness.shipped.shipped_dir` finds them there. An editable install copies nothing: it reads
  the repository's folders. ``MANIFEST.in`` puts both folders in the sdist, so a wheel built from it has them.
- A ``.pth`` file at the root of site-packages whose line starts with ``import`` is executed at interpreter
  start; ours installs the lazy hook of :mod:`meg_harness.lm_eval_plugin._startup`, so that the plain
  ``lm_eval --model meg|edited`` CLI finds our models (lm-eval 0.4.13 has no model entry points).

setuptools loads this file by path at build time: standard library and setuptools imports only.
Regular wheel: the files are written to ``build_lib`` (the wheel's root = site-packages). Editable install
(PEP 660): setuptools collects only package files from ``build_lib`` and copies the ``install`` command's
``install_lib`` (the unpacked editable wheel) as is, so the ``.pth`` file is written there.
"""

from __future__ import annotations

import os
import shutil

from setuptools.command.build_py import build_py

PTH_NAME = "meg_harness_lm_eval.pth"
PTH_LINE = "import meg_harness.lm_eval_plugin._startup as _mh_startup; _mh_startup.install()\n"
SHIPPED = ("hparams", "tasks")  # top-level folders installed as meg_harness/_resources/<name>
RESOURCES = os.path.join("meg_harness", "_resources")


class BuildPy(build_py):
    """``build_py`` that also copies :data:`SHIPPED` into the package and writes :data:`PTH_NAME`."""

    def run(self) -> None:
        super().run()
        if not self._editable():
            for name in SHIPPED:
                self._copy_shipped(name)
        directory = self._pth_dir()
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)

    def _editable(self) -> bool:
        return bool(getattr(self, "editable_mode", False))

    def _copy_shipped(self, name: str) -> None:
        source = os.path.join(os.path.abspath(os.path.dirname(self.distribution.script_name or "")), name)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"{source}: meg-harness ships this folder; build from a full checkout")
        target = os.path.join(self.build_lib, RESOURCES, name)
        if os.path.isdir(target):
            shutil.rmtree(target)  # files deleted from the source must not survive in a reused build folder
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def _shipped_outputs(self) -> list[str]:
        outputs = []
        for name in SHIPPED:
            for folder, _dirs, files in os.walk(os.path.join(self.build_lib, RESOURCES, name)):
                outputs += [os.path.join(folder, file) for file in files]
        return sorted(outputs)

    def _pth_dir(self) -> str:
        if self._editable():
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self._editable():
            outputs += [*self._shipped_outputs(), os.path.join(self.build_lib, PTH_NAME)]
        return outputs
