"""llama.cpp gets the CPU's extra buffer types (AMX repacking) only where they are safe, never under a LoRA."""

from __future__ import annotations

import pytest

from local_model import cpu_buffers
from local_model.cpu_buffers import ENV, extra_buffers
from local_model.backends.llama import extra_buffers_for


def test_asked_for_wins_over_the_guess(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert extra_buffers(True) == (True, "CPU extra buffer types on, as asked")
    assert extra_buffers(False)[0] is False
    monkeypatch.setenv(ENV, "0")
    assert extra_buffers()[0] is False
    monkeypatch.setenv(ENV, "1")
    assert extra_buffers()[0] is True
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match="use 1 or 0"):
        extra_buffers()


def test_off_where_the_cpu_advertises_amx(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu_buffers, "_cpu_flags", lambda: frozenset({"avx2", "amx_tile", "amx_int8"}))
    allowed, why = extra_buffers()
    assert allowed is False and "advertises AMX" in why and ENV in why
    monkeypatch.setattr(cpu_buffers, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert extra_buffers() == (True, "CPU extra buffer types on")


def test_a_lora_adapter_never_gets_them(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    assert extra_buffers_for(None, "/x/adapter.gguf") == (False, "CPU extra buffer types off: a LoRA adapter is loaded")
    assert extra_buffers_for(True, None)[0] is True
