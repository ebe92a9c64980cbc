"""Calibrating the familiarity threshold epsilon (paper A.5, Table 16): routing rates, entropy AUC."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meg_harness.meg.familiarity import FamiliarityNetwork

# Table 16's grid of entropy thresholds (nats)
PAPER_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def _rate(entropy: torch.Tensor, threshold: float) -> float:
    return 100.0 * float((entropy < threshold).float().mean()) if len(entropy) else float("nan")


def calibrate(
    fn: FamiliarityNetwork,
    edit_emb: torch.Tensor,
    paraphrase_emb: torch.Tensor,
    unrelated_emb: torch.Tensor,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
) -> list[dict[str, float]]:
    """Per threshold, the percent of edit prompts, paraphrases and unrelated prompts routed to the neuron
    (``H < threshold``). Edit and paraphrase rates bound Reliability and Generality; ``100 - unrelated`` is
    the share of unrelated prompts the neuron cannot touch (what Locality gains)."""
    h_edit, h_para, h_unrel = (fn.entropy(e) for e in (edit_emb, paraphrase_emb, unrelated_emb))
    return [
        {
            "threshold": float(t),
            "edit_routed": _rate(h_edit, t),
            "paraphrase_routed": _rate(h_para, t),
            "unrelated_routed": _rate(h_unrel, t),
        }
        for t in thresholds
    ]


def entropy_auc(fn: FamiliarityNetwork, paraphrase_emb: torch.Tensor, unrelated_emb: torch.Tensor) -> float:
    """ROC-AUC of ``-entropy`` separating paraphrases (positives) from unrelated prompts (negatives)."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([-fn.entropy(paraphrase_emb), -fn.entropy(unrelated_emb)]).cpu().double().numpy()
    labels = [1] * len(paraphrase_emb) + [0] * len(unrelated_emb)
    return float(roc_auc_score(labels, scores))


def best_threshold(rows: Sequence[dict[str, float]]) -> float:
    """A.5's grid-search choice: the threshold maximising ``paraphrase_routed + (100 - unrelated_routed)``
    (balanced Generality/Locality); the smallest such threshold on ties."""
    return max(rows, key=lambda r: (r["paraphrase_routed"] - r["unrelated_routed"], -r["threshold"]))[
        "threshold"
    ]


def calibration_markdown(rows: Sequence[dict[str, float]], auc: float | None = None) -> str:
    """A markdown table (one line per threshold) in the spirit of Table 16, with the AUC as a footnote."""
    lines = [
        "| threshold (nats) | edit prompts routed % | paraphrases routed % | unrelated routed % "
        "| unrelated kept % |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threshold']:g} | {r['edit_routed']:.2f} | {r['paraphrase_routed']:.2f} | "
            f"{r['unrelated_routed']:.2f} | {100.0 - r['unrelated_routed']:.2f} |"
        )
    if auc is not None:
        lines.append("")
        lines.append(f"Entropy ROC-AUC (paraphrases vs unrelated): {auc:.4f}")
    return "\n".join(lines) + "\n"
