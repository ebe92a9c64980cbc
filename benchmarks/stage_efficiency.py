"""Each expensive stage's achieved model FLOP/s divided by this machine's dense-matmul FLOP/s, in one run.

    OMP_NUM_THREADS=1 python benchmarks/stage_efficiency.py [--model smollm2-135m] [--stages collection z ...]
        [--edits 16] [--data-path ../shared/data/counterfact/counterfact-edit.json]

A stage runs twice on the same small workload (``--edits`` CounterFact records from ``--start``, each
method's hparams file; nothing is read from or written to meg-harness's cache): once under
``torch.utils.flop_counter.FlopCounterMode``, which counts the matmul FLOPs of every forward and backward
op that ran, and once timed. The limit is a square fp32 ``torch.mm`` of ``--matmul-size`` on the same
threads, timed right before and right after each stage; their mean is the stage's denominator, so a
change of load during the run moves both alike. Prints, per stage, GFLOPs, seconds, achieved GFLOP/s, the
limit's GFLOP/s and their ratio (the issue's goal: >= 0.3 for the forward/backward-bound stages; greedy
decoding is bound by per-token latency).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from meg_harness.baselines.locate import resolve_layers
from meg_harness.baselines.plan import build_plans
from meg_harness.config import load_hparams
from meg_harness.data import load_cases
from meg_harness.editing.base import Edited, Editor
from meg_harness.editing.registry import get_editor_class
from meg_harness.evaluate.scoring import Probe, greedy_answers
from meg_harness.meg.collect import collect_neurons
from meg_harness.meg.encoder import load_text_encoder
from meg_harness.meg.generator import GeneratorConfig, build_generator
from meg_harness.meg.hparams import MEGHyperParams
from meg_harness.meg.train_generator import TrainConfig, train_generator
from meg_harness.models import get_adapter, load_model
from meg_harness.models.nethook import frozen
from meg_harness.prompts import encode_query, get_template
from meg_harness.shipped import shipped_hparams


@dataclass
class Context:
    """What every stage reads: the model, its template, the edits and the shipped hparams files."""

    model: torch.nn.Module
    tokenizer: Any
    template: Any
    cases: list
    args: argparse.Namespace

    def hparams(self, method: str) -> dict[str, Any]:
        path = str(shipped_hparams(method, self.args.model))
        return load_hparams(path, method.lower(), path)

    def editor(self, method: str, cache: str, **overrides: Any) -> Editor:
        editor = get_editor_class(method.lower())({**self.hparams(method), **overrides})
        editor.cache_dir, editor.progress = cache, False
        return editor


def run_collection(ctx: Context, cache: str) -> None:
    """MeG stage 3: one neuron per edit, the file's collection settings."""
    hp = MEGHyperParams.from_dict(ctx.hparams("MEG"))
    collect_neurons(
        ctx.model, ctx.tokenizer, ctx.cases, ctx.template, hp.collect, use_cache=False, progress=False
    )


def run_generator(ctx: Context, cache: str) -> None:
    """MeG stage 4: ``--generator-steps`` steps of the file's DiT at its batch size (no DDIM evaluation)."""
    hp = MEGHyperParams.from_dict(ctx.hparams("MEG"))
    encoder = load_text_encoder(hp.encoder.name)
    cond = encoder.encode([case.prompt for case in ctx.cases])  # [n, C]
    vector = 2 * get_adapter(ctx.model).hidden_size(ctx.model)  # one neuron: its key and value rows
    targets = torch.randn(len(cond), vector)  # [n, D]
    config = GeneratorConfig.from_mapping(hp.generator, vector_dim=vector, cond_dim=cond.shape[1])
    steps = ctx.args.generator_steps
    train = TrainConfig.from_mapping(
        {**hp.train.to_dict(), "max_steps": steps, "eval_every": steps + 1, "eval_ddim_steps": 1}
    )
    train_generator(build_generator(config, seed=0), cond, targets, hp.diffusion, train, progress=False)


def run_z(ctx: Context, cache: str) -> None:
    """MEMIT's z optimisation (AlphaEdit shares it): the file's settings, chunks of ``z_batch_size``."""
    editor = ctx.editor("MEMIT", cache)
    adapter = get_adapter(ctx.model)
    z_layer = resolve_layers(adapter, ctx.model, editor.hp.layers)[-1]
    prefixes = editor.context_prefixes(ctx.model, ctx.tokenizer)
    plans = build_plans(
        ctx.tokenizer, ctx.cases, ctx.template, prefixes, editor.hp.kl_prompt, terminator=editor.hp.terminator
    )
    with frozen(ctx.model):
        editor.values(ctx.model, ctx.tokenizer, plans, editor.value_sites(adapter, z_layer), z_layer)


def run_statistics(ctx: Context, cache: str) -> None:
    """Layer statistics (one layer, ``--stats-samples`` paragraphs of the file's corpus)."""
    editor = ctx.editor("MEMIT", cache, mom2_n_samples=ctx.args.stats_samples)
    editor.statistics(ctx.model, ctx.tokenizer, [editor.hp.layers[-1]])


def run_ft(ctx: Context, cache: str) -> None:
    """FT: ``--ft-epochs`` epochs of the file's settings over the edits."""
    ctx.editor("FT", cache, epochs=ctx.args.ft_epochs).fit(
        ctx.model, ctx.tokenizer, ctx.cases, ctx.template
    ).restore()


def run_malmen(ctx: Context, cache: str) -> None:
    """MALMEN meta-training: ``--malmen-steps`` meta-steps of the file's settings."""
    editor = ctx.editor("MALMEN", cache, max_steps=ctx.args.malmen_steps, max_minutes=None)
    editor.hypernet(ctx.model, ctx.tokenizer, ctx.template)


def run_greedy(ctx: Context, cache: str) -> None:
    """AG evaluation: greedy answers to the edit prompts and rephrases, the evaluator's batching."""
    questions = [q for case in ctx.cases for q in (case.prompt, *case.rephrases)]
    probes = [Probe(q, encode_query(ctx.tokenizer, ctx.template, q)) for q in questions]
    greedy_answers(Edited(ctx.model, ctx.tokenizer), probes)


STAGES: dict[str, Callable[[Context, str], None]] = {
    "collection": run_collection,
    "generator": run_generator,
    "z": run_z,
    "statistics": run_statistics,
    "ft": run_ft,
    "malmen": run_malmen,
    "greedy": run_greedy,
}


def matmul_flops_per_s(size: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a ``size``-square fp32 matmul on the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def measure(stage: Callable[[Context, str], None], ctx: Context) -> tuple[float, float]:
    """(matmul FLOPs, seconds) of one stage: counted in a first run, timed in a second."""
    with tempfile.TemporaryDirectory() as cache, FlopCounterMode(display=False) as counter:
        stage(ctx, cache)
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        stage(ctx, cache)
        seconds = time.perf_counter() - started
    return float(counter.get_total_flops()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/stage_efficiency.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-path", default="../shared/data/counterfact/counterfact-edit.json")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--edits", type=int, default=16)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--generator-steps", type=int, default=200)
    parser.add_argument("--stats-samples", type=int, default=64)
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--malmen-steps", type=int, default=1)
    parser.add_argument("--matmul-size", type=int, default=1024)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    template = get_template(get_adapter(model).default_template(model, tokenizer))
    cases = load_cases("counterfact", args.data_path)[args.start : args.start + args.edits]
    ctx = Context(model, tokenizer, template, cases, args)
    print(f"threads: {torch.get_num_threads()}  edits: {len(cases)}  model: {args.model}")
    print(f"{'stage':<11} {'GFLOP':>9} {'seconds':>8} {'GFLOP/s':>8} {'limit':>8} {'ratio':>6}")
    for name in args.stages:
        before = matmul_flops_per_s(args.matmul_size)
        flops, seconds = measure(STAGES[name], ctx)
        limit = (before + matmul_flops_per_s(args.matmul_size)) / 2
        achieved = flops / seconds
        print(
            f"{name:<11} {flops / 1e9:>9.1f} {seconds:>8.1f} {achieved / 1e9:>8.2f} {limit / 1e9:>8.2f} "
            f"{achieved / limit:>6.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
