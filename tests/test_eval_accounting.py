"""The eval's accounting as pure functions: pass@1 per round, regressions, fix rate by error type."""

from execfeedback.eval.runner import EvalSettings, account, chosen_by_round, error_type, passed_by_round, problem_result


def att(id, rnd, status, hidden, *, cand=0, passed=None, ename=None, code="x = 1", checks=None):
    return {"id": id, "round": rnd, "candidate": cand, "exec_status": status, "hidden_passed": hidden,
            "passed": status == "ok" if passed is None else passed, "ename": ename, "code": code, "checks": checks}


def test_account_counts_pass_by_round_fixes_and_regressions():
    problems = [
        {"passed_by_round": [False, True, True], "round0_error": "NameError"},   # fixed at round 1
        {"passed_by_round": [True, True, True]},                                 # solved at once
        {"passed_by_round": [False, False, False], "round0_error": "check_failed"},
        {"passed_by_round": [False, False, True], "round0_error": "check_failed"},
        {"passed_by_round": [True, False, False]},                               # a regression
    ]
    s = account(problems)
    assert s["n"] == 5
    assert s["pass_counts_by_round"] == [2, 2, 3]
    assert s["pass_by_round"] == [0.4, 0.4, 0.6]
    assert s["regressions"] == 1
    assert s["fix_rate_by_error"] == {"check_failed": {"failed": 2, "fixed": 1, "rate": 0.5},
                                      "NameError": {"failed": 1, "fixed": 1, "rate": 1.0}}
    assert s["fix_rate"] == round(2 / 3, 4)


def test_account_without_regressions_and_empty():
    s = account([{"passed_by_round": [False, True]}, {"passed_by_round": [True, True]}])
    assert s["regressions"] == 0 and s["pass_counts_by_round"] == [1, 2]
    assert account([])["n"] == 0 and account([])["pass_by_round"] == []


def test_a_solved_problem_carries_its_pass_to_later_rounds():
    attempts = [att(1, 0, "error", None, ename="NameError", code="f("), att(2, 1, "ok", True)]
    assert passed_by_round(attempts, 3, final_attempt_id=2) == [False, True, True, True]
    assert error_type(chosen_by_round(attempts)[0]) == "NameError"


def test_hidden_pass_then_fail_is_counted_as_a_regression():
    # Visible checks failed at round 0 although the hidden tests passed; round 1 broke the hidden tests.
    attempts = [att(1, 0, "check_failed", True), att(2, 1, "check_failed", False)]
    r = problem_result("p", {"id": 7, "status": "failed", "stop_reason": "budget", "final_attempt_id": 2},
                       attempts, rounds=2)
    assert r["passed_by_round"] == [True, False, False]
    assert account([r])["regressions"] == 1
    assert r["round0_error"] is None and r["trace_id"] == 7 and r["n_attempts"] == 2


def test_the_chosen_candidate_is_the_first_that_passed_the_visible_checks():
    attempts = [att(1, 0, "error", None, cand=0, ename="TypeError"),
                att(2, 0, "ok", True, cand=1),
                att(3, 0, "ok", False, cand=2)]
    assert chosen_by_round(attempts)[0]["id"] == 2
    assert passed_by_round(attempts, 0) == [True]


def test_without_a_pass_the_best_failed_candidate_is_chosen_like_the_loop_does():
    attempts = [att(1, 0, "no_code", None, code=None),
                att(2, 0, "check_failed", False, checks={"passed": 1, "total": 3}),
                att(3, 0, "check_failed", True, checks={"passed": 2, "total": 3}),
                att(4, 0, "error", None, ename="ValueError")]
    assert chosen_by_round(attempts)[0]["id"] == 3
    assert passed_by_round(attempts, 1) == [True, True]
    # The loop's own record of what it kept wins for the last round.
    assert passed_by_round(attempts, 0, final_attempt_id=2) == [False]


def test_error_types():
    assert error_type(att(1, 0, "ok", False)) == "hidden_only"
    assert error_type(att(1, 0, "timeout", None)) == "timeout"
    assert error_type(att(1, 0, "error", None, ename="IndexError")) == "IndexError"
    assert error_type(None) == "no_attempt"
    r = problem_result("p", {"id": 1, "status": "failed", "stop_reason": "error"}, [], rounds=1)
    assert r["passed_by_round"] == [False, False] and r["round0_error"] == "no_attempt"


def test_default_run_name_follows_the_settings_but_not_concurrency_or_limit():
    a = EvalSettings(problems="loopbook-30.jsonl", model="smollm2-135m", rounds=1, max_tokens=64)
    b = EvalSettings(problems="loopbook-30.jsonl", model="smollm2-135m", rounds=1, max_tokens=64, concurrency=4,
                     limit=2)
    c = EvalSettings(problems="loopbook-30.jsonl", model="smollm2-135m", rounds=1, max_tokens=64, timeout=3)
    assert a.default_name() == b.default_name()
    assert a.default_name() != c.default_name()
    assert a.default_name().startswith("loopbook-30-smollm2-135m-r1-k1x4-refine-t0-s0-n64-")
    d = EvalSettings(problems="loopbook-30.jsonl", model="smollm2-135m", rounds=1, max_tokens=64, retry_candidates=1)
    assert d.default_name() != a.default_name() and "-k1x1-" in d.default_name()


def test_repair_messages_put_code_and_feedback_in_one_fresh_turn():
    from execfeedback.loop.loop import repair_messages

    base = [{"role": "system", "content": "s"}, {"role": "user", "content": "Write f."}]
    out = repair_messages(base, "def f(): return 1", "`f()` returned 1, expected 2")
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[1]["content"].startswith("Write f.") and "def f(): return 1" in out[1]["content"]
    assert out[1]["content"].endswith("expected 2") and base[1]["content"] == "Write f."
