"""The process's one resident model: loaded once in the background, swapped only when asked for by name."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .engine import Engine
from .loader import load_backend
from .protocol import ModelError


class Resident:
    """Holds one Engine; `get()` waits for the first load, `get(model=...)` swaps to another model."""

    def __init__(self, model: str | None = None, backend: str | None = None, **load_kwargs: Any):
        self.model = model
        self.backend_kind = backend
        self.load_kwargs = load_kwargs
        self.engine: Engine | None = None
        self.lora_path: str | None = None
        self.error: str | None = None
        self.loading = False
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        """What the page shows: the model, where it runs, or why it is not there."""
        if self.engine is not None:
            m = self.engine.manifest
            return {"state": "ready", "model": m.get("model"), "backend": m.get("backend"), "gpu": m.get("gpu"),
                    "note": m.get("note"), "queue_depth": self.engine.queue_depth, "busy": self.engine.busy}
        if self.loading:
            return {"state": "loading", "model": self.model}
        return {"state": "error" if self.error else "idle", "model": self.model, "error": self.error}

    async def get(self, model: str | None = None, backend: str | None = None, *, lora_path: str | None = None,
                  manifest_extra: dict | None = None) -> Engine:
        """The engine for `model` (default: the resident one) with LoRA `lora_path` (None: the bare base),
        loading or swapping when needed; `manifest_extra` names the adapter in every manifest."""
        async with self._lock:
            wanted = (model or self.model, backend or self.backend_kind)
            # A backend asked for by name is honoured even without a model: the request says where it must run.
            if self.engine is not None and self._matches(model or self.model, backend) and self.lora_path == lora_path:
                return self.engine
            self.loading = True
            try:
                new = await asyncio.to_thread(self._load, *wanted, lora_path)
                new.manifest.update(manifest_extra or {})
            except ModelError as e:
                if self.engine is None:
                    self.error = str(e)
                raise
            finally:
                self.loading = False
            old, self.engine = self.engine, new
            self.model, self.backend_kind, self.error, self.lora_path = wanted[0], wanted[1], None, lora_path
            if old is not None:
                await asyncio.to_thread(old.close)
            return new

    def _matches(self, model: str, backend: str | None) -> bool:
        m = self.engine.manifest
        same_model = model in (self.model, m.get("model"), m.get("requested"), m.get("file_name"))
        return same_model and (backend is None or backend == m.get("backend"))

    def _load(self, model: str | None, backend: str | None, lora_path: str | None = None) -> Engine:
        with self._thread_lock:
            return Engine(load_backend(model, backend, lora_path=lora_path, **self.load_kwargs))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
