"""The output-folder lock: a second `meg-harness run` on a folder in use is refused with one line naming the
holder, writes nothing, and the lock goes away with its holder (also after kill -9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meg_harness.errors import HarnessError
from meg_harness.lock import LOCK_FILE, output_lock

HOLDER = (
    "import sys, time\n"
    "from meg_harness.lock import output_lock\n"
    "with output_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    """A separate process holding ``folder``'s lock until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_process_is_refused_with_one_line_naming_the_holder(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"model": str(tiny_model_dir("gpt2")), "dataset": "counterfact", "n_edits": 2})
    )
    holder = _holder(out)
    try:
        before = _listing(out)
        recorded = json.loads((out / LOCK_FILE).read_text())
        assert recorded["pid"] == holder.pid and recorded["command"].endswith(str(out))
        done = subprocess.run(
            [sys.executable, "-m", "meg_harness.cli", "run", str(config), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("meg-harness: error: ")
        assert f"pid {holder.pid} on " in lines[0] and "in use by another meg-harness process" in lines[0]
        assert str(out) in lines[0]
        assert _listing(out) == before  # nothing written, the lock file untouched
    finally:
        holder.kill()
        holder.wait()
    # kill -9: the OS released the lock; the stale file is locked again by the next holder
    assert (out / LOCK_FILE).is_file()
    with output_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists() and (out / "earlier.txt").read_text() == "kept"


def test_lock_is_reentrant_in_one_process_and_cleans_up(tmp_path):
    folder = tmp_path / "new" / "out"
    with output_lock(folder) as path:
        with output_lock(folder):  # the same process (e.g. a run of several scales) may lock again
            assert path.is_file()
        assert path.is_file()  # still held by the outer block
        holder = subprocess.run(
            [sys.executable, "-c", HOLDER, str(folder)], capture_output=True, text=True, timeout=120
        )
        assert holder.returncode != 0 and "in use by another meg-harness process" in holder.stderr
    assert not folder.exists()  # created by the lock and left empty: removed
    kept = tmp_path / "kept"
    with output_lock(kept):
        (kept / "metrics.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.json"]


def test_a_holder_that_has_not_written_yet_is_reported_as_unknown(tmp_path):
    import fcntl

    (tmp_path / LOCK_FILE).write_text("")
    with open(tmp_path / LOCK_FILE) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        # flock locks belong to open files: this process's own output_lock is refused like another's
        with pytest.raises(HarnessError, match=r"unknown \(no holder recorded yet\)"):
            with output_lock(tmp_path):
                pass


# the first run waits inside its lock until the test lets it go, so the two runs overlap for certain
PAUSED_RUN = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "import meg_harness.runner as runner\n"
    "from meg_harness.cli import main\n"
    "inner = runner._run_experiment\n"
    "def paused(*args, **kwargs):\n"
    "    while not Path(go).exists():\n"
    "        time.sleep(0.05)\n"
    "    return inner(*args, **kwargs)\n"
    "runner._run_experiment = paused\n"
    "go, sys.argv = sys.argv[1], ['meg-harness', *sys.argv[2:]]\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


def test_concurrent_runs_second_is_refused(tmp_path, tiny_model_dir):
    """Two real `meg-harness run` processes on one folder: the first finishes, the second is refused."""
    data = [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "The capital of {} is",
                "subject": country,
                "target_new": {"str": "Rome"},
                "target_true": {"str": "Paris"},
            },
            "paraphrase_prompts": [f"{country}'s capital city is"],
            "neighborhood_prompts": ["The capital of Chile is"],
        }
        for i, country in enumerate(["France", "Spain", "Italy"])
    ]
    (tmp_path / "cf.json").write_text(json.dumps(data))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir("gpt2")),
                "dataset": "counterfact",
                "data_path": str(tmp_path / "cf.json"),
                "n_edits": 2,
                "methods": ["none"],
                "batch_size": 2,
            }
        )
    )
    out, go = tmp_path / "out", tmp_path / "go"
    arguments = ["run", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, str(go), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_FILE).is_file(), first.stderr.read() if first.poll() is not None else "no lock"
        second = subprocess.run(
            [sys.executable, "-m", "meg_harness.cli", *arguments],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    finally:
        go.touch()
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1, second.stderr
    assert f"pid {first.pid} on " in second.stderr and "command: meg-harness run " in second.stderr
    assert (out / "none" / "seed0" / "metrics.json").is_file() and not (out / LOCK_FILE).exists()
