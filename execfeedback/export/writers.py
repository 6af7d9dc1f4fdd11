"""Files of the export: one per format and split, JSON Lines or Parquet, opened when the first row comes."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from .schema import arrow_schema

PARQUET_HINT = "pip install '.[parquet]' (or pip install 'pyarrow>=15')"
PARQUET_BATCH = 1000          # rows per row group at most,
PARQUET_BATCH_BYTES = 2 << 20  # and about this much JSON text, so memory stays flat with long rows


class ExportError(Exception):
    """Bad input or a refused export; the message says what to do next."""


def require_pyarrow() -> None:
    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ExportError(f"Parquet output needs pyarrow, which is not installed. Install it with {PARQUET_HINT}, "
                          "or leave out --parquet to write JSON Lines.") from None


def dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


class _Jsonl:
    def __init__(self, path: Path):
        self.f = open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20)

    def write(self, row: dict, line: str) -> None:
        self.f.write(line)
        self.f.write("\n")

    def close(self) -> None:
        self.f.close()


class _Parquet:
    def __init__(self, path: Path, fmt: str):
        import pyarrow.parquet as pq

        self.schema = arrow_schema(fmt)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows: list[dict] = []
        self.size = 0

    def write(self, row: dict, line: str) -> None:
        self.rows.append(row)
        self.size += len(line)
        if len(self.rows) >= PARQUET_BATCH or self.size >= PARQUET_BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows, self.size = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


class Writers:
    """`write(fmt, split, row, line)`; `counts[(fmt, split)]` rows written; files named <fmt>.<split>.<ext>."""

    def __init__(self, directory: Path, *, parquet: bool = False):
        self.directory = Path(directory)
        self.parquet = parquet
        self.ext = "parquet" if parquet else "jsonl"
        self._open: dict[tuple[str, str], _Jsonl | _Parquet] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def name(self, fmt: str, split: str) -> str:
        return f"{fmt}.{split}.{self.ext}"

    def write(self, fmt: str, split: str, row: dict, line: str) -> None:
        key = (fmt, split)
        w = self._open.get(key)
        if w is None:
            path = self.directory / self.name(fmt, split)
            w = self._open[key] = _Parquet(path, fmt) if self.parquet else _Jsonl(path)
            self.counts[key] = 0
        w.write(row, line)
        self.counts[key] += 1

    def close(self) -> None:
        for w in self._open.values():
            w.close()
        self._open.clear()

    def files(self) -> dict[str, int]:
        """Rows written per file name, in (format, split) order."""
        return {self.name(f, s): n for (f, s), n in sorted(self.counts.items())}
