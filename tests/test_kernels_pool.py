"""KernelPool against real ipykernels, sharing one pool (and one event loop) across the module."""

import asyncio
import base64
import os
import signal
import stat
import struct
import zlib

import nbformat
import pytest

from kernels import ExecResult, KernelInitError, KernelPool
from kernelhelpers import LoopSession, pid_alive


def png_bytes():
    """A valid 1x1 PNG built by hand, so the test needs no imaging library."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0\xff\0\0")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def lp():
    session = LoopSession()
    session.pool = KernelPool(interrupt_grace_s=2.0)
    session.run(session.pool.start())
    session.ex = lambda key, code, **kw: session.run(session.pool.execute(key, code, **kw))
    yield session
    session.run(session.pool.shutdown_all())
    session.runner.close()


def text_result(res):
    return [o["data"]["text/plain"] for o in res.outputs if o["output_type"] == "execute_result"]


def test_print_gives_one_stdout_stream(lp):
    res = lp.ex("basic", "print(6*7)")
    assert isinstance(res, ExecResult)
    assert res.status == "ok" and res.error is None and res.message is None
    assert res.outputs == [{"output_type": "stream", "name": "stdout", "text": "42\n"}]
    assert isinstance(res.execution_count, int) and not res.truncated and res.original_chars == 3


def test_expression_and_error_with_ansi_traceback(lp):
    assert text_result(lp.ex("basic", "1+1")) == ["2"]
    res = lp.ex("basic", "1/0")
    assert res.status == "error"
    assert res.error["ename"] == "ZeroDivisionError" and "division by zero" in res.error["evalue"]
    assert any("ZeroDivisionError" in line for line in res.error["traceback"])
    assert any("\x1b[" in line for line in res.error["traceback"])  # colours are kept for consumers to strip
    assert res.outputs[-1]["output_type"] == "error" and res.outputs[-1]["ename"] == "ZeroDivisionError"


def test_image_and_html_display_are_valid_nbformat(lp):
    png = png_bytes()
    code = (
        "from IPython.display import Image, HTML, display\n"
        f"import base64\ndisplay(Image(data=base64.b64decode({base64.b64encode(png).decode()!r})))\n"
        "display(HTML('<b>bold</b>'))\nprint('done')"
    )
    res = lp.ex("basic", code)
    assert res.status == "ok"
    image, html, text = res.outputs
    assert image["output_type"] == "display_data" and base64.b64decode(image["data"]["image/png"]) == png
    assert html["data"]["text/html"] == "<b>bold</b>"
    assert text == {"output_type": "stream", "name": "stdout", "text": "done\n"}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=res.outputs, execution_count=1)])
    nbformat.validate(nb)


def test_big_display_is_replaced_by_a_note(lp):
    code = "from IPython.display import display\ndisplay({'image/png': 'A' * 20_000_000, 'text/plain': 'x'}, raw=True)"
    res = lp.ex("basic", code)
    (out,) = res.outputs
    assert "image/png" not in out["data"] and "20,000,000 characters omitted" in out["data"]["text/plain"]
    assert res.truncated


def test_timeout_interrupts_and_the_kernel_keeps_state(lp):
    lp.ex("basic", "kept = 41")
    pid = lp.pool.info("basic")["pid"]
    res = lp.ex("basic", "print('spinning')\nwhile True: pass", timeout=1)
    assert res.status == "timeout" and "time limit" in res.message
    assert res.outputs == [{"output_type": "stream", "name": "stdout", "text": "spinning\n"}]
    assert text_result(lp.ex("basic", "kept + 1")) == ["42"]
    assert lp.pool.info("basic")["pid"] == pid and lp.pool.state("basic") == "idle"


def test_a_cell_that_ignores_the_interrupt_is_stopped_at_the_timeout(lp):
    lp.ex("stubborn", "lost = 1")
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    res = lp.ex("stubborn", code, timeout=1)
    assert res.status == "timeout" and "did not stop when interrupted" in res.message
    assert lp.pool.state("stubborn") == "dead"
    assert lp.ex("stubborn", "lost").error["ename"] == "NameError"


def test_live_outputs_reach_the_callback(lp):
    seen = []

    async def on_output(output):
        seen.append(output)

    res = lp.ex("basic", "import time\nprint(1)\ntime.sleep(0.3)\nprint(2)\n3", on_output=on_output)
    assert [o.get("text") for o in seen if o["output_type"] == "stream"] == ["1\n", "2\n"]
    assert seen[-1]["output_type"] == "execute_result"
    assert res.outputs[0]["text"] == "1\n2\n"


DEATHS = {
    "exit": ("import os; os._exit(1)", "exit code 1)"),
    "sigkill": ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "exit code -9, SIGKILL"),
    "segfault": ("import ctypes; ctypes.string_at(0)", "exit code -11, SIGSEGV"),
}


@pytest.mark.parametrize("how", sorted(DEATHS))
def test_death_is_reported_and_the_next_run_gets_a_fresh_kernel(lp, how):
    code, expected = DEATHS[how]
    lp.run(lp.pool.ensure("mortal", init_code="marker = 'init ran'"))
    lp.ex("mortal", "doomed = 1")
    old = lp.pool.info("mortal")
    res = lp.ex("mortal", code, timeout=60)
    assert res.status == "died" and expected in res.message and "restart on the next run" in res.message
    assert res.execution_count is None
    assert lp.pool.state("mortal") == "dead" and not pid_alive(old["pid"])
    assert lp.ex("mortal", "doomed").error["ename"] == "NameError"
    assert lp.ex("mortal", "print(marker)").stdout == "init ran\n"
    new = lp.pool.info("mortal")
    assert new["pid"] != old["pid"] and new["kernels_assigned"] == old["kernels_assigned"] + 1


def test_death_while_idle_is_noticed(lp):
    lp.run(lp.pool.ensure("idle-death"))
    pid = lp.pool.info("idle-death")["pid"]
    os.kill(pid, signal.SIGKILL)
    assert lp.wait_until(lambda: lp.pool.state("idle-death") == "dead")
    assert lp.pool.info("idle-death")["exit_code"] == -9
    assert text_result(lp.ex("idle-death", "40 + 2")) == ["42"]


def test_ten_megabyte_print_is_capped(lp):
    res = lp.ex("basic", "print('x' * 10_000_000)")
    assert res.status == "ok" and res.truncated and res.original_chars == 10_000_001
    (out,) = res.outputs
    assert out["text"].startswith("x" * 100_000) and out["text"].endswith("x" * 99_999 + "\n")
    assert "\n... [9,800,001 characters omitted] ...\n" in out["text"]
    assert len(out["text"]) < 200_100


def test_a_million_printed_lines_are_capped(lp):
    res = lp.ex("basic", "for i in range(10**6): print(i)", timeout=300)
    assert res.status == "ok" and res.truncated
    assert res.original_chars == sum(len(str(i)) + 1 for i in range(10**6))
    text = res.stdout
    assert text.startswith("0\n1\n2\n") and text.endswith("999998\n999999\n")
    assert "characters omitted] ..." in text and len(text) < 200_100


def test_non_utf8_bytes_on_fd1(lp):
    # ipykernel forwards fd-level output from a pipe thread: the pause lets it arrive within the cell.
    res = lp.ex("basic", "import os, time\nos.write(1, b'\\xff\\xfe raw\\n')\ntime.sleep(0.5)\nprint('after')")
    assert res.status == "ok"
    assert res.stdout == "\ufffd\ufffd raw\nafter\n"
    assert lp.ex("basic", "print('still fine')").stdout == "still fine\n"


def test_empty_code(lp):
    for code in ("", "   \n"):
        res = lp.ex("basic", code)
        assert res.status == "ok" and res.outputs == [] and res.error is None


def test_interrupt_a_running_cell(lp):
    lp.ex("basic", "survivor = 'yes'")

    async def run_and_interrupt():
        task = asyncio.create_task(lp.pool.execute("basic", "import time\nfor _ in range(600): time.sleep(0.1)"))
        while lp.pool.state("basic") != "busy":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert await lp.pool.interrupt("basic")
        return await task

    res = lp.run(run_and_interrupt())
    assert res.status == "interrupted" and res.error["ename"] == "KeyboardInterrupt"
    assert lp.pool.state("basic") == "idle" and lp.ex("basic", "print(survivor)").stdout == "yes\n"


def test_restart_loses_state_and_reruns_init(lp):
    lp.run(lp.pool.ensure("restarted", init_code="from math import tau"))
    lp.ex("restarted", "gone = 1")
    pid = lp.pool.info("restarted")["pid"]
    lp.run(lp.pool.restart("restarted"))
    assert lp.pool.state("restarted") == "idle" and lp.pool.info("restarted")["pid"] != pid
    assert lp.ex("restarted", "gone").error["ename"] == "NameError"
    assert text_result(lp.ex("restarted", "round(tau, 2)")) == ["6.28"]


def test_restart_while_a_cell_runs_reports_interrupted(lp):
    async def run_and_restart():
        task = asyncio.create_task(lp.pool.execute("restarted", "import time\ntime.sleep(60)"))
        while lp.pool.state("restarted") != "busy":
            await asyncio.sleep(0.02)
        await lp.pool.restart("restarted")
        return await task

    res = lp.run(run_and_restart())
    assert res.status == "interrupted" and "restarted" in res.message
    assert lp.pool.state("restarted") == "idle"
    assert text_result(lp.ex("restarted", "round(tau, 1)")) == ["6.3"]


def test_two_keys_run_in_parallel_and_stay_isolated(lp, tmp_path):
    # Each cell waits for a file the other one writes: both finish only if they really run at once.
    def cell(me, other):
        return (
            f"import pathlib, time\nwho = {me!r}\npathlib.Path({str(tmp_path / me)!r}).touch()\n"
            f"while not pathlib.Path({str(tmp_path / other)!r}).exists(): time.sleep(0.02)\nwho"
        )

    async def both():
        await asyncio.gather(lp.pool.ensure("left"), lp.pool.ensure("right"))
        return await asyncio.gather(
            lp.pool.execute("left", cell("left", "right"), timeout=60),
            lp.pool.execute("right", cell("right", "left"), timeout=60),
        )

    left, right = lp.run(both())
    assert text_result(left) == ["'left'"] and text_result(right) == ["'right'"]
    assert text_result(lp.ex("left", "who")) == ["'left'"] and text_result(lp.ex("right", "who")) == ["'right'"]
    assert lp.pool.info("left")["pid"] != lp.pool.info("right")["pid"]


def test_a_new_key_takes_the_warm_spare_with_its_cwd_and_env(lp, tmp_path):
    lp.run(lp.pool.start())  # waits until the spare answers
    spare_pids = set(lp.pool.pids()) - {lp.pool.info(k)["pid"] for k in lp.pool.keys()}
    assert len(spare_pids) == 1
    init = "import os\nseen = os.getcwd()"
    lp.run(lp.pool.ensure("fresh", cwd=tmp_path, env={"LOOPBOOK_TEST": "yes"}, init_code=init))
    info = lp.pool.info("fresh")
    assert info["from_spare"] and info["pid"] in spare_pids and info["transport"] == "ipc"
    res = lp.ex("fresh", "print(os.getcwd(), os.environ['LOOPBOOK_TEST'], seen)")
    assert res.stdout == f"{tmp_path} yes {tmp_path}\n"
    assert lp.pool.info("fresh")["executions"] == 1
    conn = info["connection_file"]
    assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(conn)).st_mode) & 0o777 == 0o700  # jupyter adds the sticky bit


def test_init_code_failure_is_reported_and_fixable(lp):
    with pytest.raises(KernelInitError, match="NameError"):
        lp.run(lp.pool.ensure("broken-init", init_code="undefined_name"))
    res = lp.ex("broken-init", "print('never')")
    assert res.status == "error" and "init_code" in res.message and res.error["ename"] == "NameError"
    lp.run(lp.pool.ensure("broken-init", init_code="fixed = True"))
    assert text_result(lp.ex("broken-init", "fixed")) == ["True"]


def test_bad_input_gets_clear_errors(lp, tmp_path):
    with pytest.raises(ValueError, match="non-empty string"):
        lp.ex("", "1")
    with pytest.raises(TypeError, match="code must be a str"):
        lp.ex("basic", b"1")
    with pytest.raises(ValueError, match="positive number of seconds"):
        lp.ex("basic", "1", timeout=-1)
    with pytest.raises(ValueError, match="create it first"):
        lp.run(lp.pool.ensure("basic", cwd=tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown keys"):
        KernelPool(resource_limits={"memory": 1})
    assert lp.pool.state("never-used") == "none" and lp.pool.info("never-used")["pid"] is None
