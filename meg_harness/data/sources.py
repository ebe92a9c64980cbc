"""Where data files come from: local paths, http(s)/file URLs (cached), ``hf://`` datasets, the demo data."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path

from meg_harness.cache import atomic_path, default_cache_dir
from meg_harness.errors import HarnessError

DATASETS = ("zsre", "counterfact", "mquake", "unke")

#: The public source of each dataset; ``path="download"`` fetches ``url`` (others are listed for reference).
DOWNLOAD_SOURCES: dict[str, dict[str, str]] = {
    "counterfact": {
        "url": "https://rome.baulab.info/data/dsets/counterfact.json",
        "also": "https://rome.baulab.info/data/dsets/multi_counterfact.json (MEMIT's version)",
        "about": "CounterFact (Meng et al., ROME), original ROME/MEMIT format, 21919 records",
    },
    "zsre": {
        "url": "https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
        "also": "EasyEdit's data download (github.com/zjunlp/EasyEdit, section 'Datasets': "
        "ZsRE/zsre_mend_eval.json, zsre_mend_train.json)",
        "about": "zsRE question answering edits (MEND split), MEND/EasyEdit format",
    },
    "mquake": {
        "url": "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k-v2.json",
        "also": "the same folder has MQuAKE-CF-3k.json, MQuAKE-CF.json and MQuAKE-T.json",
        "about": "MQuAKE (Zhong et al.), multi-hop questions over chains of edits, original schema",
    },
    "unke": {
        "url": "https://raw.githubusercontent.com/TrustedLLM/UnKE/main/data/final_data_v2.json",
        "also": "github.com/TrustedLLM/UnKE",
        "about": "UnKEBench: unstructured long-form answers",
    },
}

_DEMO = {"counterfact": "demo/counterfact_demo.json"}
_URL_SCHEMES = ("http://", "https://", "file://")


def check_dataset(dataset: str) -> str:
    """The dataset name, lower-cased; HarnessError when it is not one of :data:`DATASETS`."""
    name = str(dataset).strip().lower()
    if name not in DATASETS:
        raise HarnessError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}", field="dataset")
    return name


def demo_path(dataset: str) -> Path:
    """The demo file shipped with the package for ``dataset``."""
    name = check_dataset(dataset)
    if name not in _DEMO:
        source = DOWNLOAD_SOURCES[name]
        raise HarnessError(
            f"no demo data ships for {name}: pass a file path, a URL, or 'download' to fetch it from "
            f"{source['url']} (also: {source['also']})",
            field="data_path",
        )
    return Path(str(resources.files("meg_harness.data").joinpath(_DEMO[name])))


def resolve_data_path(
    dataset: str, path: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local file for ``path``:

    * None -> the demo data (CounterFact only; other datasets raise, naming their download source);
    * ``"download"`` -> the URL in :data:`DOWNLOAD_SOURCES`;
    * an http(s):// or file:// URL -> downloaded once into ``cache_dir/downloads``;
    * ``hf://<owner>/<repo>/<file>`` -> a Hugging Face *dataset* file via huggingface_hub;
    * anything else -> a local path that must be a file."""
    name = check_dataset(dataset)
    if path is None:
        return demo_path(name)
    text = str(path).strip()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if text.lower() == "download":
        return download_url(DOWNLOAD_SOURCES[name]["url"], cache)
    if text.lower().startswith(_URL_SCHEMES):
        return download_url(text, cache)
    if text.lower().startswith("hf://"):
        return hf_download(text, cache)
    local = Path(text).expanduser()
    if local.is_dir():
        raise HarnessError("is a directory, expected a data file", file=local, field="data_path")
    if not local.is_file():
        raise HarnessError("no such file", file=local, field="data_path")
    return local


def download_url(url: str, cache_dir: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download ``url`` (http, https or file) into ``cache_dir/downloads/<sha256(url)[:16]>-<name>``,
    reusing the file when present. Written to a temp file and renamed, so a killed download leaves no
    partial file under the final name."""
    parsed = urllib.parse.urlparse(url)
    name = Path(urllib.parse.unquote(parsed.path)).name or "download.json"
    folder = Path(cache_dir) / "downloads"
    target = folder / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]}-{name}"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"cannot create the cache folder ({exc.strerror or exc})", file=folder) from None
    try:
        with (
            atomic_path(target, suffix=".part") as tmp,
            open(tmp, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as response,  # noqa: S310
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise HarnessError(f"download failed: {reason}", file=url, field="data_path") from None
    return target


def hf_download(uri: str, cache_dir: str | os.PathLike) -> Path:
    """``hf://<owner>/<repo>/<path/in/repo>`` -> a local copy of that file of a Hugging Face dataset repo."""
    parts = uri[len("hf://") :].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise HarnessError(
            "expected hf://<owner>/<dataset repo>/<file in the repo>", file=uri, field="data_path"
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise HarnessError(
            "hf:// paths need the huggingface_hub package (pip install huggingface_hub)",
            file=uri,
            field="data_path",
        ) from None
    try:
        local = hf_hub_download(
            repo_id=repo_id, filename=filename, repo_type="dataset", cache_dir=str(Path(cache_dir) / "hf")
        )
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "could not fetch"
        raise HarnessError(
            f"download from the Hugging Face hub failed: {type(exc).__name__}: {exc}",
            file=uri,
            field="data_path",
        ) from None
    return Path(local)
