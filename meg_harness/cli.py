"""The `meg-harness` command. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from meg_harness.errors import HarnessError

DEMO_METHODS = ["none"]


def _cmd_run(args: argparse.Namespace) -> int:
    from meg_harness.config import load_config
    from meg_harness.runner import run_experiment

    config = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    run_experiment(config, out, config_source=str(args.config))
    print(f"results in {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from meg_harness.config import RunConfig
    from meg_harness.report.leaderboard import leaderboard
    from meg_harness.runner import run_experiment

    started = time.perf_counter()
    out = Path(args.out)
    config = RunConfig(
        model=args.model, dataset="counterfact", data_path=None, n_edits=None, methods=list(DEMO_METHODS)
    )
    run_experiment(config, out, config_source="demo")
    board = leaderboard(out, "md")
    (out / "leaderboard.md").write_text(board, encoding="utf-8")
    print(board)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from meg_harness.report.leaderboard import leaderboard

    sys.stdout.write(leaderboard(Path(args.directory), args.format))
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from meg_harness.models.tiny import make_tiny_model

    path = make_tiny_model(Path(args.out), args.arch, seed=args.seed)
    print(path)
    return 0


def _cmd_tasks_path(args: argparse.Namespace) -> int:
    print(resources.files("meg_harness") / "tasks")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg-harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on the embedded default (CPU, minutes)")
    demo.add_argument("--out", default="meg-harness-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--model", default="smollm2-135m", help="model path, hub id or alias (default: %(default)s)"
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

    tiny = commands.add_parser(
        "make-tiny-model", help="a random tiny model with an offline-trained tokenizer"
    )
    tiny.add_argument("out")
    tiny.add_argument("--arch", default="llama", choices=["gpt2", "llama", "gptj", "phi"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_cmd_make_tiny_model)

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
