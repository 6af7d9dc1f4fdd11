"""Adapter GGUF files: write one, read one back, rewrite its metadata (the card and record travel inside).

Needs the `gguf` package (the train extra) to write or read one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Keys of the GGUF metadata that make an adapter file self-describing (llama.cpp ignores them).
META_RECORD = "loopbook.adapter"
META_CARD = "loopbook.card"


def record_strings(record: dict, card_text: str) -> dict[str, str]:
    """The record and its card as the adapter file's string metadata."""
    return {META_RECORD: json.dumps(record, ensure_ascii=False, default=str), META_CARD: card_text}


def write_gguf(path: str | Path, *, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray]],
               name: str | None = None, strings: dict[str, str] | None = None) -> int:
    """Write a GGUF LoRA adapter; returns its size in bytes."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        w.add_name(name)
    for key, value in (strings or {}).items():
        w.add_string(key, value)
    for tname, array in tensors:
        w.add_tensor(tname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path).stat().st_size


def read_gguf(path: str | Path) -> tuple[str, float, str | None, list[tuple[str, np.ndarray]], dict[str, str]]:
    """(architecture, alpha, name, tensors, string metadata) of an adapter file."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def value(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    strings = {}
    for key, f in r.fields.items():
        if key.startswith("loopbook.") and f.types and f.types[0] == gguf.GGUFValueType.STRING:
            strings[key] = f.contents()
    tensors = [(t.name, np.array(t.data)) for t in r.tensors]
    return value("general.architecture"), float(value("adapter.lora.alpha")), value("general.name"), tensors, strings


def rewrite_metadata(src: str | Path, dst: str | Path, strings: dict[str, str]) -> int:
    """Copy an adapter GGUF with its loopbook.* strings replaced (the card and record travel inside)."""
    arch, alpha, name, tensors, old = read_gguf(src)
    return write_gguf(dst, arch=arch, alpha=alpha, tensors=tensors, name=name, strings={**old, **strings})
