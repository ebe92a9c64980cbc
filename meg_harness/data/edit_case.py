"""EditCase: the dataset-agnostic record every method and the evaluator consume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LocalityProbe:
    """An unrelated prompt; ``gold`` is the dataset's answer (informational: the protocol scores
    locality against the unedited model's own answer)."""

    prompt: str
    gold: str | None = None


@dataclass(frozen=True)
class MultiHop:
    """MQuAKE extras: the multi-hop questions of a case and the answers after all its edits."""

    questions: tuple[str, ...]
    new_answer: str
    new_answer_aliases: tuple[str, ...] = ()
    answer: str | None = None
    answer_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditCase:
    """One fact to edit: ``prompt`` has the subject filled in; targets are stored without a leading space.

    ``prompt_template`` keeps the ROME-style ``"{} ..."`` form when the source has one (locate-then-edit
    methods need the subject's position); ``None`` when only the filled prompt is known.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrases: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = ()
    prompt_template: str | None = None
    multi_hop: MultiHop | None = None
    long_answer: str | None = None
    source: str | None = None  # "file:index" the case came from, for error messages and logs
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditCase:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["rephrases"] = tuple(data.get("rephrases", ()))
        data["locality"] = tuple(LocalityProbe(**p) for p in data.get("locality", ()))
        if data.get("multi_hop") is not None:
            mh = dict(data["multi_hop"])
            for key in ("questions", "new_answer_aliases", "answer_aliases"):
                mh[key] = tuple(mh.get(key, ()))
            data["multi_hop"] = MultiHop(**mh)
        return cls(**data)
