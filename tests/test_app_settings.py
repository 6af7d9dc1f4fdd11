"""The dialog page's Settings panel through the app (in process; the model test on a real server): saving,
refusing, clearing, adapters, escaping."""

from __future__ import annotations

import itertools
from html import unescape

import pytest
from bs4 import BeautifulSoup

from dialog import Store
from execfeedback.adapters import registry as adapters

HX = {"HX-Request": "true"}
_names = itertools.count()


@pytest.fixture
def c(app_client):
    return app_client


def data_dir_of(c):
    return c.app.state.cfg.data_dir


def new_dialog(c, settings: dict | None = None) -> int:
    did = c.post("/api/dialogs", json={"title": "Settings"}).json()["id"]
    if settings:
        assert c.patch(f"/api/dialogs/{did}", json={"settings": settings}).status_code == 200
    return did


def settings_of(c, did: int) -> dict:
    return c.get(f"/api/dialogs/{did}").json()["settings"]


def form(adapter="", rounds="", candidates="", retry="", system_prompt="", repeat_resamples="") -> dict:
    return {"adapter": adapter, "rounds": rounds, "candidates": candidates, "retry": retry,
            "repeat_resamples": repeat_resamples, "system_prompt": system_prompt}


def panel(c, did: int):
    return BeautifulSoup(c.get(f"/d/{did}").text, "html.parser").select_one("details#settings")


def register(data_dir, base_sha: str, **extra) -> str:
    """A registry row in the server's own store, with its (small) adapter file in place."""
    name = f"fix-v{next(_names)}-{base_sha[:4]}"
    store = Store(data_dir)
    try:
        folder = adapters.adapters_dir(store)
        folder.mkdir(parents=True, exist_ok=True)
        data = b"GGUF small adapter for the settings tests"
        (folder / f"{name}.gguf").write_bytes(data)
        adapters.register(store, {"name": name, "file_name": f"{name}.gguf", "sha256": "aa" * 32,
                                  "size_bytes": len(data), "base_model": "smollm2-135m",
                                  "base_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "base_sha256": base_sha,
                                  "architecture": "llama", **extra})
    finally:
        store.close()
    return name


def test_valid_values_are_saved_and_shown(c):
    did = new_dialog(c, {"temperature": 0.3})
    r = c.post(f"/d/{did}/settings", data=form(rounds="2", candidates=" 3 ", retry="repair", repeat_resamples="0",
                                                 system_prompt="Be brief.\r\nUse numpy."), headers=HX)
    assert r.status_code == 200 and "Settings saved" in r.text
    assert 'hx-swap-oob="true"' in r.text and 'id="autorun-note"' in r.text  # the panel and the note re-rendered
    # The settings the panel does not show are kept.
    assert settings_of(c, did) == {"temperature": 0.3, "rounds": 2, "candidates": 3, "retry": "repair",
                                   "repeat_resamples": 0, "system_prompt": "Be brief.\nUse numpy."}
    p = panel(c, did)
    assert p.select_one("input[name=rounds]")["value"] == "2"
    assert p.select_one("input[name=candidates]")["value"] == "3"
    assert p.select_one("input[name=repeat_resamples]")["value"] == "0"
    assert p.select_one("select[name=retry] option[selected]")["value"] == "repair"
    assert p.select_one("textarea[name=system_prompt]").text.strip("\n") == "Be brief.\nUse numpy."
    assert p.select_one("select[name=adapter] option[selected]").text == "none (base model)"
    assert p.select_one("form")["hx-post"] == f"/d/{did}/settings"


def test_bad_values_give_a_toast_and_change_nothing(c):
    did = new_dialog(c, {"rounds": 1, "retry": "refine"})
    before = settings_of(c, did)
    cases = [(form(rounds="-1"), "rounds must be"), (form(candidates="abc"), "candidates must be a whole number"),
             (form(adapter="no-such-adapter"), "no adapter 'no-such-adapter'"),
             (form(retry="sideways"), "retry must be one of"), (form(rounds="4", candidates="99"), "candidates must be"),
             (form(rounds="2.5"), "rounds must be a whole number"),
             (form(repeat_resamples="9"), "repeat_resamples must be")]
    for data, message in cases:
        r = c.post(f"/d/{did}/settings", data=data, headers=HX)
        assert r.headers.get("hx-retarget") == "#toast", data
        assert 'class="toast-msg"' in r.text and message in unescape(r.text), (data, r.text)
        assert "Settings saved" not in r.text
        assert settings_of(c, did) == before, data


def test_empty_fields_remove_keys_and_absent_ones_stay(c):
    did = new_dialog(c, {"rounds": 5, "candidates": 2, "retry": "resample", "system_prompt": "Terse.", "seed": 7})
    r = c.post(f"/d/{did}/settings", data={"rounds": "6"}, headers=HX)
    assert "Settings saved" in r.text
    assert settings_of(c, did) == {"rounds": 6, "candidates": 2, "retry": "resample", "system_prompt": "Terse.",
                                   "seed": 7}
    r = c.post(f"/d/{did}/settings", data=form(system_prompt="  \r\n "), headers=HX)
    assert "Settings saved" in r.text
    assert settings_of(c, did) == {"seed": 7}
    p = panel(c, did)
    # Empty again, with the app's default as the placeholder.
    assert p.select_one("input[name=rounds]")["value"] == ""
    assert p.select_one("input[name=rounds]")["placeholder"].startswith("default ")
    assert p.select_one("textarea[name=system_prompt]").text.strip() == ""


def test_a_registered_adapter_is_listed_chosen_and_named_in_the_header(c):
    name = register(data_dir_of(c), "b1" * 32)
    did = new_dialog(c)
    option = panel(c, did).select_one(f"select[name=adapter] option[value='{name}']")
    # No model is loaded in this server, so nothing is refused up front: the base is checked when it is used.
    assert option is not None and not option.has_attr("disabled") and "smollm2-135m" in option.text
    r = c.post(f"/d/{did}/settings", data=form(adapter=name, rounds="1"), headers=HX)
    assert "Settings saved" in r.text and f"adapter {name}" in r.text
    assert settings_of(c, did) == {"adapter": name, "rounds": 1}
    page = BeautifulSoup(c.get(f"/d/{did}").text, "html.parser")
    assert page.select_one(f"select[name=adapter] option[value='{name}']").has_attr("selected")
    assert f"in this kernel · adapter {name}" in page.select_one("#autorun-note").text
    # Choosing "none" clears it.
    c.post(f"/d/{did}/settings", data=form(adapter=""), headers=HX)
    assert "adapter" not in settings_of(c, did)
    note = BeautifulSoup(c.get(f"/d/{did}").text, "html.parser").select_one("#autorun-note").text
    assert "adapter" not in note and note.startswith("Solve and Fix run model code in this kernel · cwd ")


def test_adapters_of_another_base_are_listed_but_disabled(model_server):
    with model_server.client() as mc:
        manifest = mc.get("/api/model").json()["manifest"]
        fits = register(model_server.data_dir, manifest["sha256"])
        other = register(model_server.data_dir, "0f" * 32, base_model="qwen2.5-coder-1.5b")
        did = new_dialog(mc)
        select = panel(mc, did).select_one("select[name=adapter]")
        ours, theirs = select.select_one(f"option[value='{fits}']"), select.select_one(f"option[value='{other}']")
        assert not ours.has_attr("disabled")
        assert theirs.has_attr("disabled") and "qwen2.5-coder-1.5b" in theirs.text
        assert theirs["title"].startswith("Needs base model qwen2.5-coder-1.5b (sha256 0f0f0f0f0f0f")
        assert manifest["file_name"] in theirs["title"]


def test_hostile_text_is_escaped(c):
    hostile_base = '<img src=x onerror="alert(1)">'
    name = register(data_dir_of(c), "c3" * 32, base_model=hostile_base)
    prompt = '</textarea><script>alert("x")</script><b title="a">'
    did = new_dialog(c)
    r = c.post(f"/d/{did}/settings", data=form(adapter=name, system_prompt=prompt), headers=HX)
    assert "Settings saved" in r.text
    assert settings_of(c, did)["system_prompt"] == prompt
    for html in (r.text, c.get(f"/d/{did}").text):
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;/textarea&gt;&lt;script&gt;" in html and "&lt;img src=x" in html
    p = panel(c, did)
    assert p.select_one("textarea[name=system_prompt]").text.strip("\n") == prompt
    assert hostile_base in p.select_one(f"option[value='{name}']").text
