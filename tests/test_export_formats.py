"""Export formats: every file loads in `datasets`, and rows have exactly the shape each format promises."""

import json
from pathlib import Path

import pytest
from exporthelpers import PLANTED, ask, build_store, fenced, solved_trace

from dialog import Store
from execfeedback.export.exporter import ExportError, export_to_dir, options_from_mapping
from execfeedback.export.schema import SCHEMAS
from execfeedback.traces import TraceStore

APP_TOKEN = "lb-app-token-7Hq2Zr9PxW4n"
ENV = {"LOOPBOOK_TEST_API_KEY": "envsecret-5f4e3d2c1b0a9988"}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(out: Path, fmt: str) -> list[dict]:
    return [r for split in ("train", "test") if (out / f"{fmt}.{split}.jsonl").exists()
            for r in rows(out / f"{fmt}.{split}.jsonl")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = tmp_path_factory.mktemp("store") / "data"
    ids = build_store(data)
    (data / "token").write_text(APP_TOKEN)
    # The app's own token and an environment secret, printed by a notebook and fed back.
    ids["token_trace"] = solved_trace(
        TraceStore(ids["store"]), ask(f"Check the API with token {APP_TOKEN}."),
        f"print(os.environ['LOOPBOOK_TEST_API_KEY'])  # {ENV['LOOPBOOK_TEST_API_KEY']}\n",
        failing="print(key)\n", feedback=f"Output: {ENV['LOOPBOOK_TEST_API_KEY']} {APP_TOKEN}")
    yield ids
    ids["store"].close()


def export(built, out, **values):
    opts = options_from_mapping({"test_fraction": "0.3", **values})
    return export_to_dir(built["store"], out, opts, environ=ENV)


@pytest.fixture(scope="module")
def full(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "all"
    return out, export(built, out, format="all")


def check_chat(messages: list[dict], obs_role: str = "user") -> None:
    """system?, user, then assistant and observation turns alternating, ending with the assistant."""
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles[0] == "user"
    for prev, cur in zip(roles, roles[1:]):
        assert prev != cur, roles
        assert cur in ("assistant", "user", obs_role)
    assert roles[-1] == "assistant"


def test_every_file_loads_with_datasets_and_matches_the_report(full):
    import datasets

    datasets.disable_progress_bars()
    out, report = full
    assert set(report.files) == {p.name for p in out.glob("*.jsonl")}
    for name, n in report.files.items():
        ds = datasets.load_dataset("json", data_files=str(out / name), split="train")
        fmt = name.split(".")[0]
        assert len(ds) == n > 0
        assert list(ds.features) == [c.name for c in SCHEMAS[fmt]]


def test_sft_rows_are_whole_solved_trajectories(full, built):
    out, _ = full
    sft = all_rows(out, "sft")
    for r in sft:
        assert list(r) == ["messages"]
        check_chat(r["messages"])
    # The trace solved after two feedback rounds: three answers, the two feedback turns between them.
    mean_rows = [r for r in sft if "Write mean(xs)" in r["messages"][1]["content"]]
    assert len(mean_rows) == 1
    msgs = mean_rows[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert msgs[3]["content"].startswith("Your code raised NameError: name 'total' is not defined")
    assert "sum(xs) / len(xs) if xs else 0.0" in msgs[-1]["content"]
    # Unsolved traces give no SFT row.
    assert not any("ISO date" in r["messages"][1]["content"] for r in sft)


def test_sft_final_keeps_only_the_passing_turn(full):
    out, _ = full
    rows_ = all_rows(out, "sft_final")
    mean = [r for r in rows_ if "Write mean(xs)" in r["messages"][1]["content"]][0]["messages"]
    assert [m["role"] for m in mean] == ["system", "user", "assistant"]
    assert "sum(xs) / len(xs) if xs else 0.0" in mean[-1]["content"]
    for r in rows_:
        check_chat(r["messages"])
        assert sum(m["role"] == "assistant" for m in r["messages"]) == 1


def test_preference_pairs_every_failing_attempt_against_the_passing_one(full, built):
    out, _ = full
    prefs = all_rows(out, "preference")
    for r in prefs:
        assert list(r) == ["prompt", "chosen", "rejected"]
        assert [m["role"] for m in r["chosen"]] == ["assistant"] and [m["role"] for m in r["rejected"]] == ["assistant"]
        assert r["prompt"][-1]["role"] == "user" and r["chosen"] != r["rejected"]
    by_prompt = {}
    for r in prefs:
        by_prompt.setdefault(r["prompt"][-1]["content"], []).append(r)
    # Two failed candidates of the same round: two pairs, one prompt, one chosen.
    even = by_prompt["Write is_even(n)."]
    assert len(even) == 2 and len({json.dumps(r["prompt"]) for r in even}) == 1
    assert {r["chosen"][0]["content"] for r in even} == {fenced("def is_even(n):\n    return n % 2 == 0\n")}
    assert {r["rejected"][0]["content"] for r in even} == {fenced("def is_even(n):\n    return n % 2 == 1\n"),
                                                           fenced("def is_even(n):\n    return n / 2\n")}
    # Failing attempts of later rounds pair with the round-0 prompt (no feedback turn in it).
    mean = by_prompt["Write mean(xs) that returns the average of a list."]
    assert len(mean) == 2 and all(len(r["prompt"]) == 2 for r in mean)
    # The human's failing cell of a Fix is not a model answer: no pair from it.
    assert not any("count)" in r["rejected"][0]["content"] for r in prefs)


def test_kto_rows_carry_the_exact_context_and_a_label(full):
    out, report = full
    kto = all_rows(out, "kto")
    for r in kto:
        assert list(r) == ["prompt", "completion", "label"] and isinstance(r["label"], bool)
        assert [m["role"] for m in r["completion"]] == ["assistant"]
        check_chat(r["prompt"] + r["completion"])
    mean = [r for r in kto if r["prompt"][1]["content"].startswith("Write mean(xs)")]
    assert sorted(len(r["prompt"]) for r in mean) == [2, 4, 6]
    assert [r["label"] for r in sorted(mean, key=lambda r: len(r["prompt"]))] == [False, False, True]
    assert report.stats.kto_labels[True] == sum(r["label"] for r in kto)


def test_trajectory_rows_hold_every_attempt_manifest_and_sampling(full, built):
    out, _ = full
    traj = {r["trace_id"]: r for r in all_rows(out, "trajectory")}
    two = traj[built["two_rounds"]]
    assert two["outcome"] == "solved" and two["rounds"] == 3 and two["n_attempts"] == 3
    assert [s["exec_status"] for s in two["steps"]] == ["error", "check_failed", "ok"]
    assert [s["ename"] for s in two["steps"]][:2] == ["NameError", "AssertionError"]
    assert two["steps"][0]["observation"].startswith("Your code raised NameError")
    manifest = json.loads(two["manifest"])
    assert manifest["quant"] == "Q4_1" and manifest["path"] == "SmolLM2-135M-Instruct-Q4_1.gguf"
    assert json.loads(two["sampling"])["top_k"] == 40
    check_chat(two["messages"])
    assert traj[built["unsolved"]]["outcome"] == "unsolved" and traj[built["unsolved"]]["stop_reason"] == "budget"
    cands = traj[built["candidates"]]
    assert [(s["candidate"], s["in_chain"]) for s in cands["steps"]] == [(0, False), (1, False), (2, True)]
    assert built["unfinished"] not in traj


def test_resample_and_fix_traces_use_the_inputs_the_model_saw(full, built):
    out, _ = full
    traj = {r["trace_id"]: r for r in all_rows(out, "trajectory")}
    # Resampling: round 1 saw the round-0 input again, so the conversation has no feedback turn.
    assert [m["role"] for m in traj[built["resample"]]["messages"]] == ["system", "user", "assistant"]
    # Fix: the model's first input is the context with the human's failing code and error appended.
    fix = traj[built["fix"]]
    assert fix["prompt"][-1]["content"] == built["fix_input"][-1]["content"]
    assert [s["author"] for s in fix["steps"]] == ["human", "model"]
    kto = all_rows(out, "kto")
    assert not any(r["completion"][0]["content"].startswith("```python\nprint(sum(nums) / count)") for r in kto)


def test_corrections_file_and_sft_rows_from_human_edits(full):
    out, report = full
    [c] = all_rows(out, "corrections")
    assert c["model_code"] == "def reverse(s):\n    return s[::-1]\n"
    assert "''.join(reversed(s))" in c["human_code"] and c["diff"].startswith("--- model")
    assert c["prompt"][-1]["content"].endswith("Write a function that reverses a string.")
    sft = all_rows(out, "sft")
    assert any("''.join(reversed(s))" in r["messages"][-1]["content"] for r in sft)
    assert report.stats.correction_rows["sft"] == 1


def test_tool_role_for_observations(built, tmp_path):
    out = tmp_path / "tool"
    export(built, out, format="sft,kto", observation_role="tool")
    sft = all_rows(out, "sft")
    mean = [r for r in sft if "Write mean(xs)" in r["messages"][1]["content"]][0]["messages"]
    assert [m["role"] for m in mean] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    for r in sft:
        check_chat(r["messages"], obs_role="tool")
    assert "are in `tool` messages" in (out / "README.md").read_text()


def test_card_reports_counts_mix_models_hygiene_errors_and_schema(full):
    out, report = full
    card = (out / "README.md").read_text()
    for needle in ("## Files and counts", "## Outcome mix", "solved after 2 feedback turn(s)", "## Models and manifests",
                   "qwen2.5-coder-1.5b", "Q4_K_M", "## Filters", "### Duplicates", "### Secrets", "## Split",
                   "## Error types", "| error | NameError |", "## Schema", "### trajectory", "Each step:",
                   "are in `user` messages", "config_name: sft"):
        assert needle in card, needle
    for name, n in report.files.items():
        assert f"`{name}`: {n}" in card


def test_filters_select_what_they_say(built, tmp_path):
    def traj(**values):
        out = tmp_path / "f{}".format(len(list(tmp_path.iterdir())))
        export(built, out, format="trajectory", dedup="none", **values)
        return all_rows(out, "trajectory")

    assert {r["outcome"] for r in traj(outcome="solved")} == {"solved"}
    assert {r["outcome"] for r in traj(outcome="unsolved")} == {"unsolved"}
    assert all(r["rounds"] >= 2 for r in traj(min_rounds="2")) and traj(min_rounds="2")
    assert {r["model"] for r in traj(model="qwen2.5-coder-1.5b")} == {"qwen2.5-coder-1.5b"}
    assert {r["eval_run"] for r in traj(eval_run="nightly")} == {"nightly"}
    assert len(traj(eval_run="nightly")) == 3
    assert {r["dialog_id"] for r in traj(dialog=str(built["store"].list_dialogs()[-1]["id"]))} == \
        {built["store"].list_dialogs()[-1]["id"]}
    assert built["unfinished"] in {r["trace_id"] for r in traj(include_unfinished="1")}
    with pytest.raises(ExportError, match="No traces match these filters"):
        traj(until="2001-01-01")
    assert len(traj(since="2001-01-01")) == len(traj())


def test_author_filter_human_edit_exports_only_corrections(built, tmp_path):
    out = tmp_path / "edits"
    report = export(built, out, author="human_edit")
    assert {name.split(".")[0] for name in report.files} == {"corrections", "sft", "sft_final"}
    assert report.stats.correction_rows["sft"] == 1 and sum(report.files.values()) == 3


def test_unknown_filter_values_list_the_known_ones(built, tmp_path):
    with pytest.raises(ExportError, match=r"--model nope: no trace has that value\. Known: qwen2\.5-coder-1\.5b, "
                                          r"smollm2-135m"):
        export(built, tmp_path / "x", model="nope")
    with pytest.raises(ExportError, match="Eval runs in this store: nightly, heldout"):
        export(built, tmp_path / "y", eval_run="weekly")
    with pytest.raises(ExportError, match=r"Dialogs: 1 \(strings\)"):
        export(built, tmp_path / "z", dialog="999")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_option_values_say_what_is_allowed():
    for values, message in (({"format": "sft,bogus"}, "--format must be one or more of"),
                            ({"outcome": "maybe"}, "--outcome must be one of solved, unsolved, all"),
                            ({"since": "last tuesday"}, "--since must be a date like 2025-01-31"),
                            ({"test_fraction": "1.5"}, "--test-fraction must be from 0 to 1"),
                            ({"max_tokens_per_row": "512"}, "needs a tokenizer: pass --tokenizer-gguf"),
                            ({"colour": "red"}, "Unknown export option 'colour'"),
                            ({"author": "robot"}, "--author must be one or more of model, human, human_edit")):
        with pytest.raises(ExportError, match=message):
            options_from_mapping(values)
    opts = options_from_mapping([("format", "sft"), ("format", "kto"), ("min-rounds", "2"), ("model", "a,b")])
    assert opts.formats == ("sft", "kto") and opts.filters.min_rounds == 2 and opts.filters.models == ("a", "b")


def test_empty_store_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "empty")
    try:
        with pytest.raises(ExportError, match="has no traces yet"):
            export_to_dir(store, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        store.close()


def test_zip_download_streams_the_same_files(built):
    from execfeedback.export.exporter import export_zip, stream_export_zip
    import io
    import zipfile

    chunks, report = stream_export_zip(built["store"], options_from_mapping({"format": "sft,preference"}),
                                       folder="ds")
    data = b"".join(chunks)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names == ["ds/README.md", *[f"ds/{n}" for n in report.files]]
    assert zipfile.ZipFile(io.BytesIO(export_zip(built["store"], options_from_mapping({"format": "kto"})))).namelist()
    with pytest.raises(ExportError):
        stream_export_zip(built["store"], options_from_mapping({"model": "nope"}))


def test_planted_secrets_never_reach_any_file(full, built):
    out, report = full
    text = "\n".join(p.read_text() for p in out.iterdir())
    for value in (*PLANTED.values(), APP_TOKEN, ENV["LOOPBOOK_TEST_API_KEY"], "/home/alice"):
        assert value not in text, value
    for placeholder in ("<SECRET_API_KEY>", "<SECRET_GITHUB_TOKEN>", "<SECRET_AWS_KEY>", "<SECRET_PRIVATE_KEY>",
                        "<SECRET_TOKEN>", "<EMAIL>"):
        assert placeholder in text, placeholder
    assert {"api_key", "github_token", "aws_key", "private_key", "token", "email"} <= set(report.secrets)


def test_completions_give_fim_rows_from_accepted_and_preference_rows_from_dropped_against_accepted(tmp_path):
    import datasets

    from dialog.completions import add_completion, decide_completion

    datasets.disable_progress_bars()
    store = Store(tmp_path / "ghost")
    try:
        d = store.create_dialog("ghost")
        m = store.add_message(d["id"], "code", "")
        key = "sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6"
        above = f"import math\nAPI_KEY = '{key}'\n\n"

        def shown(prefix, suggestion, outcome=None, final=None, suffix="\nprint(x)\n"):
            cid = add_completion(store, dialog_id=d["id"], message_id=m["id"], cell_type="code", model="smollm2-135m",
                                 mode="prefix", prefix=above + prefix, suffix=suffix, suggestion=suggestion)
            if outcome:
                decide_completion(store, cid, "accepted" if outcome == "edited" else outcome)
                if outcome == "edited":
                    decide_completion(store, cid, "edited", final)
            return cid

        dropped = shown("x = ma", "x(1, 2)", "dropped")
        accepted = shown("x = math.", "pi", "accepted")
        shown("y = ", "x + 1", "edited", final="x + 2")       # taken, then changed at once: no FIM row
        shown("z = ", "3")                                    # no outcome reported: nothing
        shown("w = ", "4", "accepted", suffix="")             # another place: a FIM row, no pair
        with pytest.raises(Exception, match="only an accepted one can become edited"):
            decide_completion(store, dropped, "accepted")

        out = tmp_path / "out"
        report = export_to_dir(store, out, options_from_mapping({"format": "completions", "test_fraction": "0"}))
        got = all_rows(out, "completions")
        assert sorted((r["kind"], r["chosen"], r["rejected"]) for r in got) == [
            ("fim", "4", ""), ("fim", "pi", ""), ("preference", "th.pi", "x(1, 2)")]
        pref = next(r for r in got if r["kind"] == "preference")
        assert pref["completion_id"] == accepted and pref["rejected_id"] == dropped
        assert pref["prefix"].endswith("x = ma") and pref["suffix"] == "\nprint(x)\n"
        assert all(key not in r["prefix"] and "<SECRET_API_KEY>" in r["prefix"] for r in got)
        for name in report.files:
            ds = datasets.load_dataset("json", data_files=str(out / name), split="train")
            assert list(ds.features) == [c.name for c in SCHEMAS["completions"]]
        card = (out / "README.md").read_text()
        assert "**completions**" in card and "config_name: completions" in card
        # Only completions in the store: every format asked for still works, and says what it found.
        export_to_dir(store, tmp_path / "all", options_from_mapping({"format": "all"}))
        store2 = Store(tmp_path / "none")
        d2 = store2.create_dialog("x")
        add_completion(store2, dialog_id=d2["id"], message_id=None, cell_type="code", model="m", mode="prefix",
                       prefix="a", suffix="", suggestion="b")
        with pytest.raises(ExportError, match="No completions to export.*1 undecided"):
            export_to_dir(store2, tmp_path / "none-out", options_from_mapping({"format": "completions"}))
        store2.close()
    finally:
        store.close()


def test_tools_rows_are_openai_tool_call_conversations_and_load_with_datasets_and_parquet(tmp_path):
    import datasets

    from local_model.tool_calls import assistant_turn, call, tool_turn

    datasets.disable_progress_bars()
    store = Store(tmp_path / "tools")
    traces = TraceStore(store)
    key = "sk-" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4"
    spec = {"name": "scale", "description": "Multiply n by ten.",
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}
    try:
        d = store.create_dialog("tools")
        m = store.add_message(d["id"], "prompt", "Use &`scale` on $`x`.")
        base = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Use `scale` on `x`.\n\nValues in the kernel when this was asked:\n`x` = 4"}]

        def loop(rid, calls_results, final, cut_short=False):
            msgs = list(base)
            for i, (c, result, status) in enumerate(calls_results):
                traces.add_tool_step(msgs, request_id=rid, step=i, dialog_id=d["id"], message_id=m["id"],
                                     tools=[spec] if i == 0 else None, calls=[{**c, "status": status, "result": result}],
                                     finish_reason="stop", model="smollm2-135m", backend="llama")
                msgs = msgs + [assistant_turn("", [c]), tool_turn(c["id"], c["name"], result)]
            traces.add_tool_step(msgs, request_id=rid, step=len(calls_results), dialog_id=d["id"], message_id=m["id"],
                                 completion=final, finish_reason="stop" if not cut_short else "cancelled",
                                 model="smollm2-135m", backend="llama")

        first = call("scale", {"n": 4}, "call_1")
        second = call("nosuch", {}, "call_2")
        loop("r1", [(second, "there is no tool named `nosuch`; the tools are: scale.", "missing"),
                    (first, f"40 (key {key})", "ok")], "It is 40.")
        loop("r2", [(first, "40", "ok")], "", cut_short=True)   # stopped: no row

        out = tmp_path / "out"
        report = export_to_dir(store, out, options_from_mapping({"format": "tools", "test_fraction": "0"}))
        got = all_rows(out, "tools")
        assert len(got) == 1 and report.files == {"tools.train.jsonl": 1}
        row = got[0]
        assert (row["request_id"], row["steps"], row["calls"], row["failed_calls"]) == ("r1", 3, 2, 1)
        assert json.loads(row["tools"]) == [{"type": "function", "function": spec}]
        msgs = row["messages"]
        assert [x["role"] for x in msgs] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
        assert msgs[2]["tool_calls"] == [{"id": "call_2", "type": "function",
                                          "function": {"name": "nosuch", "arguments": "{}"}}]
        assert msgs[4]["tool_calls"][0]["function"] == {"name": "scale", "arguments": '{"n": 4}'}
        assert msgs[3]["tool_call_id"] == "call_2" and msgs[5]["tool_call_id"] == "call_1"
        assert msgs[-1]["content"] == "It is 40." and msgs[-1]["tool_calls"] == []
        assert key not in json.dumps(row) and "<SECRET_API_KEY>" in msgs[5]["content"]
        assert all(set(x) == {"role", "content", "tool_calls", "tool_call_id", "name"} for x in msgs)
        ds = datasets.load_dataset("json", data_files=str(out / "tools.train.jsonl"), split="train")
        assert list(ds.features) == [c.name for c in SCHEMAS["tools"]]
        assert ds[0]["messages"][4]["tool_calls"][0]["function"]["arguments"] == '{"n": 4}'
        export_to_dir(store, tmp_path / "pq", options_from_mapping({"format": "tools", "test_fraction": "0",
                                                                     "parquet": "true"}))
        pq = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "tools.train.parquet"), split="train")
        assert pq[0]["messages"] == ds[0]["messages"]
        card = (out / "README.md").read_text()
        assert "**tools**" in card and "config_name: tools" in card and "tool_call_id" in card
        with pytest.raises(ExportError, match="No tool loops to export"):
            export_to_dir(store, tmp_path / "none", options_from_mapping({"format": "tools", "since": "2999-01-01"}))
    finally:
        store.close()
