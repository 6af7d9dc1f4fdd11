"""Edits of a dialog's cells from the page and the API: saves that say what they replace, deletes that can be
undone, copies, reply edits and a reply's code blocks as cells."""

from __future__ import annotations

from typing import Any

from dialog import Conflict, InvalidInput, Store

from ..loop.extract import code_blocks
from ..traces import TraceStore
from .solve import note_edit

EDITABLE = ("source", "type", "pinned", "skipped", "is_test", "reply")
TOGGLES = ("pinned", "skipped", "is_test")
COPIED_FIELDS = ("source", "outputs", "output_meta", "execution_count", "reply", "reply_meta", "pinned", "skipped",
                 "is_test", "author")
TRASH_KEEP = 200


def same_text(a: str, b: str) -> bool:
    # A browser's textarea turns CR LF into LF and drops one leading newline.
    def norm(t: str) -> str:
        t = t.replace("\r\n", "\n").replace("\r", "\n")
        return t[1:] if t.startswith("\n") else t
    return norm(a) == norm(b)


class Cells:
    """Holds, in this process only, the text each cell got from a page's last save (and from which tab), and
    the deleted cells, newest last, so a delete can be undone with its outputs and reply."""

    def __init__(self, store: Store, traces: TraceStore):
        self.store, self.traces = store, traces
        self.page_writes: dict[int, tuple[str, str]] = {}
        self.trash: dict[int, dict] = {}

    def save(self, message_id: Any, source: str | None, base: str | None, tab: str | None = None, *,
             then: str = "") -> dict:
        """The page's save, and the save before a run, an ask or a solve. `base` is the text this tab last had
        from the server: if the cell's text changed since (another tab, the API, the kernel helper, a Fix),
        refuse rather than overwrite, so the last writer wins only when it saw what it replaces. A tab's own
        earlier save (still on its way back to it when it sent this one) is no conflict. `then`: what the
        request would have done next ("run"), for the message."""
        if source is None:
            raise InvalidInput("Nothing to save: send the cell's text as 'source'.")
        if base is None:
            # Without it there is no telling a stale tab from a fresh one: refuse rather than risk a newer edit.
            raise InvalidInput("This save does not say which text it replaces ('base'), so nothing was saved. Reload "
                               "the page and try again.")
        with self.store.transaction():
            m = self.store.get_message(message_id)
            own = tab is not None and self.page_writes.get(m["id"]) == (tab, m["source"])
            if not own and not same_text(base, m["source"]) and not same_text(source, m["source"]):
                raise Conflict(f"Cell {m['id']} was changed elsewhere (another tab, the API, or code in the kernel) "
                               f"since this page loaded it, so this page's text was not saved"
                               + (f" and the cell was not {then}" if then else "")
                               + ". Reload the page to see the newer text; if you changed the cell here, copy your "
                                 "text first and apply it again.")
            note_edit(self.store, self.traces, m, source)
            m = self.store.update_message(m["id"], source=source)
            if tab:
                self.page_writes[m["id"]] = (tab, m["source"])
            return m

    def edit(self, message_id: Any, changes: dict) -> dict:
        """The API's edit: any of EDITABLE, checked against `version` when given (409 when stale). A human edit of
        model code is kept as a correction in the same transaction."""
        unknown = set(changes) - set(EDITABLE) - {"version"}
        if unknown:
            raise InvalidInput(f"Cannot change {', '.join(sorted(unknown))}; editable fields: "
                               f"{', '.join(sorted(EDITABLE))}.")
        with self.store.transaction():  # the correction record and the edit land together, or (409) neither does
            self.store.update_message(message_id, version=changes.get("version"))  # the version check, no write
            if isinstance(changes.get("source"), str):
                note_edit(self.store, self.traces, self.store.get_message(message_id), changes["source"])
            return self.store.update_message(message_id, **{k: v for k, v in changes.items() if k in EDITABLE})

    def toggle(self, message_id: Any, field: str) -> dict:
        if field not in TOGGLES:
            raise InvalidInput("Only 'pinned', 'skipped' and 'is_test' can be toggled.")
        m = self.store.get_message(message_id)
        return self.store.update_message(message_id, **{field: not m[field]})

    def delete(self, message_id: Any) -> int:
        m = self.store.delete_message(message_id)
        self.trash[m["id"]] = m
        while len(self.trash) > TRASH_KEEP:
            self.trash.pop(next(iter(self.trash)))
        return m["id"]

    def _copy(self, m: dict, dialog: Any, after: Any, before: Any) -> dict:
        fields = {k: m[k] for k in COPIED_FIELDS if k in m}
        return self.store.add_message(dialog or m["dialog_id"], m["type"], after=after or None, before=before or None,
                                      **fields)

    def restore(self, message_id: str, after: str = "", before: str = "") -> dict:
        """Undo a delete: the cell comes back where it was (after `after` or before `before`), outputs included."""
        m = self.trash.get(int(message_id)) if message_id.isascii() and message_id.isdigit() else None
        if m is None:
            raise InvalidInput("That cell can no longer be restored (only deletes since the server started can be "
                               "undone).")
        restored = self._copy(m, "", after, before)
        self.trash.pop(m["id"], None)
        return restored

    def paste(self, message_id: str, dialog: str = "", after: str = "", before: str = "") -> dict:
        """A copy of cell `message_id` (still there, or cut) in `dialog`, after or before a cell; outputs included."""
        cut = self.trash.get(int(message_id)) if message_id.isascii() and message_id.isdigit() else None
        return self._copy(cut or self.store.get_message(message_id), dialog, after, before)

    def edit_reply(self, message_id: Any, reply: str | None, base: str | None) -> dict:
        """A reply edited by hand. `base`: the reply as the editor opened with it, as with a cell's `base`."""
        if reply is None or base is None:
            raise InvalidInput("Send the edited reply as 'reply' and the reply you started from as 'base'; nothing "
                               "was saved.")
        with self.store.transaction():
            m = self.store.get_message(message_id)
            if m["type"] != "prompt":
                raise InvalidInput("Only a prompt has a reply to edit.")
            if not same_text(base, m["reply"]) and not same_text(reply, m["reply"]):
                raise Conflict(f"The reply of cell {m['id']} changed since you opened it for editing (the model "
                               "answered again, or another tab); yours was not saved. Copy your text, press Cancel to "
                               "see the newer reply, and edit that.")
            meta = {**(m.get("reply_meta") or {}), "status": "done", "edited_by_hand": True}
            return self.store.update_message(m["id"], reply=reply, reply_meta=meta)

    def extract(self, message_id: Any) -> list[dict]:
        """The code blocks of a prompt's reply as new code cells under it, all or none."""
        m = self.store.get_message(message_id)
        blocks = code_blocks(m.get("reply") or "")
        if not blocks:
            raise InvalidInput("The reply has no code blocks.")
        cells, after = [], m["id"]
        with self.store.transaction():
            for code in blocks:
                cells.append(self.store.add_message(m["dialog_id"], "code", code.rstrip("\n"), after=after,
                                                    author="model"))
                after = cells[-1]["id"]
        return cells
