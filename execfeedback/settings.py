"""The one table of settings: each key's type, range, default and where it applies. The API, the Settings
panel, the command lines (the app's and eval's flags where they overlap) and LoopConfig all read it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from dialog import InvalidInput

# Where a setting applies: "ask" (the sampling of a reply), "loop" (Solve and Fix), "engine" (which model a
# request runs on), "dialog" (kept in a dialog's settings, under the request's own values).
ASK, LOOP, ENGINE, DIALOG = "ask", "loop", "engine", "dialog"


@dataclass(frozen=True)
class Setting:
    key: str
    kind: type                 # int, float or str
    default: Any
    applies: tuple[str, ...]
    help: str
    low: float | None = None   # numbers: the smallest allowed, or
    above: float | None = None  # the bound they must be above
    high: float | None = None
    choices: tuple[str, ...] | None = None
    label: str | None = None   # its field in the Settings panel, when it has one

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this setting, or None."""
        if self.choices is not None:
            return None if value in self.choices else f"{self.key} must be one of {', '.join(self.choices)}"
        if self.kind is str:
            return None if isinstance(value, str) else f"'{self.key}' must be a string."
        noun = "a whole number" if self.kind is int else "a number"
        number = not isinstance(value, bool) and isinstance(value, int if self.kind is int else (int, float))
        # Written so that NaN fails every comparison.
        if number and (self.above is None or value > self.above) and (self.low is None or value >= self.low) \
                and (self.high is None or value <= self.high):
            return None
        span = f"above {self.above}" if self.above is not None else f"from {self.low} to {self.high}"
        return f"{self.key} must be {noun} {span}; got {value!r}."

    def parse(self, text: str) -> Any:
        """A form or command-line text as this setting's type (the range is checked by `problem`)."""
        try:
            return self.kind(text.strip()) if self.kind is not str else text
        except ValueError:
            noun = "a whole number" if self.kind is int else "a number"
            raise InvalidInput(f"{self.key} must be {noun}, not {text.strip()[:40]!r}; leave it empty to use the "
                               "app default.") from None


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("max_tokens", int, 1024, (ASK, DIALOG), "longest reply in tokens", low=1, high=32768),
    Setting("temperature", float, 0.0, (ASK, DIALOG), "sampling temperature for replies", low=0, high=5),
    Setting("seed", int, 0, (ASK, DIALOG), "sampling seed (-1: random)", low=-1, high=2**32 - 1),
    Setting("top_p", float, 1.0, (ASK, DIALOG), "nucleus sampling: keep the tokens of this much probability",
            low=0, high=1),
    Setting("top_k", int, 0, (ASK, DIALOG), "keep the k likeliest tokens (0: all)", low=0, high=100_000),
    Setting("min_p", float, 0.0, (ASK, DIALOG), "drop tokens below this share of the likeliest", low=0, high=1),
    Setting("repeat_penalty", float, 1.0, (ASK, DIALOG), "penalty for repeated tokens (1: none)", low=0, high=10),
    Setting("model", str, None, (ENGINE,), "a model name (`python -m local_model list`) or a GGUF path"),
    Setting("backend", str, None, (ENGINE,), "llama (in process), anthropic, or openai"),
    Setting("adapter", str, None, (ENGINE, DIALOG), "a registered LoRA adapter to run on the base model",
            label="Adapter"),
    Setting("rounds", int, 3, (LOOP, DIALOG), "feedback rounds after the first attempt",
            low=0, high=20, label="Feedback rounds"),
    Setting("candidates", int, 1, (LOOP, DIALOG),
            "code samples in the first round (1: the greedy answer alone); more come from one batched request and "
            "selection by execution picks one (the greedy one unless outnumbered by 2)",
            low=1, high=16, label="Candidates"),
    Setting("retry_candidates", int, 4, (LOOP, DIALOG),
            "code samples in each feedback round, from one batched request, selected by execution: search only "
            "after a failure (1: one answer per round)",
            low=1, high=16, label="Candidates after a failure"),
    Setting("retry_fresh", int, 2, (LOOP, DIALOG),
            "of the candidates after a failure, how many are fresh samples of the task (the round-0 prompt, the "
            "failure unseen), so that the search is not only over copies of the failed answer; the others answer "
            "the feedback",
            low=0, high=15, label="Fresh samples after a failure"),
    Setting("select_inputs", int, 6, (LOOP, DIALOG),
            "selection by execution: test inputs the model writes for the task's function in one short extra "
            "generation (its inputs only, never its predicted outputs), run with the visible checks' inputs; 0: off",
            low=0, high=16),
    Setting("retry", str, "refine", (LOOP, DIALOG),
            "refine: answer the feedback in a growing conversation; repair: one fresh turn with the task, the "
            "failed code and the feedback; regenerate: one fresh turn with the task and what went wrong (the "
            "failing check, what it computed), the failed code left out; resample: a fresh sample of the round-0 "
            "prompt",
            choices=("refine", "repair", "regenerate", "resample"), label="Retry"),
    Setting("repeat_resamples", int, 2, (LOOP, DIALOG),
            "when a feedback round returns code already tried, sample again warmer, up to N times; 0: off",
            low=0, high=8, label="Resample repeats"),
    Setting("exec_timeout", float, 30.0, (LOOP, DIALOG), "seconds each attempt's code may run", above=0),
    Setting("tool_steps", int, 5, (DIALOG,),
            "steps a prompt's &`fn` tool loop may take: model turns whose calls run in the kernel, results going back",
            low=0, high=50, label="Tool steps"),
    Setting("tool_choice", str, "auto", (ASK, DIALOG),
            "auto: the model decides whether to call a &`fn` tool; required: its first turn must call one",
            choices=("auto", "required"), label="Tool choice"),
    Setting("system_prompt", str, None, (DIALOG,), "the system prompt of the dialog's model turns",
            label="System prompt"),
)}


def keys(where: str) -> tuple[str, ...]:
    """The settings that apply `where` (ask, loop, engine, dialog), in table order."""
    return tuple(k for k, s in SETTINGS.items() if where in s.applies)


FORM_KEYS = tuple(k for k, s in SETTINGS.items() if s.label)


def check(values: Mapping[str, Any], where: str | None = None) -> None:
    """Refuse (InvalidInput) the first value the table refuses; None means the default and always passes.
    With `where`, a key that does not apply there is refused too."""
    for key, value in values.items():
        s = SETTINGS.get(key)
        if s is None or (where is not None and where not in s.applies):
            raise InvalidInput(f"Unknown {where + ' ' if where else ''}setting {key!r}; known: "
                               f"{', '.join(keys(where) if where else SETTINGS)}.")
        if value is not None and (problem := s.problem(value)):
            raise InvalidInput(problem)


def check_dialog(settings: dict, patch: dict | None = None, *, adapter_exists: Callable[[str], Any] = None) -> None:
    """Refuse dialog settings that Ask or Solve would refuse later: a bad value is caught where it is set.
    `settings`: all of them as they would be after the change; `patch`: what the change sets (default: all).
    Null removes a setting, any setting: a key that is not known here (from an older store) can always go.
    `adapter_exists(name)` raises for an adapter that is not registered; it is asked only when one is chosen
    (one removed since stays shown as such in the panel, and does not block other saves)."""
    known = keys(DIALOG)
    patch = settings if patch is None else patch
    unknown = {k for k, v in patch.items() if v is not None} - set(known)
    if unknown:
        raise InvalidInput(f"Unknown setting(s) {', '.join(sorted(map(str, unknown)))} (set one to null to remove "
                           f"it); known: {', '.join(sorted(known))}.")
    settings = {k: v for k, v in settings.items() if k in known and v is not None}
    if "adapter" in settings and not isinstance(settings["adapter"], str):
        raise InvalidInput("'adapter' must be the name of a registered adapter.")
    check(settings)
    if patch.get("adapter") is not None and adapter_exists is not None:
        adapter_exists(settings["adapter"])


def from_form(form: Mapping[str, Any]) -> dict:
    """The Settings panel's form as a settings patch: an empty field is None (the app default), an absent one
    (a disabled choice the browser does not send) is left as it is."""
    patch = {}
    for key in FORM_KEYS:
        if key not in form:
            continue
        value = form.get(key)
        text = value.replace("\r\n", "\n") if isinstance(value, str) else ""
        if not text.strip():
            patch[key] = None
        else:
            patch[key] = SETTINGS[key].parse(text if key == "system_prompt" else text.strip())
    return patch


def add_arguments(parser: argparse.ArgumentParser, *names: str, defaults: Mapping[str, Any] | None = None) -> None:
    """Command-line flags for settings (`--repeat-resamples` for repeat_resamples), typed and helped by the table."""
    for key in names:
        s = SETTINGS[key]
        default = (defaults or {}).get(key, s.default)
        parser.add_argument("--" + key.replace("_", "-"), type=s.kind, default=default, choices=s.choices,
                            help=f"{s.help} (default {default})")
