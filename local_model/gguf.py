"""GGUF files: the magic check, a small metadata reader and a cached sha256."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any

from .protocol import ModelError

GGUF_MAGIC = b"GGUF"

# GGUF value types -> struct format (fixed-size ones) or a marker
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def is_gguf(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_gguf(path: str | os.PathLike, install_hint: str) -> Path:
    """Return the path if it is a readable GGUF file, else raise ModelError saying what to do."""
    p = Path(path).expanduser()
    try:
        exists, is_file = p.exists(), p.is_file()
    except OSError as e:  # e.g. a path too long for the file system
        raise ModelError(f"cannot use {str(p)[:200]!r} as a model file: {e.strerror}. {install_hint}") from None
    if not exists:
        raise ModelError(f"model file {p} does not exist. {install_hint}")
    if not is_file:
        raise ModelError(f"model path {p} is not a file. {install_hint}")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e}. {install_hint}") from e
    if head != GGUF_MAGIC:
        raise ModelError(
            f"{p} is not a GGUF model file (it starts with {head!r}, not b'GGUF'). "
            f"Point the model at a .gguf file. {install_hint}"
        )
    return p


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The GGUF key/values; arrays are reported as {"array_len": n} (we never need their items)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file")
        version = struct.unpack_from("<I", m, 4)[0]
        if version == 1:  # v1 used 32-bit counts and lengths
            n_kv, off, cnt = struct.unpack_from("<I", m, 12)[0], 16, "<I"
        else:
            n_kv, off, cnt = struct.unpack_from("<Q", m, 16)[0], 24, "<Q"
        cnt_size = struct.calcsize(cnt)

        def read_str(o: int) -> tuple[str, int]:
            n = struct.unpack_from(cnt, m, o)[0]
            o += cnt_size
            return bytes(m[o:o + n]).decode("utf-8", "replace"), o + n

        def skip_value(t: int, o: int) -> int:
            if t in _SCALAR:
                return o + struct.calcsize(_SCALAR[t])
            if t == _STRING:
                return o + cnt_size + struct.unpack_from(cnt, m, o)[0]
            raise ModelError(f"{path}: unknown GGUF value type {t}")

        meta: dict[str, Any] = {"gguf.version": version}
        try:
            for _ in range(n_kv):
                key, off = read_str(off)
                t = struct.unpack_from("<I", m, off)[0]
                off += 4
                if t in _SCALAR:
                    meta[key] = struct.unpack_from("<" + _SCALAR[t], m, off)[0]
                    off += struct.calcsize(_SCALAR[t])
                elif t == _STRING:
                    meta[key], off = read_str(off)
                elif t == _ARRAY:
                    et = struct.unpack_from("<I", m, off)[0]
                    n = struct.unpack_from(cnt, m, off + 4)[0]
                    off += 4 + cnt_size
                    if et in _SCALAR:
                        off += n * struct.calcsize(_SCALAR[et])
                    else:
                        for _ in range(n):
                            off = skip_value(et, off)
                    meta[key] = {"array_len": n}
                else:
                    raise ModelError(f"{path}: unknown GGUF value type {t}")
        except struct.error as e:
            raise ModelError(f"{path}: the GGUF header is truncated or corrupt ({e})") from e
        return meta


# sha256 of big files costs seconds, so it is computed once per (path, size, mtime) and kept in
# memory and in <data_dir>/sha256-cache.json when that is writable.
_sha_lock = threading.Lock()
_sha_memory: dict[tuple[str, int, int], str] = {}


def _stat_key(p: Path) -> tuple[str, int, int]:
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20, progress: Any = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress.update(len(block))
    return h.hexdigest()


def cached_sha256(path: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> str:
    """sha256 of a file, computed in chunks once and remembered by (path, size, mtime)."""
    p = Path(path)
    key = _stat_key(p)
    with _sha_lock:
        if key in _sha_memory:
            return _sha_memory[key]
        disk = _load_cache(cache_file)
        hit = disk.get(key[0])
        if hit and hit.get("size") == key[1] and hit.get("mtime_ns") == key[2]:
            _sha_memory[key] = hit["sha256"]
            return hit["sha256"]
    digest = sha256_file(p)
    remember_sha256(p, digest, cache_file)
    return digest


def remember_sha256(path: str | os.PathLike, digest: str, cache_file: str | os.PathLike | None = None) -> None:
    key = _stat_key(Path(path))
    with _sha_lock:
        _sha_memory[key] = digest
        if cache_file is None:
            return
        disk = _load_cache(cache_file)
        disk[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
        try:
            cf = Path(cache_file)
            cf.parent.mkdir(parents=True, exist_ok=True)
            tmp = cf.with_name(f".{cf.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk, indent=1))
            os.replace(tmp, cf)
        except OSError:
            pass  # a read-only data dir only costs a recomputation next time


def _load_cache(cache_file: str | os.PathLike | None) -> dict[str, Any]:
    if cache_file is None:
        return {}
    try:
        return json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}
