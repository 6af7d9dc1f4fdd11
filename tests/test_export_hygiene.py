"""Hygiene: secrets scrubbed with exact counts, duplicates dropped with exact counts, budgets in chars and tokens."""

import json

import pytest
from exporthelpers import ask, solved_trace
from parts import smollm2_path

from execfeedback.export.exporter import export_to_dir, options_from_mapping
from execfeedback.export.hygiene import Scrubber, TokenCounter, normalise_code
from execfeedback.traces import TraceStore


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_scrubber_replaces_each_kind_and_counts_exactly():
    s = Scrubber(app_token="app-token-Zq81LmN0", environ={"SERVICE_PASSWORD": "pw-0123456789ab", "HOME_DIR": "/x"},
                 home="/home/alice")
    text = (
        "OPENAI = 'sk-proj-Zx81kq02PLmnA7vB3cD4eF5gH6iJ7kL8'\n"
        "ANTHROPIC = \"sk-ant-api03-Qw12Er34Ty56Ui78Op90AsDfGhJkL-zxcv\"\n"
        "gh = 'ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8' and github_pat_11ABCDEFG0123456789abcdefghijklmnop\n"
        "aws = 'AKIAIOSFODNN7EXAMPLE'; aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'\n"
        "headers = {'Authorization': 'Bearer eyZ0aGlzIGlzIGEgYmVhcmVyIHRva2Vu1234'}\n"
        "jwt = eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THs\n"
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
        "mail jane.doe@example.org or ops+alerts@mail.example.co.uk\n"
        "password = 'hunter2hunter2'; url = 'postgres://admin:s3cretpw@db:5432/x'\n"
        "token app-token-Zq81LmN0 and pw-0123456789ab in /home/alice/project/x.py\n"
        # Look-alikes that must survive: matrix products, decorators, ordinary names.
        "y = a@b.sum(); z = x@self.weights\n@app.route('/x')\nsorted(xs, key=len); tokenizer = 'gpt2'\n"
        "task-1234567890123456789012 and disk-usage\n"
    )
    out = s(text)
    assert dict(s.counts) == {"api_key": 2, "github_token": 2, "aws_key": 2, "token": 2, "private_key": 1,
                              "email": 2, "password": 2, "app_token": 1, "env_secret": 1, "home_path": 1}
    for kept in ("y = a@b.sum(); z = x@self.weights", "@app.route('/x')", "sorted(xs, key=len)",
                 "tokenizer = 'gpt2'", "task-1234567890123456789012", "~/project/x.py"):
        assert kept in out, kept
    assert "Bearer <SECRET_TOKEN>" in out and "postgres://admin:<SECRET_PASSWORD>@db" in out
    assert "password = '<SECRET>'" in out and "<SECRET_PRIVATE_KEY>" in out


def test_credentials_loopbook_issues_are_scrubbed_whatever_token_made_them(store, tmp_path):
    from kernels.helper_setup import kernel_token

    ktoken = kernel_token("an app token from another machine", 12, "2026-01-01T00:00:00.000+00:00")
    session = "lbs_" + "Q" * 20 + "-_" + "7" * 21
    s = Scrubber(environ={})
    out = s(f"h = {{'Authorization': 'token {ktoken}'}}\nos.environ['K'] = \"{ktoken}\"\ncookie {session}\n")
    assert ktoken not in out and session not in out
    assert dict(s.counts) == {"kernel_token": 2, "session": 1}
    assert out.count("<SECRET_KERNEL_TOKEN>") == 2 and "<SECRET_SESSION>" in out
    # Look-alikes stay.
    assert s("lbk3.short and lbk12 and lbs_short and klbk3." + "a" * 32) == \
        "lbk3.short and lbk12 and lbs_short and klbk3." + "a" * 32
    # Through a whole export: a kernel token printed in a cell never reaches the dataset or its card.
    ts = TraceStore(store)
    solved_trace(ts, ask(f"Call the API with token {ktoken}."), f"TOKEN = {ktoken!r}\n")
    export_to_dir(store, tmp_path / "o", options_from_mapping({"format": "all", "test_fraction": "0"}), environ={})
    written = "".join(p.read_text() for p in (tmp_path / "o").iterdir())
    assert ktoken not in written and ktoken.split(".")[1] not in written and "<SECRET_KERNEL_TOKEN>" in written
    assert "Loopbook kernel tokens" in (tmp_path / "o" / "README.md").read_text()


def test_env_values_that_are_short_or_paths_are_not_treated_as_secrets(tmp_path):
    s = Scrubber(environ={"TOKENIZERS_PARALLELISM": "false", "KEY_FILE": str(tmp_path), "EDITOR_THEME": "abcdefghijk"})
    assert s(f"false {tmp_path} abcdefghijk") == f"false {tmp_path} abcdefghijk"
    assert not s.counts


def test_cut_private_key_block_is_removed_whole():
    s = Scrubber(environ={})
    out = s("pem = '-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEAu1SU1LfVLPHC\\nozMxH2Mo4lgOEePz")
    assert out == "pem = '<SECRET_PRIVATE_KEY>" and s.counts["private_key"] == 1


def test_normalise_code_ignores_comments_layout_docstrings_and_local_names():
    base = normalise_code("def mean(xs):\n    total = sum(xs)\n    return total / len(xs)\n")
    same = ('def average(values):\n  """Mean of values."""\n\n  # add them up\n  s = sum(values)   \n'
            '  return s / len(values)')
    assert normalise_code(same) == base
    for different in ("def mean(xs):\n    total = sum(xs)\n    return len(xs) / total\n",   # operands swapped
                      "def mean(xs):\n    total = max(xs)\n    return total / len(xs)\n",   # another builtin
                      "def mean(xs):\n    total = sum(xs)\n    return total // len(xs)\n",  # another operator
                      "def mean(xs):\n    total = sum(xs)\nreturn total / len(xs)\n"):     # another nesting
        assert normalise_code(different) != base, different
    assert normalise_code("xs.append(1)") != normalise_code("xs.extend(1)")
    assert normalise_code("print('a')") != normalise_code("print('b')")


def dedup_store(store):
    """Six solved traces: three identical, two near copies of another, one distinct."""
    ts = TraceStore(store)
    prompt = ask("Write mean(xs).")
    code = "def mean(xs):\n    total = sum(xs)\n    return total / len(xs)\n"
    for _ in range(3):
        solved_trace(ts, prompt, code)
    other = ask("Write mean(xs) for floats.")
    solved_trace(ts, other, "def mean(xs):\n    return sum(xs) / len(xs)\n")
    solved_trace(ts, other, "def mean(values):\n    # one line\n    return sum(values)/len(values)\n")
    solved_trace(ts, ask("Write MEAN(xs)  for floats."), "def mean(ys):\n    return sum(ys) / len(ys)\n")
    solved_trace(ts, ask("Write median(xs)."), "def median(xs):\n    return sorted(xs)[len(xs) // 2]\n")


@pytest.mark.parametrize("mode,exact,near,kept", [("near", 2, 2, 3), ("exact", 2, 0, 5), ("none", 0, 0, 7)])
def test_dedup_counts_are_exact_on_a_planted_set(store, tmp_path, mode, exact, near, kept):
    dedup_store(store)
    report = export_to_dir(store, tmp_path / mode, options_from_mapping(
        {"format": "sft_final", "dedup": mode, "test_fraction": "0"}), environ={})
    assert report.dedup["sft_final"] == (exact, near)
    assert report.files == {"sft_final.train.jsonl": kept}
    card = (tmp_path / mode / "README.md").read_text()
    assert f"| sft_final | {exact} | {near} |" in card


def test_long_observations_are_cut_to_the_character_budget(store, tmp_path):
    ts = TraceStore(store)
    long_feedback = "Your code raised ValueError: bad\n" + "\n".join(f"frame {i}: x = {i * 7}" for i in range(900))
    solved_trace(ts, ask("Write f(x)."), "def f(x):\n    return x\n", failing="def f(x):\n    raise ValueError\n",
                 feedback=long_feedback)
    report = export_to_dir(store, tmp_path / "o", options_from_mapping(
        {"format": "sft,trajectory", "max_observation_chars": "1000", "test_fraction": "0"}), environ={})
    [row] = lines(tmp_path / "o" / "sft.train.jsonl")
    obs = row["messages"][3]["content"]
    assert len(long_feedback) > 10000 and len(obs) < 1100 and "characters omitted" in obs
    assert obs.startswith("Your code raised ValueError") and obs.endswith("frame 899: x = 6293")
    assert report.stats.observations_cut == 1 and report.stats.traces_with_cut == 1
    assert "1 observations in 1 traces" in (tmp_path / "o" / "README.md").read_text()


def test_token_budget_cuts_observations_then_drops_rows(store, tmp_path):
    ts = TraceStore(store)
    counter = TokenCounter(str(smollm2_path()))
    feedback = "Your code raised ValueError: bad\n" + " ".join(f"value{i}" for i in range(1500))
    solved_trace(ts, ask("Write g(x)."), "def g(x):\n    return x + 1\n", failing="def g(x):\n    raise ValueError\n",
                 feedback=feedback)
    solved_trace(ts, ask("Summarise: " + " ".join(f"word{i}" for i in range(1500))), "def h():\n    return 0\n")
    solved_trace(ts, ask("Write k()."), "def k():\n    return 2\n")
    budget = 400
    report = export_to_dir(store, tmp_path / "o", options_from_mapping(
        {"format": "sft,sft_final", "tokenizer_gguf": str(smollm2_path()), "max_tokens_per_row": str(budget),
         "test_fraction": "0"}), environ={})
    sft = lines(tmp_path / "o" / "sft.train.jsonl")
    final = lines(tmp_path / "o" / "sft_final.train.jsonl")
    assert report.stats.tokens_cut == {"sft": 1}
    assert report.stats.tokens_dropped == {"sft": 1, "sft_final": 1}
    assert len(sft) == 2 and len(final) == 2
    assert all(counter.count(r["messages"]) <= budget for r in sft + final)
    assert any("characters omitted" in m["content"] for r in sft for m in r["messages"])
    card = (tmp_path / "o" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "budget 400 tokens per row" in card
