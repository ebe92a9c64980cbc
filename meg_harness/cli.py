"""The `meg-harness` command. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from meg_harness.errors import HarnessError

DEMO_CONFIG = "demo-smollm2-135m.yaml"  # in meg_harness/data/demo/
DEMO_METHODS = ["none", "meg", "memit", "alphaedit", "pmet", "ft", "malmen"]


def _cmd_run(args: argparse.Namespace) -> int:
    from meg_harness.config import load_config
    from meg_harness.runner import run_experiment

    config = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    run_experiment(config, out, config_source=str(args.config))
    print(f"results in {out}")
    return 0


#: The hparams keys (dotted) whose value in the demo config is the name of a file shipped beside it.
DEMO_FILE_KEYS = {"meg": ("encoder.pairs",), "malmen": ("train_path",)}


def demo_config(model: str, methods: Sequence[str], scales: Sequence[int] | None = None):
    """The demo's run config (``data/demo/demo-smollm2-135m.yaml``) for ``methods`` (and ``scales``): each
    method's ``base:`` made a path under :func:`~meg_harness.shipped.hparams_root` (the checkout's or the
    installed copy, whatever the working directory) and its :data:`DEMO_FILE_KEYS` files under the demo
    folder."""
    import yaml

    from meg_harness.config import parse_config
    from meg_harness.data import demo_path
    from meg_harness.shipped import hparams_root

    source = resources.files("meg_harness") / "data" / "demo" / DEMO_CONFIG
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    unknown = [m for m in methods if m not in data["methods"]]
    if unknown:
        known = ", ".join(data["methods"])
        raise HarnessError(
            f"the demo has no settings for {unknown}; it runs {known}", file=str(source), field="methods"
        )
    data["model"], data["methods"] = model, list(methods)
    data["hparams"] = {m: h for m, h in data["hparams"].items() if m in methods}
    if scales:
        data["n_edits"] = list(scales) if len(scales) > 1 else scales[0]
    folder = demo_path("counterfact").parent
    for method, hparams in data["hparams"].items():
        hparams["base"] = str(hparams_root() / hparams["base"])
        for key in DEMO_FILE_KEYS.get(method, ()):
            *sections, name = key.split(".")
            section = hparams
            for part in sections:
                section = section[part]
            section[name] = str(folder / section[name])
    return parse_config(data, str(source))


def _cmd_demo(args: argparse.Namespace) -> int:
    from meg_harness.lock import output_lock
    from meg_harness.report.leaderboard import leaderboard
    from meg_harness.report.tables import write_tables
    from meg_harness.runner import run_experiment

    started = time.perf_counter()
    out = Path(args.out)
    config = demo_config(args.model, args.methods, args.scales)
    with output_lock(out):  # the reports too: no second process writes into out meanwhile
        run_experiment(config, out, config_source="demo")
        board = leaderboard(out, "md")
        (out / "leaderboard.md").write_text(board, encoding="utf-8")
        written = write_tables(out, out / "tables")  # the paper's layouts; the Score-vs-scale figure
    print(board)
    for path in written:
        if path.suffix == ".png":
            print(f"figure: {path}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from meg_harness.report.leaderboard import leaderboard

    sys.stdout.write(leaderboard(Path(args.directory), args.format))
    return 0


def _cmd_tables(args: argparse.Namespace) -> int:
    from meg_harness.report.tables import write_tables

    for path in write_tables(Path(args.directory), Path(args.out) if args.out else None):
        print(path)
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from meg_harness.models.tiny import make_tiny_model

    path = make_tiny_model(Path(args.out), args.arch, seed=args.seed)
    print(path)
    return 0


def _collect_hparams_path(value: str | None, model: str) -> Path:
    """``--hparams`` as given, else the shipped ``hparams/MEG/collect-<model>.yaml`` when the model is an
    alias that has one, else the SmolLM2 file (its ``layer`` is swept anyway)."""
    from meg_harness.shipped import hparams_root

    if value is not None:
        return Path(value)
    folder = hparams_root() / "MEG"
    own = folder / f"collect-{model.lower()}.yaml"
    path = own if own.is_file() else folder / "collect-smollm2-135m.yaml"
    if not path.is_file():
        raise HarnessError(f"no default collection hparams at {path}; pass --hparams", field="hparams")
    return path


def _cmd_layer_sweep(args: argparse.Namespace) -> int:
    import json

    from meg_harness.cache import atomic_write_text
    from meg_harness.data import load_cases, select_cases
    from meg_harness.meg.collect import CollectHParams
    from meg_harness.meg.layer_sweep import (
        best_layer,
        check_layers,
        parse_layers,
        plot_sweep,
        sweep_layers,
        sweep_markdown,
        sweep_table,
    )
    from meg_harness.models import get_adapter, load_model, model_fingerprint
    from meg_harness.prompts import get_template
    from meg_harness.provenance import git_sha, versions
    from meg_harness.shipped import display_path

    started = time.perf_counter()
    # everything a user can get wrong is checked before the model is loaded or anything is written
    layers = parse_layers(args.layers) if args.layers is not None else None
    index_range = tuple(args.range) if args.range is not None else None
    cases = select_cases(
        load_cases(args.dataset, args.data, cache_dir=args.cache_dir), args.n, args.seed, index_range
    )
    hparams_path = _collect_hparams_path(args.hparams, args.model)
    hparams = CollectHParams.from_yaml(hparams_path)
    template_override = get_template(args.template) if args.template is not None else None

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    adapter = get_adapter(model)
    template = template_override or get_template(adapter.default_template(model, tok))
    n_layers = adapter.num_layers(model)
    layers = check_layers(model, layers if layers is not None else list(range(n_layers)))

    def report(row: dict) -> None:
        cached = f", {row['reused']} reused" if row["reused"] else ""
        print(
            f"layer {row['layer']:>3}: Reliability AG {row['reliability_ag']:6.2f}% "
            f"({row['n_success']}/{row['n']}), mean steps {row['mean_steps']:.1f}, "
            f"{row['wall_s']:.1f} s{cached}",
            flush=True,
        )

    print(f"layer sweep of {args.model}: {len(cases)} edits x {len(layers)} layers", flush=True)
    rows = sweep_layers(
        model,
        tok,
        cases,
        template,
        hparams,
        layers,
        args.cache_dir,
        progress=sys.stderr.isatty(),
        on_row=report,
    )
    meta = {
        "model": args.model,
        "model_family": adapter.family,
        "model_fingerprint": model_fingerprint(model),
        "num_layers": n_layers,
        "dataset": args.dataset,
        "data": args.data,
        "n": len(cases),
        "seed": args.seed,
        "range": list(index_range) if index_range is not None else None,
        "layers": layers,
        "template": {"name": template.name, "text": template.text},
        "hparams_file": display_path(hparams_path),
        "hparams": {k: v for k, v in hparams.to_dict().items() if k != "layer"},
        "case_ids": [c.case_id for c in cases],
        "device": args.device,
        "dtype": args.dtype,
        "best_layer": best_layer(rows),
        "collection_wall_s": sum(r["wall_s"] for r in rows),  # as first computed (see layer_sweep.py)
        "run_wall_s": time.perf_counter() - started,  # this invocation (small when layers were cached)
        "versions": versions(),
        "git_sha": git_sha(),
    }
    out = Path(args.out)
    title = f"{args.model} / {args.dataset}: single-neuron Reliability AG per layer (n={len(cases)})"
    plot_sweep(rows, out / "layer_sweep.png", title)
    texts = {
        "layer_sweep.md": sweep_markdown(rows, meta),
        "layer_sweep.json": json.dumps({"rows": rows, "meta": meta}, indent=2, sort_keys=True) + "\n",
    }
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        (out / name).chmod(0o644)  # the temp file it came from was private; results are meant to be shared
    print(sweep_table(rows), end="")
    best = next(r for r in rows if r["layer"] == meta["best_layer"])
    print(
        f"best layer: {best['layer']} (Reliability AG {best['reliability_ag']:.2f}%, "
        f"mean steps {best['mean_steps']:.1f})"
    )
    print(f"layer sweep finished in {meta['run_wall_s']:.0f} s; results in {out}")
    return 0


def _cmd_tasks_path(args: argparse.Namespace) -> int:
    from meg_harness.shipped import tasks_root

    print(tasks_root())
    return 0


def build_parser() -> argparse.ArgumentParser:
    # `python -m meg_harness.cli` names itself so; the console script is `meg-harness`
    module_run = Path(sys.argv[0]).name == "cli.py" if sys.argv else False
    prog = "python -m meg_harness.cli" if module_run else "meg-harness"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on the embedded default (CPU, minutes)")
    demo.add_argument("--out", default="meg-harness-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--model", default="smollm2-135m", help="model path, hub id or alias (default: %(default)s)"
    )
    demo.add_argument(
        "--methods", nargs="+", default=DEMO_METHODS, help="methods to run (default: %(default)s)"
    )
    demo.add_argument(
        "--scales", nargs="+", type=int, help="numbers of edits (default: the demo config's, 16 and 32)"
    )
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser("run", help="one experiment from a run config YAML")
    run.add_argument("config", help="run config YAML (see README)")
    run.add_argument("--out", help="output folder (default: runs/<config name>)")
    run.set_defaults(handler=_cmd_run)

    board = commands.add_parser("leaderboard", help="leaderboard of the results under a folder")
    board.add_argument("directory")
    board.add_argument("--format", default="md", choices=["md", "csv", "latex"])
    board.set_defaults(handler=_cmd_leaderboard)

    tables = commands.add_parser(
        "tables", help="the paper's tables (markdown) and figures (PNG) from results"
    )
    tables.add_argument(
        "directory", help="folder searched recursively for run, lm-eval and layer-sweep results"
    )
    tables.add_argument("--out", help="output folder (default: DIRECTORY/tables)")
    tables.set_defaults(handler=_cmd_tables)

    tiny = commands.add_parser(
        "make-tiny-model", help="a random tiny model with an offline-trained tokenizer"
    )
    tiny.add_argument("out")
    tiny.add_argument("--arch", default="llama", choices=["gpt2", "llama", "gptj", "phi"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_cmd_make_tiny_model)

    sweep = commands.add_parser(
        "layer-sweep", help="single-neuron Reliability (AG) of MeG neuron collection per layer (paper A.4)"
    )
    sweep.add_argument("--model", default="smollm2-135m", help="model path, hub id or alias")
    sweep.add_argument("--dataset", default="counterfact", help="zsre | counterfact | mquake | unke")
    sweep.add_argument("--data", help="data file, URL, hf://... or 'download' (default: demo data)")
    sweep.add_argument("--n", type=int, default=32, help="edits sampled (default: %(default)s)")
    sweep.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    sweep.add_argument(
        "--range", type=int, nargs=2, metavar=("START", "END"), help="keep file indices in [START, END)"
    )
    sweep.add_argument("--layers", help="e.g. 0-29 or 2,4,6 (default: every layer of the model)")
    sweep.add_argument(
        "--hparams", help="collection hparams YAML (default: hparams/MEG/collect-<model>.yaml or SmolLM2's)"
    )
    sweep.add_argument("--template", help="query template name or text with {} (default: the model's)")
    sweep.add_argument("--device", default="cpu")
    sweep.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sweep.add_argument("--cache-dir", help="meg-harness cache (default: $MEG_HARNESS_CACHE)")
    sweep.add_argument("--out", required=True, help="output folder")
    sweep.set_defaults(handler=_cmd_layer_sweep)

    tasks = commands.add_parser("tasks-path", help="the folder to pass to lm_eval --include_path")
    tasks.set_defaults(handler=_cmd_tasks_path)
    return parser


def _quiet_libraries() -> None:
    """Library warnings (e.g. tokenizer length notices the harness checks itself) are not for users."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.handler(args)
    except HarnessError as error:
        print(f"meg-harness: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            raise
        print(f"meg-harness: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meg-harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
