"""Bounded capture of one cell's outputs: a head and a rolling tail under a character cap.

Text (streams, text-like display data, tracebacks) counts against `cap_chars`: the first half is
kept as it arrives, the last half as a rolling tail, and what falls between becomes one marker line.
Images and other binary display data count against a separate per-cell `display_cap_chars`; an
item that does not fit is replaced by a text/plain note. Memory stays bounded by the two caps.

Stream text is folded as it arrives (`fold`): carriage returns and backspaces rewrite the last line
the way Jupyter's frontends show it, so a progress bar stores as one line, not thousands.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

_TEXTLIKE_BINARY = ("image/svg+xml",)  # svg is text, but it is a picture: it spends the display budget
_ERROR_FIELD_CHARS = 20_000
_TRACEBACK_LINES = (50, 100)  # keep this many lines from the start and the end of a huge traceback
_PREVIEW_CHARS = 1_000
LINE_CHARS = 20_000  # a line longer than this is stored as it stands: a later \r rewrites only what follows
_CR_NEWLINE = re.compile(r"\r+\n")
_BACKSPACES = re.compile(r"(\x08+)")


def fold(text: str) -> str:
    """Apply backspaces and carriage returns to `text` the way Jupyter's frontends show a stream.

    Carriage returns follow `fixCarriageReturn` of the classic notebook, JupyterLab 3 and VS Code:
    `\r\n` is a newline; text after a `\r` overwrites its line from the start, and the rest of a
    longer old line stays. A trailing `\r` is kept, so `fold(fold(a) + b)` is what a frontend shows
    after receiving a, then b. Backspaces follow JupyterLab 4: a run of n deletes up to n characters
    before it on its line; extra ones are dropped.
    """
    if "\x08" in text:
        text = _fold_backspaces(text)
    if "\r" not in text:
        return text
    text = _CR_NEWLINE.sub("\n", text)
    if "\r" not in text:
        return text
    lines = text.split("\n")
    return "\n".join(_fold_line(line) if "\r" in line else line for line in lines)


def _fold_line(line: str) -> str:
    parts = line.split("\r")
    out = ""
    for part in parts:
        if part:
            out = part + out[len(part) :]
    return out + "\r" if parts[-1] == "" else out


def _fold_backspaces(text: str) -> str:
    pieces = _BACKSPACES.split(text)  # odd indices hold the runs of backspaces
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            out.append(piece)
            continue
        n = len(piece)
        while n and out:
            last = out[-1]
            start = last.rfind("\n") + 1
            take = min(n, len(last) - start)
            if take:
                out[-1] = last[: len(last) - take]
                n -= take
            if start or not n:
                break
            out.pop()
    return "".join(out)


def is_binary_mime(mime: str) -> bool:
    return mime.startswith(("image/", "audio/", "video/")) or mime in ("application/pdf", "application/octet-stream")


def value_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sum(len(v) for v in value)
    return len(json.dumps(value, default=str))


def clip_text(text: str, limit: int) -> str:
    """Keep the head and tail of `text` with a marker between when it is over `limit`."""
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    return text[:half] + f"\n... [{len(text) - 2 * half:,} characters omitted] ...\n" + text[-half:]


def clip_traceback(lines: list[str], field_chars: int) -> list[str]:
    first, last = _TRACEBACK_LINES
    if len(lines) > first + last:
        lines = lines[:first] + [f"... [{len(lines) - first - last} traceback lines omitted] ..."] + lines[-last:]
    return [clip_text(str(line), field_chars) for line in lines]


class _Chunk:
    """A piece of stream text; `start` lets the tail drop characters without copying."""

    __slots__ = ("name", "text", "start")

    def __init__(self, name: str, text: str, start: int = 0):
        self.name, self.text, self.start = name, text, start

    @property
    def cost(self) -> int:
        return len(self.text) - self.start

    def value(self) -> str:
        return self.text[self.start :] if self.start else self.text


class _Block:
    """A whole output (display data, execute result, error) that is kept or dropped as one."""

    __slots__ = ("output", "cost", "display_id", "side")

    def __init__(self, output: dict[str, Any], cost: int, display_id: str | None = None):
        self.output, self.cost, self.display_id, self.side = output, cost, display_id, None


class OutputCapture:
    """Turns iopub messages into nbformat v4 outputs, keeping head and tail under the caps."""

    def __init__(self, cap_chars: int = 200_000, display_cap_chars: int = 5_000_000):
        if cap_chars < 2:
            raise ValueError(f"output_cap_chars must be at least 2, got {cap_chars!r}")
        self.cap_chars = cap_chars
        self.display_cap_chars = max(display_cap_chars, 0)
        self.head_budget = cap_chars - cap_chars // 2
        self.tail_budget = cap_chars // 2
        self.original_chars = 0
        self.drop_keyboard_interrupt = False  # set when we interrupted on purpose (a timeout)
        self.lost = False  # the kernel dropped some iopub messages
        self._reset()

    def _reset(self) -> None:
        self.head: list[_Chunk | _Block] = []
        self.head_chars = 0
        self.head_full = False
        self.tail: deque[_Chunk | _Block] = deque()
        self.tail_chars = 0
        self.omitted_chars = 0
        self.omitted_stream: str | None = None
        self.binary_left = self.display_cap_chars
        self.noted = False
        self.clear_pending = False
        self.displays: dict[str, list[_Block]] = {}
        # The last line of the current stream, folded and not stored yet: a \r may still rewrite it.
        self.line = ""
        self.line_name: str | None = None
        self.line_chars = max(min(LINE_CHARS, self.tail_budget), 1)

    # -- intake -------------------------------------------------------------------------------

    def add(self, msg_type: str, content: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one iopub message; return the outputs to show live right now (maybe none)."""
        if msg_type == "stream":
            return self._stream(content.get("name", "stdout"), content.get("text", ""))
        if msg_type in ("display_data", "execute_result"):
            return self._rich(msg_type, content)
        if msg_type == "update_display_data":
            return self._update_display(content)
        if msg_type == "error":
            return self._error(content)
        if msg_type == "clear_output":
            if content.get("wait"):
                self.clear_pending = True
                return []
            self._reset()
            return [{"output_type": "clear_output", "wait": False}]
        return []

    def _before_output(self) -> list[dict[str, Any]]:
        if not self.clear_pending:
            return []
        self._reset()
        return [{"output_type": "clear_output", "wait": False}]

    def _stream(self, name: str, text: str) -> list[dict[str, Any]]:
        if not isinstance(text, str):
            text = str(text)
        if not text:
            return []
        live = self._before_output()
        self.original_chars += len(text)
        if name != self.line_name:
            live += self._close_line()
            self.line_name = name
        text = self.line + text
        if "\r" in text or "\x08" in text:
            text = fold(text)
        end = text.rfind("\n") + 1
        self.line = text[end:]
        if end:  # whole lines are final: nothing later can rewrite them
            live += self._commit(name, text[:end])
        if len(self.line) > self.line_chars:
            keep = "\r" if self.line.endswith("\r") else ""
            live += self._commit(name, self.line[: len(self.line) - len(keep)])
            self.line = keep
        return live

    def _close_line(self) -> list[dict[str, Any]]:
        """Store the open line: another output follows it, so nothing can rewrite it any more."""
        line, self.line = self.line, ""
        if line.endswith("\r"):
            line = line[:-1]
        return self._commit(self.line_name or "stdout", line) if line else []

    def _commit(self, name: str, text: str) -> list[dict[str, Any]]:
        live: list[dict[str, Any]] = []
        start = 0
        if not self.head_full:
            room = self.head_budget - self.head_chars
            if len(text) <= room:
                self.head.append(_Chunk(name, text))
                self.head_chars += len(text)
                live.append({"output_type": "stream", "name": name, "text": text})
                return live
            if room > 0:
                part = text[:room]
                self.head.append(_Chunk(name, part))
                self.head_chars += room
                live.append({"output_type": "stream", "name": name, "text": part})
            start = room
            self.head_full = True
            live.append(self._notice(name))
        self._push_tail(_Chunk(name, text, start))
        return live

    def _rich(self, msg_type: str, content: dict[str, Any]) -> list[dict[str, Any]]:
        live = self._before_output() + self._close_line()
        self.line_name = None
        data = content.get("data") or {}
        self.original_chars += sum(value_size(v) for m, v in data.items() if not is_binary_mime(m))
        capped, cost = self._cap_data(data)
        output: dict[str, Any] = {"output_type": msg_type, "data": capped, "metadata": content.get("metadata") or {}}
        if msg_type == "execute_result":
            output["execution_count"] = content.get("execution_count")
        display_id = (content.get("transient") or {}).get("display_id")
        block = _Block(output, cost, display_id)
        if display_id:
            self.displays.setdefault(display_id, []).append(block)
        return live + self._place(block, always_live=False)

    def _update_display(self, content: dict[str, Any]) -> list[dict[str, Any]]:
        display_id = (content.get("transient") or {}).get("display_id")
        blocks = self.displays.get(display_id or "", [])
        if not blocks:
            return []
        data = content.get("data") or {}
        self.original_chars += sum(value_size(v) for m, v in data.items() if not is_binary_mime(m))
        capped, cost = self._cap_data(data)
        metadata = content.get("metadata") or {}
        for block in blocks:
            delta = cost - block.cost
            block.output["data"], block.output["metadata"], block.cost = capped, metadata, cost
            if block.side == "head":
                self.head_chars += delta
            elif block.side == "tail":
                self.tail_chars += delta
                self._trim_tail()
        return [{"output_type": "update_display_data", "display_id": display_id, "data": capped, "metadata": metadata}]

    def _error(self, content: dict[str, Any]) -> list[dict[str, Any]]:
        if self.drop_keyboard_interrupt and content.get("ename") == "KeyboardInterrupt":
            return []  # the traceback of our own timeout interrupt is noise, not output
        live = self._before_output() + self._close_line()
        self.line_name = None
        output = capped_error(content, min(_ERROR_FIELD_CHARS, max(self.tail_budget // 4, 200)))
        raw_cost = len(str(content.get("ename", ""))) + len(str(content.get("evalue", "")))
        raw_cost += sum(len(str(line)) for line in content.get("traceback") or [])
        self.original_chars += raw_cost
        cost = len(output["ename"]) + len(output["evalue"]) + sum(len(line) for line in output["traceback"])
        # Errors are always shown live: they are the one output a reader must not miss.
        return live + self._place(_Block(output, cost), always_live=True)

    # -- caps -----------------------------------------------------------------------------------

    def _cap_data(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        kept: dict[str, Any] = {}
        notes: list[str] = []
        text_cost = 0
        for mime, value in data.items():
            size = value_size(value)
            if is_binary_mime(mime) or mime in _TEXTLIKE_BINARY:
                if size <= self.binary_left:
                    kept[mime] = value
                    self.binary_left -= size
                else:
                    notes.append(
                        f"[{mime} output of {size:,} characters omitted: over the "
                        f"{self.display_cap_chars:,}-character display cap for one cell]"
                    )
            else:
                kept[mime] = value
                text_cost += size
        if text_cost > self.tail_budget:
            text_mimes = [m for m in kept if not (is_binary_mime(m) or m in _TEXTLIKE_BINARY)]
            plain = kept.get("text/plain")
            kept = {m: v for m, v in kept.items() if m not in text_mimes}
            preview_chars = min(_PREVIEW_CHARS, self.tail_budget // 2)
            if isinstance(plain, str) and preview_chars > 0:
                kept["text/plain"] = plain[:preview_chars] + "\n"
            notes.append(
                f"[{', '.join(text_mimes)} output of {text_cost:,} characters cut to a preview: over the "
                f"{self.cap_chars:,}-character output cap]"
            )
        if notes:
            self.noted = True
            note = "\n".join(notes)
            plain = kept.get("text/plain")
            kept["text/plain"] = f"{plain}\n{note}" if isinstance(plain, str) and plain else note
        cost = sum(value_size(v) for m, v in kept.items() if not (is_binary_mime(m) or m in _TEXTLIKE_BINARY))
        return kept, cost

    def _place(self, block: _Block, *, always_live: bool) -> list[dict[str, Any]]:
        live: list[dict[str, Any]] = []
        if not self.head_full and block.cost <= self.head_budget - self.head_chars:
            block.side = "head"
            self.head.append(block)
            self.head_chars += block.cost
            return [block.output]
        if not self.head_full:
            self.head_full = True
            live.append(self._notice("stdout"))
        self._push_tail(block)
        if always_live:
            live.append(block.output)
        return live

    def _push_tail(self, item: _Chunk | _Block) -> None:
        if isinstance(item, _Block):
            item.side = "tail"
        self.tail.append(item)
        self.tail_chars += item.cost
        self._trim_tail()

    def _trim_tail(self) -> None:
        excess = self.tail_chars - self.tail_budget
        while excess > 0 and self.tail:
            first = self.tail[0]
            if isinstance(first, _Chunk) and first.cost > excess:
                first.start += excess
                self.tail_chars -= excess
                self._omit(first, excess)
                # Let go of the dropped characters once they are most of the string.
                if first.start > len(first.text) // 2:
                    first.text, first.start = first.text[first.start :], 0
                return
            self.tail.popleft()
            self.tail_chars -= first.cost
            excess -= first.cost
            self._omit(first, first.cost)
            if isinstance(first, _Block):
                first.side = None

    def _omit(self, item: _Chunk | _Block, chars: int) -> None:
        if self.omitted_stream is None:
            self.omitted_stream = item.name if isinstance(item, _Chunk) else "stdout"
        self.omitted_chars += chars

    def _notice(self, name: str) -> dict[str, Any]:
        text = (
            f"\n... [output is over the {self.cap_chars:,}-character cap: the end is shown when the cell "
            "finishes, the middle is left out] ...\n"
        )
        return {"output_type": "stream", "name": name, "text": text}

    # -- result ---------------------------------------------------------------------------------

    def note_lost(self) -> None:
        """Say, at the end of the output, that the kernel dropped messages (its iopub queue overflowed)."""
        self.lost = True
        self._close_line()
        self.line_name = None
        text = "\n... [some output was lost: the cell wrote faster than it could be read] ...\n"
        self._push_tail(_Chunk("stderr", text))

    @property
    def truncated(self) -> bool:
        return bool(self.omitted_chars or self.noted or self.lost)

    def finish(self) -> list[dict[str, Any]]:
        """The kept outputs in order, streams merged, with one marker where text was left out."""
        self._close_line()
        items: list[_Chunk | _Block] = list(self.head)
        if self.omitted_chars:
            items.append(self._marker(f"... [{self.omitted_chars:,} characters omitted] ...\n", self.omitted_stream))
        items.extend(self.tail)
        return self._outputs(items, copy=False)

    def snapshot(self, tail_chars: int) -> list[dict[str, Any]]:
        """What a live view shows now: the head, a marker, the last `tail_chars` of the rest.

        Unlike finish() it changes nothing, and it returns copies, so a view can diff two snapshots.
        """
        rest: list[_Chunk | _Block] = list(self.tail)
        if self.line:
            rest.append(_Chunk(self.line_name or "stdout", self.line))
        shown: deque[_Chunk | _Block] = deque()
        hidden = self.omitted_chars
        name = self.omitted_stream
        room = max(tail_chars, 0)
        while rest:
            item = rest.pop()
            if item.cost <= room:
                shown.appendleft(item)
                room -= item.cost
                continue
            hidden += item.cost + sum(i.cost for i in rest)
            name = name or (item.name if isinstance(item, _Chunk) else "stdout")
            if isinstance(item, _Chunk) and room > 0:
                text = item.value()[-room:]
                cut = text.find("\n") + 1  # start the window at a line start when there is one
                text = text[cut:] if 0 < cut < len(text) else text
                shown.appendleft(_Chunk(item.name, text))
                hidden -= len(text)
            break
        items: list[_Chunk | _Block] = list(self.head)
        if hidden:
            items.append(self._marker(f"... [{hidden:,} characters not shown while the cell runs] ...\n", name))
        items.extend(shown)
        return self._outputs(items, copy=True)

    def _marker(self, text: str, name: str | None) -> _Chunk:
        prev = self.head[-1] if self.head else None
        lead = "\n" if isinstance(prev, _Chunk) and not prev.text.endswith("\n") else ""
        return _Chunk(name or "stdout", lead + text)

    def _outputs(self, items: list[_Chunk | _Block], *, copy: bool) -> list[dict[str, Any]]:
        outputs: list[dict[str, Any]] = []
        parts: list[str] = []
        for item in items:
            if isinstance(item, _Chunk):
                if parts and outputs[-1]["name"] == item.name:
                    parts.append(item.value())
                    continue
                self._close_stream(outputs, parts)
                parts = [item.value()]
                outputs.append({"output_type": "stream", "name": item.name, "text": ""})
            else:
                self._close_stream(outputs, parts)
                parts = []
                outputs.append(dict(item.output) if copy else item.output)
        self._close_stream(outputs, parts)
        return outputs

    @staticmethod
    def _close_stream(outputs: list[dict[str, Any]], parts: list[str]) -> None:
        if parts:
            outputs[-1]["text"] = "".join(parts)


def capped_error(content: dict[str, Any], field_chars: int = _ERROR_FIELD_CHARS) -> dict[str, Any]:
    """An nbformat error output from an error message or reply, with huge fields clipped."""
    return {
        "output_type": "error",
        "ename": clip_text(str(content.get("ename", "")), field_chars),
        "evalue": clip_text(str(content.get("evalue", "")), field_chars),
        "traceback": clip_traceback(list(content.get("traceback") or []), field_chars),
    }
