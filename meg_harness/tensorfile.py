"""Safetensors files with deterministic bytes, written atomically.

``safetensors``' writer keeps the ``__metadata__`` mapping in a Rust ``HashMap``, whose order changes from
process to process: the same tensors and metadata saved by a fresh run and by a resumed one differ in the
header's key order. :func:`save_tensors` rewrites the header with the metadata keys sorted (tensor entries
keep safetensors' own order: by dtype alignment, then name), so that equal content gives equal bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import save

from meg_harness.cache import atomic_write_bytes

_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def canonical_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``tensors`` with ``metadata``, its header in a canonical order."""
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (+ ``metadata``) to ``path`` atomically, with deterministic bytes."""
    atomic_write_bytes(path, canonical_bytes(tensors, metadata), mode=0o644)
