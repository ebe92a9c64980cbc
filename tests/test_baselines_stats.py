"""Second-moment statistics: streaming corpus, N + N = 2N, cache, memory flat in N."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_baselines_support import deep_model

from meg_harness.baselines import stats as stats_module
from meg_harness.baselines.corpus import corpus_id, iter_corpus
from meg_harness.baselines.params import StatsHParams
from meg_harness.baselines.stats import SecondMoment, layer_second_moments
from meg_harness.errors import HarnessError


def test_default_corpus_is_shipped_and_streams_from_an_offset():
    samples = list(iter_corpus("default"))
    assert len(samples) >= 300 and all(s.strip() == s and s for s in samples)
    assert list(iter_corpus("default", start=10))[:3] == samples[10:13]
    assert corpus_id("default").startswith("sha256:")


def test_local_text_and_jsonl_corpora(tmp_path):
    (tmp_path / "c.txt").write_text("first line\n\n  second line  \n")
    assert list(iter_corpus(str(tmp_path / "c.txt"))) == ["first line", "second line"]
    (tmp_path / "c.jsonl").write_text('{"text": "a b"}\n{"text": ""}\n{"text": "c"}\n')
    assert list(iter_corpus(str(tmp_path / "c.jsonl"))) == ["a b", "c"]
    with pytest.raises(HarnessError, match="not found"):
        list(iter_corpus(str(tmp_path / "missing.txt")))


def test_statistics_of_n_and_n_more_samples_average_to_those_of_2n():
    model, tok = deep_model("llama")
    hp = StatsHParams(mom2_n_samples=24, mom2_max_length=32, mom2_batch_size=5, mom2_dtype="float64")
    first = layer_second_moments(model, tok, [1, 2], hp, use_cache=False, progress=False)
    second = layer_second_moments(model, tok, [1, 2], hp, start=24, use_cache=False, progress=False)
    hp2 = StatsHParams(mom2_n_samples=48, mom2_max_length=32, mom2_batch_size=7, mom2_dtype="float64")
    both = layer_second_moments(model, tok, [1, 2], hp2, use_cache=False, progress=False)
    for layer in (1, 2):
        merged = first[layer].merge(second[layer])
        assert merged.count == both[layer].count and merged.samples == both[layer].samples == 48
        expected = first[layer].count * first[layer].moment() + second[layer].count * second[layer].moment()
        expected /= first[layer].count + second[layer].count
        torch.testing.assert_close(merged.moment(), both[layer].moment(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(expected, both[layer].moment(), rtol=1e-10, atol=1e-12)
        assert both[layer].moment().shape == (128, 128)  # the down_proj input width (intermediate size)


def test_statistics_are_cached_per_layer_and_reused(tmp_path, monkeypatch):
    model, tok = deep_model("gpt2")
    hp = StatsHParams(mom2_n_samples=10, mom2_max_length=16)
    first = layer_second_moments(model, tok, [0, 2], hp, cache_dir=tmp_path, progress=False)
    files = sorted((tmp_path / "layer_stats").glob("*.safetensors"))
    assert len(files) == 2
    calls = []
    original = stats_module._accumulate
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    again = layer_second_moments(model, tok, [2, 0, 1], hp, cache_dir=tmp_path, progress=False)
    assert [sorted(c) for c in calls] == [[1]]  # only the missing layer is computed
    for layer in (0, 2):
        assert (
            torch.equal(again[layer].total, first[layer].total) and again[layer].count == first[layer].count
        )
    other = StatsHParams(mom2_n_samples=11, mom2_max_length=16)
    layer_second_moments(model, tok, [0], other, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "layer_stats").glob("*.safetensors"))) == 4  # n is part of the key


def test_a_run_needing_statistics_another_is_computing_waits_and_reads_them(tmp_path, monkeypatch):
    import threading

    from meg_harness.cache import exclusive

    model, tok = deep_model("gpt2")
    hp = StatsHParams(mom2_n_samples=10, mom2_max_length=16)
    calls = []
    original = stats_module._accumulate
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    first = layer_second_moments(model, tok, [1], hp, cache_dir=tmp_path, progress=False)
    entry = next((tmp_path / "layer_stats").glob("*.safetensors"))
    moved = entry.rename(tmp_path / "computed.safetensors")  # as if another run is still computing it
    waited = {}
    with exclusive(entry.with_suffix(".lock")):  # that other run holds the entry's lock
        waiter = threading.Thread(
            target=lambda: waited.update(
                layer_second_moments(model, tok, [1], hp, cache_dir=tmp_path, progress=False)
            )
        )
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive()  # blocked on the lock, not computing
        moved.rename(entry)  # the other run saves its result and releases the lock
    waiter.join(timeout=60)
    assert len(calls) == 1  # computed once, by the first call
    assert torch.equal(waited[1].total, first[1].total)


def test_second_moment_save_load_roundtrip(tmp_path):
    stat = SecondMoment.zeros(3, torch.float64)
    stat.update(torch.arange(6.0).reshape(2, 3))
    stat.samples = 1
    stat.save(tmp_path / "s.safetensors")
    loaded = SecondMoment.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.total, stat.total) and (loaded.count, loaded.samples) == (2, 1)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    torch.set_num_threads(1)
    from meg_harness.baselines.params import StatsHParams
    from meg_harness.baselines.stats import layer_second_moments
    from meg_harness.models import load_model
    model, tok = load_model({model!r})
    def run(n):
        hp = StatsHParams(mom2_dataset={corpus!r}, mom2_n_samples=n, mom2_max_length=128, mom2_batch_size=8)
        return layer_second_moments(model, tok, [0, 1], hp, use_cache=False, progress=False)[0].count
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(16)  # warm up: allocators, one batch
    base = peak()
    result = {{}}
    for n in (200, 800):  # ru_maxrss is the process's peak so far: a growing peak shows in the larger run
        count = run(n)
        result[n] = {{"growth_kb": peak() - base, "count": count}}
    print(json.dumps(result))
    """
)


def test_peak_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    corpus = tmp_path / "long.txt"
    words = " ".join(iter_corpus("default")).split()
    lines = [" ".join((words * 2)[7 * i % len(words) :][:120]) for i in range(800)]
    corpus.write_text("\n".join(lines) + "\n")
    model, tok = deep_model("gpt2", layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    script = PEAK_SCRIPT.format(model=str(tmp_path / "model"), corpus=str(corpus))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert result[800]["count"] == 4 * result[200]["count"] == 4 * 200 * 128
    # Retaining the keys (128 tokens x 256 floats per sample) would take ~78 MB more for 800 samples than
    # for 200; streaming adds at most allocator noise (measured: a few MB).
    assert result[800]["growth_kb"] - result[200]["growth_kb"] < 24 * 1024, result
