"""Eval's cost figures and issue 15's records, as pure functions over stored attempts: tokens per problem beside
pass@1 per round, static analysis's round-0 catches, and the candidate selection said was chosen."""
from execfeedback.eval.runner import account, chosen_by_round, format_table, problem_result


def attempt(i, rnd, k, tokens, *, passed=False, hidden=False, static=False, chosen=None, status="check_failed"):
    a = {"id": i, "round": rnd, "candidate": k, "completion_tokens": tokens, "passed": passed, "hidden_passed": hidden,
         "static": static, "exec_status": "ok" if passed else status, "code": "x", "author": "model"}
    if chosen is not None:
        a["selection"] = {"chosen": chosen}
    return a


def test_the_candidate_selection_chose_is_the_rounds_choice_not_the_first_that_passed():
    atts = [attempt(1, 0, 0, 10, passed=True, hidden=False, chosen=False),
            attempt(2, 0, 1, 10, passed=True, hidden=True, chosen=True)]
    assert chosen_by_round(atts)[0]["id"] == 2


def test_tokens_per_problem_by_round_and_static_catches():
    p1 = [attempt(1, 0, 0, 100, static=True, status="error"), attempt(2, 0, 1, 50, status="check_failed"),
          attempt(3, 1, 0, 30, passed=True, hidden=True)]
    p2 = [attempt(4, 0, 0, 20, passed=True, hidden=True)]
    r1 = problem_result("a", {"id": 1, "stop_reason": "passed", "final_attempt_id": 3}, p1, rounds=1)
    r2 = problem_result("b", {"id": 2, "stop_reason": "passed", "final_attempt_id": 4}, p2, rounds=1)
    assert r1["tokens_by_round"] == [150, 180] and r1["tokens"] == 180
    assert r1["round0_failed_attempts"] == 2 and r1["round0_static"] == 1
    s = account([r1, r2])
    assert s["pass_by_round"] == [0.5, 1.0]
    assert s["tokens_per_problem_by_round"] == [85.0, 100.0] and s["tokens_per_problem"] == 100.0
    assert s["round0_static_caught"] == 1 and s["round0_failed_attempts"] == 2
    s.update(wall_s=1.0, regressions=0)
    text = format_table({"summary": s})
    assert "tokens generated per problem" in text and "1 of 2 failed round-0 attempt(s) caught before running" in text


def test_the_model_written_inputs_of_a_selection_count_once_in_the_round_they_were_asked_for():
    atts = [attempt(1, 0, 0, 40, passed=True, hidden=True, chosen=True), attempt(2, 0, 1, 60, passed=True, chosen=False)]
    atts[0]["selection"]["inputs_tokens"] = 25  # on the round's first candidate only
    atts[1]["selection"]["inputs_tokens"] = 0
    r = problem_result("a", {"id": 1, "stop_reason": "passed", "final_attempt_id": 1}, atts, rounds=0)
    assert r["tokens_by_round"] == [125] and r["tokens"] == 125
