"""`python -m execfeedback export` end to end in a subprocess: files, card, and clear refusals."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from exporthelpers import ask, build_store, solved_trace

from dialog import Store
from dialog.migrations import MIGRATIONS, migrate
from execfeedback.traces import TraceStore

ROOT = Path(__file__).resolve().parent.parent
ENV_SECRET = "cli-env-secret-0a1b2c3d4e5f"


def cli(*args, env=None):
    full_env = {**os.environ, "LOOPBOOK_EXPORT_TEST_TOKEN": ENV_SECRET, **(env or {})}
    return subprocess.run([sys.executable, "-m", "execfeedback", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=full_env, timeout=240)


def assert_clean_failure(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("cli") / "data"
    ids = build_store(data)
    solved_trace(TraceStore(ids["store"]), ask("Read the service key."), f"print('{ENV_SECRET}')\n")
    ids["store"].close()
    return data


def test_exports_every_format_and_the_card(data_dir, tmp_path):
    import datasets

    out = tmp_path / "out"
    res = cli("--data-dir", data_dir, "--format", "all", "--out", out)
    assert res.returncode == 0, res.stderr
    names = {p.name for p in out.iterdir()}
    assert "README.md" in names and {"sft", "sft_final", "preference", "kto", "trajectory", "corrections"} == \
        {n.split(".")[0] for n in names if n.endswith(".jsonl")}
    assert "Wrote" in res.stdout and "Dataset card:" in res.stdout
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files={"train": str(out / "sft.train.jsonl")}, split="train")
    assert len(ds) > 0
    assert ENV_SECRET not in "".join(p.read_text() for p in out.iterdir())


def test_refuses_a_non_empty_out_without_force_and_keeps_other_files(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = cli("--data-dir", data_dir, "--format", "sft", "--out", out)
    assert_clean_failure(res, "already exists and is not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "kto.train.jsonl").write_text("stale\n")
    res = cli("--data-dir", data_dir, "--format", "sft", "--out", out, "--force", "--quiet")
    assert res.returncode == 0, res.stderr
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "kto.train.jsonl" not in names and "sft.train.jsonl" in names


def test_empty_store_says_so(tmp_path):
    Store(tmp_path / "data").close()
    assert_clean_failure(cli("--data-dir", tmp_path / "data", "--out", tmp_path / "o"), "has no traces yet")
    assert not (tmp_path / "o").exists()


def test_missing_store_is_not_created(tmp_path):
    res = cli("--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_clean_failure(res, "there is no Loopbook store in", "--data-dir")
    assert not (tmp_path / "nowhere").exists()


def test_unknown_filter_values_list_known_ones(data_dir, tmp_path):
    assert_clean_failure(cli("--data-dir", data_dir, "--model", "gpt-9", "--out", tmp_path / "o"),
                         "--model gpt-9: no trace has that value. Known: qwen2.5-coder-1.5b, smollm2-135m")
    assert_clean_failure(cli("--data-dir", data_dir, "--eval-run", "weekly", "--out", tmp_path / "o"),
                         "Eval runs in this store: nightly, heldout")
    assert_clean_failure(cli("--data-dir", data_dir, "--since", "yesterday", "--out", tmp_path / "o"),
                         "--since must be a date like 2025-01-31")
    assert_clean_failure(cli("--data-dir", data_dir, "--max-tokens-per-row", "512", "--out", tmp_path / "o"),
                         "--tokenizer-gguf")
    assert_clean_failure(cli("--data-dir", data_dir, "--tokenizer-gguf", tmp_path / "no.gguf", "--out", tmp_path / "o"),
                         "no such file")
    assert not (tmp_path / "o").exists()


def test_newer_schema_is_refused_clearly(tmp_path):
    Store(tmp_path / "data").close()
    conn = sqlite3.connect(tmp_path / "data" / "loopbook.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert_clean_failure(cli("--data-dir", tmp_path / "data", "--out", tmp_path / "o"),
                         "schema version 99, newer than this Loopbook knows", "Update Loopbook")


def test_older_schema_is_migrated_then_exported(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    conn = sqlite3.connect(data / "loopbook.db", isolation_level=None)
    migrate(conn, MIGRATIONS[:1])  # a store from before traces existed
    conn.close()
    res = cli("--data-dir", data, "--out", tmp_path / "o")
    assert_clean_failure(res, f"Upgraded the store from schema 1 to {len(MIGRATIONS)}", "has no traces yet")
    store = Store(data)
    try:
        assert store.schema_version == len(MIGRATIONS)
        solved_trace(TraceStore(store), ask("Write f()."), "def f():\n    return 1\n")
    finally:
        store.close()
    res = cli("--data-dir", data, "--out", tmp_path / "o2", "--format", "sft", "--quiet")
    assert res.returncode == 0, res.stderr


def test_parquet_output_loads(data_dir, tmp_path):
    import datasets

    out = tmp_path / "pq"
    res = cli("--data-dir", data_dir, "--format", "sft,preference,trajectory", "--parquet", "--out", out,
              "--test-fraction", "0", "--quiet")
    assert res.returncode == 0, res.stderr
    jsonl = tmp_path / "js"
    cli("--data-dir", data_dir, "--format", "sft,preference,trajectory", "--out", jsonl, "--test-fraction", "0",
        "--quiet")
    datasets.disable_progress_bars()
    for fmt in ("sft", "preference", "trajectory"):
        pq = datasets.load_dataset("parquet", data_files=str(out / f"{fmt}.train.parquet"), split="train")
        js = datasets.load_dataset("json", data_files=str(jsonl / f"{fmt}.train.jsonl"), split="train")
        assert len(pq) == len(js) > 0 and pq.column_names == js.column_names
    assert 'load_dataset("parquet"' in (out / "README.md").read_text()


def test_parquet_without_pyarrow_names_the_extra(data_dir, tmp_path):
    code = ("import sys; sys.modules['pyarrow'] = None\nfrom execfeedback.__main__ import main\n"
            f"sys.exit(main(['export', '--data-dir', {str(data_dir)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--parquet']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_clean_failure(res, "pip install '.[parquet]'")
    assert not (tmp_path / "o").exists()
