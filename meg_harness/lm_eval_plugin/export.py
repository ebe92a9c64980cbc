"""The cases file of the knowledge-editing lm-eval tasks: edit cases + the UNEDITED model's locality answers.

    python -m meg_harness.lm_eval_plugin.export OUT.json --model smollm2-135m --dataset counterfact \
        [--data-path FILE] [--n-edits 256] [--range 0 8000] [--seed 0] [--template NAME|TEXT]

selects cases exactly as ``meg-harness run`` does (same ``select_cases``), computes the locality labels
with :meth:`Evaluator.locality_labels` (cached like a run's) and writes the JSON that
``lm_eval ... --metadata cases=OUT.json`` reads. The file itself (its format, :func:`write_cases_file`,
:func:`read_cases_file`) belongs to the results store, :mod:`meg_harness.store`: a run writes it into each
artifact folder as ``lm_eval_cases.json``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from meg_harness.errors import HarnessError
from meg_harness.store import write_cases_file


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
    from meg_harness.evaluate.evaluator import evaluator_for, long_answers
    from meg_harness.models import get_adapter, load_model, model_fingerprint
    from meg_harness.prompts import get_template

    cases = select_cases(
        load_cases(dataset, data_path, zsre_target=zsre_target), n_edits, seed, index_range, one_per_subject
    )
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    family = get_adapter(lm).default_template(lm, tokenizer, long_answers=long_answers(dataset))
    query = get_template(template or family)
    evaluator = evaluator_for(dataset, tokenizer, query, batch_size=batch_size)
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
    parser = argparse.ArgumentParser(
        prog="python -m meg_harness.lm_eval_plugin.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--model", required=True, help="model path, hub id or alias (the UNEDITED model)")
    parser.add_argument("--dataset", required=True, help="zsre | counterfact | mquake | unke")
    parser.add_argument("--data-path", help="data file (default: the demo data the package ships)")
    parser.add_argument("--n-edits", type=int, help="sample size (default: all selected cases)")
    parser.add_argument("--range", nargs=2, type=int, metavar=("START", "END"), help="file index range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--template", help="query template name or text (default: the model family's; unke: its long form)"
    )
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
