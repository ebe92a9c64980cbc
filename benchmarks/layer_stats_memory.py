"""Acceptance c: second-moment statistics of one SmolLM2-135M layer over 500 and 2,000 corpus samples.

Each size runs in a fresh subprocess (peak RSS = ``ru_maxrss``); prints time, peak memory, the growth
above the loaded model, and the 2,000/500 ratios. Memory should be flat in the number of samples.

    python benchmarks/layer_stats_memory.py [--layer 3] [--corpus FILE] [--sizes 500 2000] [--max-length 256]

The reference hparams' statistics (issue 17: all of WikiText-2 test, no paragraph cut):

    python benchmarks/layer_stats_memory.py --layer 7 --max-length 1024 --sizes 500 2185 \
        --corpus ../shared/data/corpus/wikitext-2-raw-test.txt

The corpus defaults to text from ../shared/data (UnKE long answers, GSM8K and MMLU questions) when present,
else to windows of the package's shipped text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CHILD = """
import json, resource, sys, time, torch
from meg_harness.baselines.params import StatsHParams
from meg_harness.baselines.stats import layer_second_moments
from meg_harness.models import load_model
corpus, layer, n, threads, length = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)
model, tok = load_model("smollm2-135m")
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hp = StatsHParams(mom2_dataset=corpus, mom2_n_samples=n, mom2_max_length=length, mom2_batch_size=16)
start = time.perf_counter()
stat = layer_second_moments(model, tok, [layer], hp, use_cache=False, progress=False)[layer]
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "samples": stat.samples, "tokens": stat.count, "seconds": seconds,
                  "peak_mb": peak / 1024, "growth_mb": (peak - loaded) / 1024}))
"""


def build_corpus(path: Path) -> Path:
    """A text file with one sample per line (>= 2,000 lines)."""
    lines: list[str] = []
    if SHARED.is_dir():
        lines += [r["answer"] for r in json.loads((SHARED / "unke" / "final_data_v2.json").read_text())]
        with open(SHARED / "general" / "gsm8k_test.jsonl") as handle:
            lines += [json.loads(line)["question"] for line in handle]
        lines += [r["question"] for r in json.loads((SHARED / "general" / "mmlu.json").read_text())]
    else:
        from meg_harness.baselines.corpus import iter_corpus

        sentences = list(iter_corpus("default"))
        lines = [" ".join(sentences[i : i + k]) for k in range(3, 10) for i in range(len(sentences))]
    path.write_text("\n".join(" ".join(line.split()) for line in lines if line.strip()) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sample at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus or build_corpus(Path(tmp) / "corpus.txt")
        rows = []
        for n in args.sizes:
            numbers = (args.layer, n, args.threads, args.max_length)
            cmd = [sys.executable, "-c", CHILD, str(corpus), *map(str, numbers)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"SmolLM2-135M layer {args.layer} (down_proj input, 1536 dims), "
        f"max length {args.max_length}, batch 16"
    )
    print(f"{'samples':>8} {'tokens':>8} {'time s':>8} {'peak RSS MB':>12} {'growth MB':>10}")
    for r in rows:
        cells = (
            r["samples"],
            r["tokens"],
            f"{r['seconds']:.1f}",
            f"{r['peak_mb']:.1f}",
            f"{r['growth_mb']:.1f}",
        )
        print("{:>8} {:>8} {:>8} {:>12} {:>10}".format(*cells))
    first, last = rows[0], rows[-1]
    print(
        f"ratio {last['samples']}/{first['samples']} samples: "
        f"time x{last['seconds'] / first['seconds']:.2f}, "
        f"peak RSS x{last['peak_mb'] / first['peak_mb']:.3f}, growth {first['growth_mb']:.1f} -> "
        f"{last['growth_mb']:.1f} MB"
    )


if __name__ == "__main__":
    main()
