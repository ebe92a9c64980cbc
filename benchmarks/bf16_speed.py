"""bfloat16 vs float32 on this CPU: a square matmul and the model's forward / forward+backward, one run.

    OMP_NUM_THREADS=1 python benchmarks/bf16_speed.py [--model smollm2-135m] [--batch 8] [--length 32]

Prints the CPU's vector extensions (from /proc/cpuinfo) and torch's CPU capability, then for each dtype
(alternating float32, bfloat16, float32, bfloat16 so that a load change affects both alike) the seconds of
a 512-square ``torch.mm``, of the model's forward on ``--batch`` x ``--length`` random tokens and of a
forward+backward to its input embeddings, and last the bf16/fp32 time ratios (below 1: bf16 is faster).
Whether a CPU reference run can use ``dtype: bfloat16`` for speed depends on these ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from meg_harness.models import load_model

DTYPES = ("float32", "bfloat16")


def cpu_flags() -> str:
    """The AVX/AMX flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return "?"
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return " ".join(f for f in line.split()[2:] if f.startswith(("avx", "amx")))
    return ""


def seconds(work, repeats: int) -> float:
    work()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats


def measure(dtype: str, args: argparse.Namespace) -> dict[str, float]:
    torch_dtype = getattr(torch, dtype)
    a, b = torch.randn(512, 512, dtype=torch_dtype), torch.randn(512, 512, dtype=torch_dtype)
    model, _ = load_model(args.model, dtype=dtype)
    model.requires_grad_(False)
    ids = torch.randint(100, 10000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    def forward_backward() -> None:
        model(inputs_embeds=embeddings).logits.float().logsumexp(-1).sum().backward()

    return {
        "matmul": seconds(lambda: torch.mm(a, b), args.repeats),
        "forward": seconds(forward, args.repeats),
        "forward+backward": seconds(forward_backward, args.repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/bf16_speed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(
        f"cpu flags: {cpu_flags() or '(none)'}  torch capability: {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    runs: dict[str, list[dict[str, float]]] = {dtype: [] for dtype in DTYPES}
    for dtype in (*DTYPES, *DTYPES):
        runs[dtype].append(measure(dtype, args))
        print(dtype, {k: round(v, 4) for k, v in runs[dtype][-1].items()}, flush=True)
    for stage in runs["float32"][0]:
        fp32, bf16 = (statistics.fmean(r[stage] for r in runs[d]) for d in DTYPES)
        print(f"ratio_bf16_vs_fp32 {stage}: {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
