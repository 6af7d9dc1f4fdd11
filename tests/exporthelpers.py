"""Stores for the export tests, filled through the real TraceStore API with realistic traces."""

from __future__ import annotations

from dialog import Store
from dialog.context import build_context
from execfeedback.loop.feedback import feedback_message
from execfeedback.eval.problems import load_problems, task_message
from execfeedback.traces import TraceStore

MANIFEST = {"backend": "llama", "model": "smollm2-135m", "file_name": "SmolLM2-135M-Instruct-Q4_1.gguf",
            "path": "/home/alice/.loopbook/models/SmolLM2-135M-Instruct-Q4_1.gguf", "sha256": "ab" * 32,
            "quant": "Q4_1", "chat_template_hash": "cd" * 32, "llama_cpp_version": "0.3.36", "n_ctx": 4096,
            "n_gpu_layers": 0, "flash_attn": False}
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0, "seed": 0,
            "max_tokens": 512}
CODER = {**MANIFEST, "model": "qwen2.5-coder-1.5b", "file_name": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
         "quant": "Q4_K_M"}

# Secrets planted in a notebook: each must be gone from every exported file.
PLANTED = {
    "openai": "sk-proj-Zx81kq02PLmnA7vB3cD4eF5gH6iJ7kL8",
    "anthropic": "sk-ant-api03-Qw12Er34Ty56Ui78Op90AsDfGhJkL-zxcv",
    "github": "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "email": "jane.doe@example.org",
    "bearer": "eyZ0aGlzIGlzIGEgYmVhcmVyIHRva2Vu1234",
    "private_key": "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0",
}


def fenced(code: str, prose: str = "Here is the function.") -> str:
    return f"{prose}\n\n```python\n{code.rstrip()}\n```\n"


def error_obs(ename: str, evalue: str, code_line: str) -> dict:
    return {"status": "error", "ename": ename, "evalue": evalue,
            "traceback": ["Traceback (most recent call last):", '  File "<cell>", line 3, in <module>',
                          f"    {code_line}", f"{ename}: {evalue}"]}


def _attempt(ts: TraceStore, tid: int, messages: list[dict], rnd: int, code: str, *, status: str = "ok",
             passed: bool = False, ename: str | None = None, evalue: str | None = None, feedback: str | None = None,
             candidate: int = 0, prose: str = "Here is the function.", **extra) -> int:
    return ts.add_attempt(tid, messages, round=rnd, candidate=candidate, completion=fenced(code, prose), code=code,
                          extracted=True, exec_status=status, passed=passed, ename=ename, evalue=evalue,
                          traceback=[f"{ename}: {evalue}"] if ename else [], feedback=feedback, manifest=MANIFEST,
                          sampling=SAMPLING, prompt_tokens=180 + 40 * rnd, completion_tokens=60, ttft_s=0.2,
                          decode_s=0.7, exec_s=0.01, **extra)


def loop(ts: TraceStore, tid: int, context: list[dict], rounds: list[dict]) -> list[int]:
    """Write a chain of rounds the way the loop does: round r's input = round r-1 input + answer + feedback."""
    messages, ids = list(context), []
    for r, spec in enumerate(rounds):
        ids.append(_attempt(ts, tid, messages, r, **spec))
        if spec.get("feedback"):
            messages = messages + [{"role": "assistant", "content": fenced(spec["code"], spec.get("prose", "Here is the function."))},
                                   {"role": "user", "content": spec["feedback"]}]
    return ids


def notebook_context(store: Store, title: str, prompt: str, cells: list[tuple[str, str]] = ()) -> tuple[dict, dict, list]:
    d = store.create_dialog(title)
    for kind, source in cells:
        store.add_message(d["id"], kind, source)
    p = store.add_message(d["id"], "prompt", prompt)
    return d, p, build_context(store.messages(d["id"]), p)


def build_store(data_dir) -> dict:
    """A store with the cases the export must handle; returns the ids the tests look at."""
    store = Store(data_dir)
    ts = TraceStore(store)
    ids: dict = {"store": store}

    # 1. Solved at round 0.
    d1, p1, ctx1 = notebook_context(store, "strings", "Write a function that reverses a string.",
                                    [("note", "Small string helpers."), ("code", "import string")])
    t = ts.start_trace("solve", dialog_id=d1["id"], message_id=p1["id"], model="smollm2-135m", backend="llama",
                       manifest=MANIFEST, sampling=SAMPLING)
    [a] = loop(ts, t, ctx1, [dict(code="def reverse(s):\n    return s[::-1]\n", passed=True)])
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=a)
    ids["round0"] = t
    ids["round0_attempt"] = a

    # 2. Solved after two feedback rounds (NameError, then a failed check).
    d2, p2, ctx2 = notebook_context(store, "numbers", "Write mean(xs) that returns the average of a list.")
    fb0 = feedback_message(error_obs("NameError", "name 'total' is not defined", "return total / len(xs)"))
    fb1 = feedback_message({"status": "check_failed", "checks": {"passed": 1, "total": 2, "failures": []},
                            "stdout": "mean([]) returned None, expected 0.0"})
    t = ts.start_trace("solve", dialog_id=d2["id"], message_id=p2["id"], model="smollm2-135m", backend="llama",
                       manifest=MANIFEST, sampling=SAMPLING)
    chain = loop(ts, t, ctx2, [
        dict(code="def mean(xs):\n    return total / len(xs)\n", status="error", ename="NameError",
             evalue="name 'total' is not defined", feedback=fb0),
        dict(code="def mean(xs):\n    if xs:\n        return sum(xs) / len(xs)\n", status="check_failed",
             ename="AssertionError", evalue="mean([]) == 0.0", feedback=fb1),
        dict(code="def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n", passed=True),
    ])
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=chain[-1])
    ids["two_rounds"] = t
    ids["two_rounds_chain"] = chain

    # 3. Unsolved: the budget ran out.
    d3, p3, ctx3 = notebook_context(store, "parsing", "Parse an ISO date string into a datetime without imports.")
    fbs = [feedback_message(error_obs("ValueError", f"bad date {i}", "parse('2024-01-01')")) for i in range(2)]
    t = ts.start_trace("solve", dialog_id=d3["id"], message_id=p3["id"], model="qwen2.5-coder-1.5b", backend="llama",
                       manifest=CODER, sampling=SAMPLING)
    chain = loop(ts, t, ctx3, [
        dict(code=f"def parse(s):\n    y, m, d = s.split('-')\n    raise ValueError('bad date {i}')\n", status="error",
             ename="ValueError", evalue=f"bad date {i}", feedback=fbs[i] if i < 2 else None)
        for i in range(3)])
    ts.finish_trace(t, status="failed", stop_reason="budget", final_attempt_id=chain[-1])
    ids["unsolved"] = t

    # 4. Three candidates at round 0: two fail, one passes.
    d4, p4, ctx4 = notebook_context(store, "candidates", "Write is_even(n).")
    t = ts.start_trace("solve", dialog_id=d4["id"], message_id=p4["id"], model="qwen2.5-coder-1.5b",
                       backend="llama", manifest=CODER, sampling=SAMPLING)
    c0 = _attempt(ts, t, ctx4, 0, "def is_even(n):\n    return n % 2 == 1\n", candidate=0, status="check_failed",
                  ename="AssertionError", evalue="is_even(2)")
    c1 = _attempt(ts, t, ctx4, 0, "def is_even(n):\n    return n / 2\n", candidate=1, status="check_failed",
                  ename="AssertionError", evalue="is_even(3)")
    c2 = _attempt(ts, t, ctx4, 0, "def is_even(n):\n    return n % 2 == 0\n", candidate=2, passed=True)
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=c2)
    ids["candidates"] = t
    ids["candidate_ids"] = [c0, c1, c2]

    # 5. Eval runs over shipped problems, with task ids; p1 appears in both runs.
    problems, _ = load_problems()
    probs = problems[:3]
    nightly = ts.start_eval_run("nightly", problems_path="loopbook-30.jsonl")
    heldout = ts.start_eval_run("heldout", problems_path="loopbook-30.jsonl")
    ids["eval_tasks"] = [p.id for p in probs]
    for run, plist in ((nightly, probs), (heldout, probs[:1])):
        for i, prob in enumerate(plist):
            ctx = [{"role": "system", "content": "You write Python functions."},
                   {"role": "user", "content": task_message(prob)}]
            t = ts.start_trace("eval", task_id=prob.id, task_source="loopbook-30", eval_run_id=run["id"],
                               model="qwen2.5-coder-1.5b", backend="llama", manifest=CODER, sampling=SAMPLING)
            if i == 1:
                fb = feedback_message(error_obs("TypeError", "unsupported operand", "x + 'a'"))
                chain = loop(ts, t, ctx, [
                    dict(code=prob.prompt + "    return None\n", status="error", ename="TypeError",
                         evalue="unsupported operand", feedback=fb),
                    dict(code=prob.prompt + "    return 0\n", status="check_failed", ename="AssertionError",
                         evalue="wrong")])
                ts.finish_trace(t, status="failed", stop_reason="no_progress", final_attempt_id=chain[-1])
            else:
                chain = loop(ts, t, ctx, [dict(code=prob.prompt + "    return 42\n", passed=True, hidden_passed=True)])
                ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=chain[-1], hidden_passed=True)
    ids["nightly"], ids["heldout"] = nightly["id"], heldout["id"]

    # 6. A human edit of the model's code from trace 1.
    code_cell = store.add_message(d1["id"], "code", "def reverse(s):\n    return s[::-1]\n", author="model")
    ids["edit"] = ts.record_edit(code_cell["id"], "def reverse(s):\n    return s[::-1]\n",
                                 "def reverse(s: str) -> str:\n    \"\"\"Reverse s.\"\"\"\n    return ''.join(reversed(s))\n",
                                 dialog_id=d1["id"], trace_id=ids["round0"])

    # 7. Secrets everywhere: in the context, the code, the output and the feedback.
    d7, p7, ctx7 = notebook_context(store, "secrets", f"Call the API; mail {PLANTED['email']} if it fails.", [
        ("code", f"import os\nos.environ['OPENAI_API_KEY'] = '{PLANTED['openai']}'\nKEY = '{PLANTED['anthropic']}'")])
    leaky = (f"import requests\nheaders = {{'Authorization': 'Bearer {PLANTED['bearer']}'}}\n"
             f"gh = '{PLANTED['github']}'\naws = '{PLANTED['aws']}'\n"
             f"pem = '''-----BEGIN RSA PRIVATE KEY-----\n{PLANTED['private_key']}\n-----END RSA PRIVATE KEY-----'''\n")
    fb7 = feedback_message({"status": "error", "ename": "ConnectionError", "evalue": f"refused for {PLANTED['email']}",
                            "traceback": [f"ConnectionError: refused, key {PLANTED['openai']}"],
                            "stdout": f"token={PLANTED['github']}"})
    t = ts.start_trace("solve", dialog_id=d7["id"], message_id=p7["id"], model="smollm2-135m", backend="llama",
                       manifest=MANIFEST, sampling=SAMPLING)
    chain = loop(ts, t, ctx7, [
        dict(code=leaky, status="error", ename="ConnectionError", evalue=f"refused for {PLANTED['email']}",
             feedback=fb7, stdout=f"token={PLANTED['github']}"),
        dict(code=leaky + "print('ok')\n", passed=True, stdout="ok\n"),
    ])
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=chain[-1])
    ids["secrets"] = t

    # 8. Resampling instead of refining: round 1 sees the round-0 input again, not the feedback.
    d8, p8, ctx8 = notebook_context(store, "resample", "Write clamp(x, lo, hi).")
    t = ts.start_trace("solve", dialog_id=d8["id"], message_id=p8["id"], model="qwen2.5-coder-1.5b", backend="llama",
                       manifest=CODER, sampling=SAMPLING, config={"retry": "resample"})
    fb8 = feedback_message(error_obs("NameError", "name 'clip' is not defined", "return clip(x)"))
    r0 = _attempt(ts, t, ctx8, 0, "def clamp(x, lo, hi):\n    return clip(x)\n", status="error", ename="NameError",
                  evalue="name 'clip' is not defined", feedback=fb8)
    r1 = _attempt(ts, t, ctx8, 1, "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n", passed=True)
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=r1)
    ids["resample"], ids["resample_ids"] = t, [r0, r1]

    # 9. Fix: round 0 is the human's failing cell; the model's first input carries it and the error.
    d9, p9, ctx9 = notebook_context(store, "fix", "Load the numbers.", [("code", "nums = [1, 2, 3]")])
    human_code = "print(sum(nums) / count)"
    fb9 = feedback_message(error_obs("NameError", "name 'count' is not defined", human_code))
    t = ts.start_trace("fix", dialog_id=d9["id"], message_id=p9["id"], model="smollm2-135m", backend="llama",
                       manifest=MANIFEST, sampling=SAMPLING)
    h = ts.add_attempt(t, ctx9, round=0, completion=f"```python\n{human_code}\n```", code=human_code, extracted=True,
                       exec_status="error", ename="NameError", evalue="name 'count' is not defined", feedback=fb9,
                       author="human")
    asked = ctx9[:-1] + [{"role": "user", "content": ctx9[-1]["content"] + f"\n\nI ran this code:\n```python\n"
                                                                             f"{human_code}\n```\n\n{fb9}"}]
    m1 = _attempt(ts, t, asked, 1, "print(sum(nums) / len(nums))\n", passed=True)
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=m1)
    ids["fix"], ids["fix_ids"], ids["fix_input"] = t, [h, m1], asked

    # 10. A trace whose loop never finished: left out unless asked for.
    t = ts.start_trace("solve", dialog_id=d1["id"], model="smollm2-135m", backend="llama")
    _attempt(ts, t, ctx1, 0, "def reverse(s):\n    return s\n", status="error", ename="AssertionError", evalue="x")
    ids["unfinished"] = t
    return ids


def solved_trace(ts: TraceStore, context: list[dict], code: str, *, model: str = "smollm2-135m",
                 dialog_id: int | None = None, task_id: str | None = None, eval_run_id: int | None = None,
                 failing: str | None = None, feedback: str = "Your code raised NameError: name 'x' is not defined",
                 prose: str = "Here is the function.") -> int:
    """A finished trace: optionally one failing round with feedback, then the passing code."""
    t = ts.start_trace("eval" if task_id else "solve", dialog_id=dialog_id, task_id=task_id, task_source="t",
                       eval_run_id=eval_run_id, model=model, backend="llama", manifest=MANIFEST, sampling=SAMPLING)
    rounds = []
    if failing:
        rounds.append(dict(code=failing, status="error", ename="NameError", evalue="name 'x' is not defined",
                           feedback=feedback, prose=prose))
    rounds.append(dict(code=code, passed=True, prose=prose))
    ids = loop(ts, t, context, rounds)
    ts.finish_trace(t, status="passed", stop_reason="passed", final_attempt_id=ids[-1])
    return t


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "You write Python functions."}, {"role": "user", "content": text}]
