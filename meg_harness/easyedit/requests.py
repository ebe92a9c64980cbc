"""EasyEdit's request shapes (``batch_edit``'s arguments, request dicts) as meg-harness EditCases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meg_harness.data.edit_case import EditCase, LocalityProbe
from meg_harness.errors import HarnessError

# EasyEdit's default ground truth when none is given.
NO_GROUND_TRUTH = "<|endoftext|>"


def _as_list(value: Any, n: int, name: str) -> list[Any]:
    """``value`` as one entry per request: a str/None becomes ``[value] * n`` when n == 1 (EasyEdit)."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if len(value) != n:
        raise HarnessError(f"{name} has {len(value)} entries for {n} prompts", field=name)
    return value


def prepare_requests(
    prompts: str | Sequence[str],
    target_new: str | Sequence[str],
    ground_truth: str | Sequence[str] | None = None,
    subject: str | Sequence[str] | None = None,
    rephrase_prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
    locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """EasyEdit request dicts from ``batch_edit``'s arguments.

    ``rephrase_prompts``: one str or list of str per request. ``locality_inputs``:
    ``{key: {"prompt": [...], "ground_truth": [...]}}`` with one entry (a str, a list of str or None) per
    request.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    targets = _as_list(target_new, n, "target_new")
    truths = _as_list(ground_truth, n, "ground_truth")
    subjects = _as_list(subject, n, "subject")
    rephrases = _as_list(rephrase_prompts, n, "rephrase_prompts")
    requests: list[dict[str, Any]] = []
    for i in range(n):
        request: dict[str, Any] = {
            "prompt": prompts[i],
            "target_new": targets[i],
            "ground_truth": NO_GROUND_TRUTH if truths[i] is None else truths[i],
            "portability": {},
            "locality": {},
        }
        if subjects[i] is not None:
            request["subject"] = subjects[i]
        if rephrases[i] is not None:
            request["rephrase_prompt"] = rephrases[i]
        requests.append(request)
    for key, spec in (locality_inputs or {}).items():
        if not isinstance(spec, Mapping) or "prompt" not in spec:
            raise HarnessError(f"locality_inputs[{key!r}] needs a 'prompt' list", field="locality_inputs")
        field_name = f"locality_inputs.{key}"
        loc_prompts = _as_list(spec["prompt"], n, f"{field_name}.prompt")
        loc_truths = _as_list(spec.get("ground_truth"), n, f"{field_name}.ground_truth")
        for request, p, t in zip(requests, loc_prompts, loc_truths):
            if p is not None:
                request["locality"][key] = {"prompt": p, "ground_truth": t}
    return requests


def _text(value: Any, field_name: str, index: int) -> str:
    """A request's string value (EasyEdit/ROME also write targets as ``{"str": ...}``)."""
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise HarnessError(f"expected a non-empty string, got {value!r}", record=index, field=field_name)
    return value


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def request_to_case(index: int, request: Mapping[str, Any]) -> EditCase:
    """One EasyEdit request dict as an EditCase (``case_id`` = its index; locality keys kept in ``extra``)."""
    prompt = _text(request.get("prompt"), "prompt", index)
    target = _text(request.get("target_new"), "target_new", index).strip()
    truth = request.get("ground_truth")
    truth = truth.get("str") if isinstance(truth, Mapping) else truth
    truth = (_strings(truth) or [None])[0]
    subject = request.get("subject") or ""
    rephrases = tuple(_strings(request.get("rephrase_prompt")))
    probes, keys = [], []
    for key, spec in (request.get("locality") or {}).items():
        golds = spec.get("ground_truth")
        golds = golds if isinstance(golds, list) else [golds]
        for j, p in enumerate(_strings(spec.get("prompt"))):
            gold = golds[j] if j < len(golds) else None
            gold = (_strings(gold) or [None])[0]  # EasyEdit allows a list of answers: keep the first
            probes.append(LocalityProbe(p, gold))
            keys.append(key)
    return EditCase(
        case_id=str(index),
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=None if truth in (None, NO_GROUND_TRUTH) else truth,
        rephrases=rephrases,
        locality=tuple(probes),
        prompt_template=prompt.replace(subject, "{}", 1) if subject and subject in prompt else None,
        extra={"locality_keys": keys},
    )
