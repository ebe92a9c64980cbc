"""What every result records about where it came from: versions, git sha, peak memory."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from pathlib import Path

import meg_harness


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that affect numbers."""
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "meg_harness": meg_harness.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def git_sha() -> str | None:
    """The commit of the meg_harness checkout (with ``+dirty`` for uncommitted changes), if it is one."""
    root = Path(meg_harness.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
