"""Completion and help from a real kernel: complete_request, inspect_request, and the busy, dead and no-kernel answers."""

import asyncio
import os
import signal

import pytest

from kernels import KernelPool
from kernels.introspect import parse_sections, strip_ansi
from kernelhelpers import LoopSession


@pytest.fixture(scope="module")
def lp():
    session = LoopSession()
    session.pool = KernelPool(spare=False, interrupt_grace_s=2.0)
    session.run(session.pool.start())
    res = session.run(session.pool.execute("help", "import collections; d = {'alpha': 1}\n"
                                           "def area(w: float, h: float = 1.0) -> float:\n"
                                           "    '''Area of a w by h rectangle.'''\n    return w * h\n"))
    assert res.status == "ok"
    yield session
    session.run(session.pool.shutdown_all())
    session.runner.close()


def complete(lp, code, pos=None, key="help", **kw):
    return lp.run(lp.pool.complete(key, code, pos, timeout=kw.pop("timeout", 10.0), **kw))


def test_completes_dict_keys_attributes_and_methods(lp):
    c = complete(lp, "d[")
    assert c.status == "ok" and c.matches == ["'alpha'"] and (c.cursor_start, c.cursor_end) == (2, 2)
    c = complete(lp, "collections.Ord")
    assert c.matches == ["OrderedDict"] and (c.cursor_start, c.cursor_end) == (12, 15)
    c = complete(lp, "str.sp")
    assert {"split", "splitlines"} <= set(c.matches) and c.cursor_start == 4


def test_completion_types_come_from_the_kernels_metadata(lp):
    c = complete(lp, "collections.Ord")
    assert c.items == [{"text": "OrderedDict", "type": "class", "start": 12, "end": 15, "signature": None}]
    c = complete(lp, "str.sp")
    split = next(i for i in c.items if i["text"] == "split")
    assert split["type"] == "function" and "sep" in split["signature"]
    assert complete(lp, "d[").items[0]["type"] == "dict key"
    assert c.to_dict()["matches"] == c.matches


def test_completion_at_a_cursor_inside_the_code(lp):
    code = "x = str.sp + 1"
    c = complete(lp, code, code.index(" + "))
    assert {"split", "splitlines"} <= set(c.matches) and (c.cursor_start, c.cursor_end) == (8, 10)


def test_inspect_gives_signature_and_docstring_without_ansi(lp):
    h = lp.run(lp.pool.inspect("help", "len", 3, timeout=10.0))
    assert h.status == "ok" and h.found and "\x1b" not in h.text
    assert h.signature == "len(obj, /)" and h.docstring.startswith("Return the number of items")
    h = lp.run(lp.pool.inspect("help", "area(", 4, timeout=10.0))  # the call being written
    assert h.signature == "area(w: float, h: float = 1.0) -> float" and h.docstring == "Area of a w by h rectangle."
    h = lp.run(lp.pool.inspect("help", "area", 4, detail_level=1, timeout=10.0))
    assert "return w * h" in h.sections["Source"]


def test_inspect_of_an_unknown_name_says_so(lp):
    h = lp.run(lp.pool.inspect("help", "no_such_name_here", 5, timeout=10.0))
    assert h.status == "ok" and not h.found and h.message


def test_a_running_cell_gets_a_busy_answer_at_once(lp):
    async def scenario():
        cell = asyncio.create_task(lp.pool.execute("help", "import time; time.sleep(3)"))
        while lp.pool.state("help") != "busy":
            await asyncio.sleep(0.01)
        answers = [await lp.pool.complete("help", "str.sp"), await lp.pool.inspect("help", "len", 3)]
        still_running = not cell.done()
        await cell
        return answers, still_running

    (c, h), still_running = lp.run(scenario())
    assert still_running  # both answers came back while the cell still ran
    assert c.status == "busy" and c.matches == [] and "running a cell" in c.message
    assert h.status == "busy" and not h.found
    assert complete(lp, "collections.Ord").matches == ["OrderedDict"]  # and it answers again afterwards


def test_a_kernel_busy_behind_our_back_times_out_and_late_replies_are_dropped(lp):
    # An execute sent on the request channel itself: the kernel reads one socket in order, so the
    # completion queues behind it, and the pool does not know the kernel is busy.
    kernel = lp.pool._slots["help"].kernel
    sleep = {"code": "import time; time.sleep(2)", "silent": True, "store_history": False,
             "user_expressions": {}, "allow_stdin": False, "stop_on_error": False}
    assert lp.run(kernel.request("execute_request", sleep, 0.2)) is None
    c = complete(lp, "str.sp", timeout=0.5)  # had it waited for the reply, the status would be "ok"
    assert c.status == "timeout" and "did not answer within 0.5 s" in c.message
    assert lp.wait_until(lambda: complete(lp, "d[", timeout=5.0).status == "ok")
    assert complete(lp, "collections.Ord").matches == ["OrderedDict"]  # not a stale str.sp reply
    assert lp.run(lp.pool.execute("help", "40 + 2")).outputs[0]["data"]["text/plain"] == "42"


def test_a_dead_kernel_gives_a_clear_error(lp):
    lp.run(lp.pool.execute("doomed", "x = 1"))
    os.kill(lp.pool.info("doomed")["pid"], signal.SIGKILL)
    assert lp.wait_until(lambda: lp.pool.state("doomed") == "dead")
    c = complete(lp, "str.sp", key="doomed")
    assert c.status == "dead" and "died" in c.message and "SIGKILL" in c.message
    h = lp.run(lp.pool.inspect("doomed", "len", 3))
    assert h.status == "dead" and "died" in h.message


def test_no_kernel_yet_is_not_started_by_completion(lp):
    c = complete(lp, "str.sp", key="never-ran")
    assert c.status == "none" and "run a cell" in c.message
    assert lp.pool.state("never-ran") == "none"


def test_bad_requests_raise_clear_errors(lp):
    with pytest.raises(ValueError, match="cursor_pos"):
        complete(lp, "abc", 4)
    with pytest.raises(TypeError, match="code must be a str"):
        complete(lp, b"abc")
    with pytest.raises(ValueError, match="detail_level"):
        lp.run(lp.pool.inspect("help", "len", 3, detail_level=2))


def test_ansi_stripping_and_section_parsing():
    assert strip_ansi("\x1b[31mSignature:\x1b[39m f(x)\x1b]8;;http://x\x07link\x1b]8;;\x07") == "Signature: f(x)link"
    text = "Signature: f(x)\nDocstring:\nFirst line.\n\nMore.\nType:      function"
    assert parse_sections(text) == {"Signature": "f(x)", "Docstring": "First line.\n\nMore.", "Type": "function"}
