"""Shared fixtures: tiny random models built offline, the location of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder (no state leaks between tests or into ~/.cache)."""
    monkeypatch.setenv("MEG_HARNESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build (once per session) a tiny random model of an architecture; returns its folder."""
    from meg_harness.models.tiny import make_tiny_model

    built: dict[str, Path] = {}

    def build(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, seed=0)
        return built[arch]

    return build


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repository; the test skips when a fresh clone has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real benchmark data not found at {SHARED_DATA} (only present in the project's workplace)"
        )
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """The hub is unreachable here: fail hub look-ups at once instead of retrying."""
    import os

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if previous is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = previous


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models are fastest on one thread, and a busy 2-core machine makes multi-threaded small ops
    very slow (measured ~40x here under load). Slow (real-model) tests keep torch's default."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir):
    """Load (once per module) the tiny model of an architecture: ``tiny_models("llama") -> (model, tok)``."""
    from meg_harness.models import load_model

    loaded: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = load_model(str(tiny_model_dir(arch)))
        return loaded[arch]

    return get


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> str:
    """A saved tiny random BERT text encoder (MeG's stage 1) for tiny MeG configurations."""
    from meg_harness.meg.encoder import make_tiny_text_encoder

    folder = tmp_path_factory.mktemp("encoder")
    make_tiny_text_encoder().save(folder)
    return str(folder)
