"""Script your dialog from inside its own kernel: `import loopbook`, then list, add and run cells.

Loaded into every dialog's kernel as the module `loopbook` (standard library only). It talks to the
Loopbook server's JSON API with a token that is scoped to this one dialog, as solveit's dialoghelper
does for solveit.

    import loopbook
    loopbook.cells()                                  # this dialog's cells
    cid = loopbook.add_cell("print('made by code')")  # a code cell at the end (or after=ID)
    loopbook.run_cell(cid)                            # runs after the current cell finishes
"""

import json
import os
import urllib.error
import urllib.request

__all__ = ["dialog", "cells", "cell", "add_cell", "update_cell", "delete_cell", "run_cell", "LoopbookError"]


class LoopbookError(RuntimeError):
    """The server refused a request; the message says why."""


def _call(method, path, body=None):
    url = os.environ.get("LOOPBOOK_URL")
    token = os.environ.get("LOOPBOOK_KERNEL_TOKEN")
    if not url or not token:
        raise LoopbookError("This kernel was not started by Loopbook (LOOPBOOK_URL/LOOPBOOK_KERNEL_TOKEN are unset).")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error")
        except Exception:
            message = None
        raise LoopbookError(message or f"HTTP {e.code}") from None


def _dialog_id():
    return os.environ["LOOPBOOK_DIALOG_ID"]


def dialog():
    """This dialog: id, title, settings and its messages."""
    return _call("GET", f"/api/dialogs/{_dialog_id()}")


def cells():
    """This dialog's cells, in order."""
    return dialog()["messages"]


def cell(id):
    return _call("GET", f"/api/messages/{int(id)}")


def add_cell(source, type="code", after=None):
    """Add a cell (code, note or prompt) at the end, or after the cell `after`; returns its id."""
    body = {"type": type, "source": source}
    if after is not None:
        body["after"] = int(after)
    return _call("POST", f"/api/dialogs/{_dialog_id()}/messages", body)["id"]


def update_cell(id, **fields):
    """Change source, type, pinned, skipped or is_test of a cell."""
    return _call("PATCH", f"/api/messages/{int(id)}", fields)


def delete_cell(id):
    return _call("DELETE", f"/api/messages/{int(id)}")


def run_cell(id):
    """Run a code cell; from inside a running cell it is queued and runs once this cell is done."""
    return _call("POST", f"/api/messages/{int(id)}/run")
