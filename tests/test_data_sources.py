"""resolve_data_path: local files, file:// and http:// URLs (cached), "download", hf:// (faked hub)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meg_harness.data import DOWNLOAD_SOURCES, load_cases, resolve_data_path
from meg_harness.data import sources as sources_module
from meg_harness.errors import HarnessError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


def test_local_path_and_demo(tmp_path):
    assert resolve_data_path("zsre", str(FIXTURES / "zsre.json")) == FIXTURES / "zsre.json"
    assert resolve_data_path("counterfact", None).name == "counterfact_demo.json"


def test_download_sources_documented():
    assert set(DOWNLOAD_SOURCES) == {"zsre", "counterfact", "mquake", "unke"}
    assert DOWNLOAD_SOURCES["counterfact"]["url"] == "https://rome.baulab.info/data/dsets/counterfact.json"
    assert all(src["url"].startswith("https://") for src in DOWNLOAD_SOURCES.values())


def test_file_url_is_cached(tmp_path):
    url = (FIXTURES / "counterfact.json").as_uri()
    first = resolve_data_path("counterfact", url, cache_dir=tmp_path)
    assert first.parent == tmp_path / "downloads" and first.name.endswith("-counterfact.json")
    assert first.read_bytes() == (FIXTURES / "counterfact.json").read_bytes()
    assert not list((tmp_path / "downloads").glob("*.part"))
    first.write_text(first.read_text() + "\n")  # a second call reuses the cached file, it does not re-fetch
    second = resolve_data_path("counterfact", url, cache_dir=tmp_path)
    assert second == first and second.read_text().endswith("\n\n")
    assert len(load_cases("counterfact", url, cache_dir=tmp_path)) == 5


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEG_HARNESS_CACHE", str(tmp_path / "envcache"))
    path = resolve_data_path("zsre", (FIXTURES / "zsre.json").as_uri())
    assert path.is_relative_to(tmp_path / "envcache")


def test_missing_file_url(tmp_path):
    url = (tmp_path / "absent.json").as_uri()
    with pytest.raises(HarnessError) as info:
        resolve_data_path("zsre", url, cache_dir=tmp_path)
    assert url in str(info.value) and "download failed" in str(info.value)
    assert not list((tmp_path / "downloads").iterdir())


def test_download_keyword(tmp_path, monkeypatch):
    monkeypatch.setitem(
        DOWNLOAD_SOURCES, "mquake", {**DOWNLOAD_SOURCES["mquake"], "url": (FIXTURES / "mquake.json").as_uri()}
    )
    cases = load_cases("mquake", "download", cache_dir=tmp_path)
    assert [c.case_id for c in cases] == ["501", "502"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def http_root() -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 serving the fixtures folder; stopped at the end."""
    _Handler.requests = []
    handler = functools.partial(_Handler, directory=str(FIXTURES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_download(tmp_path, http_root):
    url = f"{http_root}/zsre.json"
    cases = load_cases("zsre", url, cache_dir=tmp_path)
    assert len(cases) == 3 and cases[0].subject == "Torvald Bridge"
    load_cases("zsre", url, cache_dir=tmp_path)  # cached: no second request
    assert _Handler.requests == ["/zsre.json"]
    files = list((tmp_path / "downloads").iterdir())
    assert len(files) == 1 and files[0].read_bytes() == (FIXTURES / "zsre.json").read_bytes()


def test_http_404(tmp_path, http_root):
    url = f"{http_root}/missing.json"
    with pytest.raises(HarnessError) as info:
        load_cases("zsre", url, cache_dir=tmp_path)
    assert url in str(info.value) and "download failed" in str(info.value)
    assert not list((tmp_path / "downloads").iterdir())


def test_hf_uri(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type, cache_dir):
        calls.append((repo_id, filename, repo_type))
        return str(FIXTURES / "unke.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    cases = load_cases("unke", "hf://someone/unke-data/data/final.json", cache_dir=tmp_path)
    assert len(cases) == 2
    assert calls == [("someone/unke-data", "data/final.json", "dataset")]


def test_hf_uri_errors(tmp_path, monkeypatch):
    with pytest.raises(HarnessError, match="expected hf://<owner>/<dataset repo>/<file in the repo>"):
        resolve_data_path("unke", "hf://only-one-part", cache_dir=tmp_path)

    import huggingface_hub

    def failing(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(HarnessError, match="hf://a/b/c.json.*Hugging Face hub failed: OSError: offline"):
        resolve_data_path("unke", "hf://a/b/c.json", cache_dir=tmp_path)


def test_sources_module_datasets():
    assert sources_module.DATASETS == ("zsre", "counterfact", "mquake", "unke")
