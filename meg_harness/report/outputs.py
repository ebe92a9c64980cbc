"""What a report builder returns: files to write (name, bytes, one-line title) or a reason it wrote none."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    name: str  # file name inside the output folder
    content: bytes
    title: str  # one line for the index


@dataclass(frozen=True)
class Skipped:
    title: str
    reason: str


Built = list[Output | Skipped]


def markdown_output(name: str, title: str, lines: Sequence[str]) -> Output:
    """A markdown file ``# title`` + ``lines``, ending with exactly one newline."""
    text = "\n".join([f"# {title}", "", *lines]).rstrip("\n") + "\n"
    return Output(name, text.encode("utf-8"), title)
