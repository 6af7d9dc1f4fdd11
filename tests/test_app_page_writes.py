"""The page's writes of text (save, run, ask, solve, a reply edited by hand): each says which text it replaces
(`base`), one that does not is refused, and a stale one is refused with a message, never overwriting newer text."""

HX = {"HX-Request": "true"}


def new_cell(c, type_, source):
    did = c.post("/api/dialogs", json={"title": "writes"}).json()["id"]
    return c.post(f"/api/dialogs/{did}/messages", json={"type": type_, "source": source}).json()["id"]


def source_of(c, mid):
    return c.get(f"/api/messages/{mid}").json()["source"]


# (method, route, cell type): every page route that takes a cell's text.
ROUTES = [("PUT", "/cells/{id}", "code"), ("POST", "/cells/{id}/save", "note"), ("POST", "/cells/{id}/run", "code"),
          ("POST", "/cells/{id}/ask", "prompt"), ("POST", "/cells/{id}/solve", "prompt")]


def test_a_write_without_its_base_is_refused(c):
    for method, route, kind in ROUTES:
        mid = new_cell(c, kind, "the newer text")
        r = c.request(method, route.format(id=mid), data={"source": "an older tab's text"})
        assert r.status_code == 400 and "base" in r.text, (route, r.status_code, r.text[:200])
        assert source_of(c, mid) == "the newer text", route
        # The page's own request is told in a toast, and nothing is written either.
        r = c.request(method, route.format(id=mid), data={"source": "an older tab's text"}, headers=HX)
        assert r.headers.get("hx-retarget") == "#toast" and "base" in r.text, route
        assert source_of(c, mid) == "the newer text", route
    # A save that sends no text at all does not empty the cell.
    mid = new_cell(c, "code", "keep me")
    assert c.put(f"/cells/{mid}", data={"base": "keep me"}).status_code == 400
    assert source_of(c, mid) == "keep me"


def test_a_stale_tab_is_refused_on_every_route_and_the_newer_text_stays(c):
    for method, route, kind in ROUTES:
        mid = new_cell(c, kind, "what the tab loaded")
        c.patch(f"/api/messages/{mid}", json={"source": "changed through the API"})
        # Ctrl+Enter in the old tab: it sends the text it has, based on what it loaded.
        r = c.request(method, route.format(id=mid), data={"source": "what the tab loaded", "base": "what the tab loaded"},
                      headers=HX)
        assert r.headers.get("hx-retarget") == "#toast" and "changed elsewhere" in r.text, (route, r.text[:300])
        assert "Reload the page" in r.text
        assert source_of(c, mid) == "changed through the API", route
        without_htmx = c.request(method, route.format(id=mid), data={"source": "x", "base": "what the tab loaded"})
        assert without_htmx.status_code == 409 and "changed elsewhere" in without_htmx.text, route
        assert source_of(c, mid) == "changed through the API", route


def test_an_up_to_date_run_saves_and_runs(c):
    mid = new_cell(c, "code", "x = 1")
    r = c.post(f"/cells/{mid}/run", data={"source": "print(6 * 7)", "base": "x = 1"}, headers=HX)
    assert r.status_code == 200 and "42" in r.text and "toast" not in r.text
    assert source_of(c, mid) == "print(6 * 7)"


def test_a_reply_edit_says_what_it_replaces(c):
    mid = new_cell(c, "prompt", "q")
    c.patch(f"/api/messages/{mid}", json={"reply": "the model's first answer"})
    assert c.post(f"/cells/{mid}/reply", data={"reply": "mine"}, headers=HX).headers.get("hx-retarget") == "#toast"
    c.patch(f"/api/messages/{mid}", json={"reply": "a newer answer"})
    r = c.post(f"/cells/{mid}/reply", data={"reply": "mine", "base": "the model's first answer"}, headers=HX)
    assert r.headers.get("hx-retarget") == "#toast" and "changed since you opened it" in r.text
    assert c.get(f"/api/messages/{mid}").json()["reply"] == "a newer answer"
    r = c.post(f"/cells/{mid}/reply", data={"reply": "mine", "base": "a newer answer"}, headers=HX)
    assert r.status_code == 200 and "toast" not in r.text
    assert c.get(f"/api/messages/{mid}").json()["reply"] == "mine"
