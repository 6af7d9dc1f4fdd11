"""The adapter registry: migration, registration, the base check, eval figures, the card, export and import."""

from __future__ import annotations

import json

import pytest

from dialog import NotFound, Store
from dialog.migrations import MIGRATIONS
from execfeedback.adapters import registry as adapters
from parts import smollm2_path

BASE_SHA = "b1" * 32
OTHER_SHA = "0f" * 32


def _record(name: str = "fix-v1", **extra) -> dict:
    return {"name": name, "file_name": f"{name}.gguf", "sha256": "aa" * 32, "size_bytes": 0,
            "base_model": "smollm2-135m", "base_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "base_sha256": BASE_SHA,
            "architecture": "llama", "method": "sft",
            "export": {"hash": "cafe", "files": {"sft.train.jsonl": 40}, "filters": {"eval_run": ["train"]},
                       "dir": "/home/alice/x"},
            "hyperparameters": {"lora_r": 16, "lr": 2e-4}, "training": {"device": "cpu", "steps": 8}, **extra}


def _place(store: Store, name: str, data: bytes = b"GGUF fake adapter bytes") -> dict:
    folder = adapters.adapters_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.gguf").write_bytes(data)
    return _record(name, size_bytes=len(data))


def test_migration_adds_the_adapters_table(store):
    assert [m.__name__ for m in MIGRATIONS].index("_m3_adapters") == 2  # the third migration, in every store
    cols = {r["name"] for r in store.query("PRAGMA table_info(adapters)")}
    assert {"name", "base_sha256", "export", "hyperparameters", "eval_before", "eval_after", "sha256"} <= cols


def test_register_get_list_and_remove(store):
    rec = adapters.register(store, _place(store, "fix-v1"))
    assert rec["export"]["files"] == {"sft.train.jsonl": 40} and rec["hyperparameters"]["lora_r"] == 16
    assert rec["path"].endswith("adapters/fix-v1.gguf") and rec["source"] == "trained"
    assert [r["name"] for r in adapters.list_adapters(store, base_sha256=BASE_SHA)] == ["fix-v1"]
    assert adapters.list_adapters(store, base_sha256=OTHER_SHA) == []
    with pytest.raises(adapters.AdapterError, match="exists already.*--replace"):
        adapters.register(store, _place(store, "fix-v1"))
    adapters.register(store, {**_place(store, "fix-v1"), "method": "sft+dpo"}, replace=True)
    assert adapters.get(store, "fix-v1")["method"] == "sft+dpo"
    adapters.remove(store, "fix-v1")
    assert not (adapters.adapters_dir(store) / "fix-v1.gguf").exists()
    with pytest.raises(NotFound, match="no adapter 'fix-v1'.*finetune"):
        adapters.get(store, "fix-v1")


def test_register_refuses_a_missing_file_and_bad_names(store):
    with pytest.raises(adapters.AdapterError, match="missing; nothing was registered"):
        adapters.register(store, _record("ghost"))
    assert adapters.list_adapters(store) == []
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(adapters.AdapterError, match="not allowed"):
            adapters.check_name(bad)


def test_lora_path_refuses_another_base(store):
    adapters.register(store, _place(store, "fix-v1"))
    assert adapters.lora_path_for(store, "fix-v1", BASE_SHA).endswith("fix-v1.gguf")
    with pytest.raises(adapters.BaseMismatch, match="trained on SmolLM2.*sha256 b1b1.*--model smollm2-135m") as e:
        adapters.lora_path_for(store, "fix-v1", OTHER_SHA, base_label="qwen2.5-coder-1.5b")
    assert e.value.status == 409
    with pytest.raises(adapters.AdapterError, match="needs an in-process GGUF base"):
        adapters.lora_path_for(store, "fix-v1", None, base_label="claude-sonnet")
    (adapters.adapters_dir(store) / "fix-v1.gguf").write_bytes(b"changed!")
    with pytest.raises(adapters.AdapterError, match="has changed since it was registered"):
        adapters.lora_path_for(store, "fix-v1", BASE_SHA)


def test_eval_figures_land_on_the_adapter_and_in_the_card(store):
    adapters.register(store, _place(store, "fix-v1"))
    base_run = {"summary": {"run_name": "heldout-base", "n": 20, "pass_by_round": [0.5, 0.55, 0.6],
                            "pass_counts_by_round": [10, 11, 12], "config": {"rounds": 2, "candidates": 1},
                            "problems_path": "/home/alice/heldout.jsonl", "manifest": {"path": "/home/alice/m"}}}
    adapter_run = {"summary": {**base_run["summary"], "run_name": "heldout-fix-v1", "pass_by_round": [0.5, 0.65, 0.7]}}
    adapters.record_eval(store, "fix-v1", base_run, role="base")
    rec = adapters.record_eval(store, "fix-v1", adapter_run, role="adapter")
    assert rec["eval_before"]["pass_by_round"] == [0.5, 0.55, 0.6]
    assert rec["eval_after"]["run_name"] == "heldout-fix-v1" and rec["eval_after"]["problems_file"] == "heldout.jsonl"
    assert "manifest" not in rec["eval_after"]  # local paths stay out of the shared record
    text = adapters.card(rec)
    assert "| 1 | 55.0% | 65.0% |" in text and "| 2 | 60.0% | 70.0% |" in text
    assert BASE_SHA in text and "sft.train.jsonl: 40 rows" in text
    with pytest.raises(adapters.AdapterError):
        adapters.record_eval(store, "fix-v1", base_run, role="before")


def _real_adapter_file(path, alpha: float = 32.0) -> None:
    """A small, well-formed LoRA for SmolLM2 (rank 2 on one q projection) written with the gguf package."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("gguf")
    from execfeedback.adapters.gguf_file import write_gguf

    rng = np.random.default_rng(0)
    tensors = [("blk.0.attn_q.weight.lora_a", rng.standard_normal((2, 576)).astype(np.float16)),
               ("blk.0.attn_q.weight.lora_b", rng.standard_normal((576, 2)).astype(np.float16))]
    write_gguf(path, arch="llama", alpha=alpha, tensors=tensors, name="tiny")


def test_export_then_import_carries_the_record_and_the_card(store, tmp_path):
    folder = adapters.adapters_dir(store)
    folder.mkdir(parents=True)
    _real_adapter_file(folder / "fix-v1.gguf")
    size = (folder / "fix-v1.gguf").stat().st_size
    adapters.register(store, _record(size_bytes=size))
    gguf_file, md = adapters.export_adapter(store, "fix-v1", tmp_path / "share")
    assert gguf_file.name == "fix-v1.gguf" and md.read_text().startswith("# Loopbook adapter `fix-v1`")
    embedded = adapters.read_embedded(gguf_file)
    assert embedded["architecture"] == "llama" and embedded["alpha"] == 32.0
    assert embedded["record"]["base_sha256"] == BASE_SHA and "dir" not in embedded["record"]["export"]
    assert embedded["card"] == md.read_text()

    other = Store(tmp_path / "other")
    try:
        rec = adapters.import_adapter(other, gguf_file)
        assert rec["source"] == "imported" and rec["base_sha256"] == BASE_SHA and rec["size_bytes"] == gguf_file.stat().st_size
        with pytest.raises(adapters.AdapterError, match="exists already.*--name"):
            adapters.import_adapter(other, gguf_file)
        assert adapters.import_adapter(other, gguf_file, name="fix-copy")["name"] == "fix-copy"
        with pytest.raises(adapters.AdapterError, match="not a LoRA adapter"):
            adapters.import_adapter(other, smollm2_path())
        with pytest.raises(adapters.AdapterError, match="not a GGUF"):
            adapters.import_adapter(other, md)
    finally:
        other.close()


def test_llama_cpp_loads_a_written_adapter_and_refuses_another_base(tmp_path):
    pytest.importorskip("llama_cpp")
    from execfeedback.finetune.convert import verify_loads
    from execfeedback.finetune.data import FinetuneError

    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    _real_adapter_file(good)
    assert verify_loads(smollm2_path(), good) >= 0
    np = pytest.importorskip("numpy")
    from execfeedback.adapters.gguf_file import write_gguf

    # Shaped for a 1536-wide model (Qwen2.5-1.5B): llama.cpp must refuse it on SmolLM2 (576 wide).
    write_gguf(bad, arch="llama", alpha=16, tensors=[("blk.0.attn_q.weight.lora_a", np.zeros((2, 1536), np.float16)),
                                                     ("blk.0.attn_q.weight.lora_b", np.zeros((1536, 2), np.float16))])
    with pytest.raises(FinetuneError, match="did not load the converted adapter.*(incorrect shape|signal)"):
        verify_loads(smollm2_path(), bad)


def test_adapter_cli_lists_shows_and_exports(store, tmp_path, capsys):
    from execfeedback.adapters import cli as adapters_cli

    folder = adapters.adapters_dir(store)
    folder.mkdir(parents=True)
    _real_adapter_file(folder / "fix-v1.gguf")
    adapters.register(store, _record(size_bytes=(folder / "fix-v1.gguf").stat().st_size))
    data_dir = str(store.data_dir)
    parser = adapters_cli.add_arguments(__import__("argparse").ArgumentParser())
    assert adapters_cli.run(parser.parse_args(["list", "--data-dir", data_dir])) == 0
    assert "fix-v1" in capsys.readouterr().out
    assert adapters_cli.run(parser.parse_args(["show", "fix-v1", "--data-dir", data_dir, "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["base_sha256"] == BASE_SHA
    assert adapters_cli.run(parser.parse_args(["export", "fix-v1", "--out", str(tmp_path / "x"),
                                               "--data-dir", data_dir])) == 0
    assert (tmp_path / "x" / "fix-v1.gguf").is_file()
    with pytest.raises(SystemExit, match="no adapter 'nope'"):
        adapters_cli.run(parser.parse_args(["show", "nope", "--data-dir", data_dir]))


def test_resolve_adapter_for_the_app(store):
    adapters.register(store, {**_place(store, "fix-v1"), "base_sha256": __import__("local_model.gguf").gguf.sha256_file(
        smollm2_path())})
    path, entry = adapters.resolve_adapter(store, "fix-v1", model="smollm2-135m", data_dir=store.data_dir)
    assert path.endswith("fix-v1.gguf") and entry == {"adapter": "fix-v1", "adapter_sha256": "aa" * 32,
                                                      "adapter_method": "sft"}
    with pytest.raises(adapters.BaseMismatch, match="but qwen.gguf has sha256 0f0f"):
        adapters.resolve_adapter(store, "fix-v1", manifest={"sha256": OTHER_SHA, "file_name": "qwen.gguf"})
