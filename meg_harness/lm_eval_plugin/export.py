"""The cases file of the knowledge-editing lm-eval tasks: edit cases + the UNEDITED model's locality answers.

    python -m meg_harness.lm_eval_plugin.export OUT.json --model smollm2-135m --dataset counterfact \
        [--data-path FILE] [--n-edits 256] [--range 0 8000] [--seed 0] [--template NAME|TEXT]

selects cases exactly as ``meg-harness run`` does (same ``select_cases``), computes the locality labels
with :meth:`Evaluator.locality_labels` (cached like a run's) and writes the JSON that
``lm_eval ... --metadata cases=OUT.json`` reads. :func:`write_cases_file` writes it from objects a caller
already has (a run, a test); an artifact folder may carry it as ``lm_eval_cases.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meg_harness.data.edit_case import EditCase
from meg_harness.errors import HarnessError
from meg_harness.evaluate.templates import QueryTemplate

FORMAT = "meg-harness/lm-eval-cases/v1"
ARTIFACT_FILE = "lm_eval_cases.json"


@dataclass(frozen=True)
class CasesFile:
    """The contents of a cases file."""

    dataset: str
    template: QueryTemplate
    cases: list[EditCase]
    labels: dict[str, tuple[str, tuple[int, ...]]]  # locality prompt -> (answer text, answer token ids)
    max_new_tokens: int = 20


def write_cases_file(
    path: str | os.PathLike,
    dataset: str,
    cases: Sequence[EditCase],
    template: QueryTemplate,
    labels: Mapping[str, Any],
    *,
    model_fingerprint: str | None = None,
    max_new_tokens: int = 20,
) -> Path:
    """Write the cases file (atomically). ``labels``: ``Evaluator.locality_labels`` output (prompt ->
    Generation), or prompt -> (text, ids)."""
    record = {
        "format": FORMAT,
        "dataset": dataset,
        "template": {"name": template.name, "text": template.text},
        "max_new_tokens": max_new_tokens,
        "model_fingerprint": model_fingerprint,
        "cases": [case.to_dict() for case in cases],
        "locality_labels": {q: _label(g) for q, g in sorted(labels.items())},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle, ensure_ascii=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def _label(generation: Any) -> dict[str, Any]:
    text, ids = (generation.text, generation.answer_ids) if hasattr(generation, "text") else generation
    return {"text": text, "answer_ids": [int(i) for i in ids]}


def read_cases_file(path: str | os.PathLike) -> CasesFile:
    """Read a cases file; a HarnessError naming the file for anything malformed."""
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HarnessError(f"cannot read the lm-eval cases file: {error}", file=path) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise HarnessError(f"not a {FORMAT} file (write one with `python -m {__name__}`)", file=path)
    try:
        template = QueryTemplate(record["template"]["name"], record["template"]["text"])
        cases = [EditCase.from_dict(c) for c in record["cases"]]
        labels = {q: (v["text"], tuple(v["answer_ids"])) for q, v in record["locality_labels"].items()}
    except (KeyError, TypeError) as error:
        raise HarnessError(f"malformed lm-eval cases file: {error!r}", file=path) from None
    missing = sorted({p.prompt for c in cases for p in c.locality} - set(labels))
    if missing:
        raise HarnessError(f"no unedited answer for locality prompt {missing[0]!r}", file=path)
    return CasesFile(record["dataset"], template, cases, labels, int(record.get("max_new_tokens", 20)))


def export_cases(
    out: str | os.PathLike,
    *,
    model: str,
    dataset: str,
    data_path: str | None = None,
    n_edits: int | None = None,
    index_range: tuple[int, int] | None = None,
    seed: int = 0,
    template: str | None = None,
    zsre_target: str = "answers",
    one_per_subject: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
) -> Path:
    """Select cases like ``meg-harness run``, compute the unedited model's locality answers, write them."""
    from meg_harness.data import load_cases, select_cases
    from meg_harness.editing.base import Edited
    from meg_harness.evaluate.evaluator import Evaluator
    from meg_harness.evaluate.templates import get_template
    from meg_harness.models import get_adapter, load_model, model_fingerprint

    cases = select_cases(
        load_cases(dataset, data_path, zsre_target=zsre_target), n_edits, seed, index_range, one_per_subject
    )
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    query = get_template(template or get_adapter(lm).default_template(lm, tokenizer))
    evaluator = Evaluator(tokenizer, query, batch_size=batch_size)
    evaluator.check_inputs(lm, cases)
    fingerprint = model_fingerprint(lm)
    labels = evaluator.locality_labels(Edited(lm, tokenizer), cases, fingerprint)
    return write_cases_file(
        out,
        dataset,
        cases,
        query,
        labels,
        model_fingerprint=fingerprint,
        max_new_tokens=evaluator.max_new_tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--model", required=True, help="model path, hub id or alias (the UNEDITED model)")
    parser.add_argument("--dataset", required=True, help="zsre | counterfact | mquake | unke")
    parser.add_argument("--data-path", help="data file (default: the demo data the package ships)")
    parser.add_argument("--n-edits", type=int, help="sample size (default: all selected cases)")
    parser.add_argument("--range", nargs=2, type=int, metavar=("START", "END"), help="file index range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", help="query template name or text (default: the model family's)")
    parser.add_argument("--zsre-target", default="answers")
    parser.add_argument("--all-subjects", action="store_true", help="keep several cases per subject")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        path = export_cases(
            args.out,
            model=args.model,
            dataset=args.dataset,
            data_path=args.data_path,
            n_edits=args.n_edits,
            index_range=tuple(args.range) if args.range else None,
            seed=args.seed,
            template=args.template,
            zsre_target=args.zsre_target,
            one_per_subject=not args.all_subjects,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
        )
    except HarnessError as error:
        print(f"error: {error}")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
