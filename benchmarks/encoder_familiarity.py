"""Stages 1-2 of a MeG run, measured on its own edits: encoder retrieval and familiarity calibration.

    python benchmarks/encoder_familiarity.py RUN_DIR [--method meg] [--seed 0] [--thresholds ...]

Reads the run's config and its MeG artifact. Prints paraphrase -> original top-1 retrieval accuracy among
the run's edit prompts for the base (frozen) encoder and the artifact's (tuned) encoder, the ROC-AUC of the
familiarity entropy between paraphrases and locality (unrelated) prompts, and Table 16's routing rates per
threshold, with A.5's grid-search choice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from meg_harness.meg.calibration import (
    PAPER_THRESHOLDS,
    best_threshold,
    calibrate,
    calibration_markdown,
    entropy_auc,
)
from meg_harness.meg.encoder import load_text_encoder, retrieval_accuracy
from meg_harness.meg.model import MegModel
from meg_harness.runner import run_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="meg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.02, *PAPER_THRESHOLDS]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    meg = MegModel.from_pretrained(args.run_dir / args.method / f"seed{args.seed}" / "artifact")
    cases = run_cases(args.run_dir, args.seed)
    pairs = [(c.prompt, c.rephrases[0]) for c in cases if c.rephrases]
    originals, paraphrases = [p[0] for p in pairs], [p[1] for p in pairs]
    base_name = (
        meg.extra.get("hparams", {}).get("encoder", {}).get("name", "minilm") if meg.extra else "minilm"
    )
    frozen = retrieval_accuracy(load_text_encoder(base_name), originals, paraphrases)
    tuned = retrieval_accuracy(meg.encoder, originals, paraphrases)
    print(
        f"{len(pairs)} (prompt, paraphrase) pairs: retrieval top-1 frozen {frozen:.2f}%, tuned {tuned:.2f}%"
    )
    if meg.familiarity is None:
        print("the artifact has no familiarity network (no-FN ablation)")
        return
    encode = meg.encoder.encode
    edits = encode([c.prompt for c in cases])
    rephrased = encode([r for c in cases for r in c.rephrases])
    unrelated = encode([probe.prompt for c in cases for probe in c.locality])
    auc = entropy_auc(meg.familiarity, rephrased, unrelated)
    rows = calibrate(meg.familiarity, edits, rephrased, unrelated, args.thresholds)
    print(calibration_markdown(rows, auc), end="")
    print(f"grid-search threshold (A.5): {best_threshold(rows):g}")


if __name__ == "__main__":
    main()
