"""Kernels through the real app: private IPC connections, every way a kernel dies, runaway output, culling."""

import json
import os
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from apphelpers import Server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("kernels"), "--exec-timeout", "60", "--output-cap", "20000",
               "--kernel-memory", "1G", "--model", "/no/model/for/these/tests.gguf").start()
    yield s
    s.stop()


@pytest.fixture
def c(srv):
    with srv.client() as client:
        yield client


def dialog(c, title="k"):
    return c.post("/api/dialogs", json={"title": title}).json()["id"]


def cell(c, did, source, type="code"):
    return c.post(f"/api/dialogs/{did}/messages", json={"type": type, "source": source}).json()["id"]


def run(c, mid):
    r = c.post(f"/api/messages/{mid}/run")
    assert r.status_code == 200, r.text
    return r.json()


def stdout(res):
    return "".join(o.get("text", "") for o in res["outputs"] if o["output_type"] == "stream")


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def tcp_listeners() -> dict[str, tuple[str, int]]:
    """Listening TCP sockets of this machine: inode -> (address, port)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                host, port = fields[1].split(":")
                if len(host) == 8:
                    host = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out[fields[9]] = (host, int(port, 16))
    return out


def test_connection_files_are_private_and_ipc(c):
    did = dialog(c)
    assert run(c, cell(c, did, "x = 1"))["status"] == "ok"
    info = c.get(f"/api/dialogs/{did}/kernel").json()["info"]
    assert info["transport"] == "ipc" and info["resource_limits"] == {"memory_bytes": 1 << 30}
    conn = Path(info["connection_file"])
    runtime = conn.parent
    st = conn.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    # 0700 (plus the sticky bit jupyter_client sets so tmp cleaners leave it alone)
    assert runtime.stat().st_mode & 0o777 == 0o700 and runtime.stat().st_uid == os.getuid()
    spec = json.loads(conn.read_text())
    assert spec["transport"] == "ipc" and spec["key"]
    # IPC endpoints are files in the private folder: "<ip>-<port>" for each channel.
    assert Path(spec["ip"]).parent == runtime
    for channel in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        endpoint = Path(f"{spec['ip']}-{spec[channel]}")
        assert endpoint.exists() and stat.S_ISSOCK(endpoint.stat().st_mode), endpoint
    # The one TCP socket the kernel listens on is ipykernel's own pipe for output from forked subprocesses:
    # on 127.0.0.1 only, and it drops every message that lacks the kernel's random 16-byte key.
    pipe = run(c, cell(c, did, "import sys\nprint(sys.stdout.pub_thread._pipe_port)"))
    listening = tcp_listeners()
    ours = [addr for inode, addr in listening.items() if inode in socket_inodes(info["pid"])]
    assert ours == [("127.0.0.1", int(stdout(pipe)))]


CRASHES = {
    "os._exit": "import os\nos._exit(3)",
    "SIGKILL": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    # Native code that trusts malloc, under --kernel-memory: it takes 64 MiB blocks (touching them) until the
    # address-space limit says no, then writes through the NULL it got back.
    "memory": ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.malloc.restype = ctypes.c_void_p\n"
               "libc.malloc.argtypes = [ctypes.c_size_t]\nblocks = []\n"
               "while (p := libc.malloc(64 << 20)):\n    ctypes.memset(p, 1, 64 << 20)\n    blocks.append(p)\n"
               "print(f'{len(blocks) * 64} MiB before the limit', flush=True)\n"
               "import time; time.sleep(0.5)  # let the kernel's output thread send that line first\n"
               "ctypes.memset(p, 1, 64 << 20)\n"),
}
WHY = {"os._exit": "exit code 3", "SIGKILL": "SIGKILL", "segfault": "SIGSEGV", "memory": "SIGSEGV"}


@pytest.mark.parametrize("how", list(CRASHES))
def test_a_dying_kernel_is_detected_reported_and_replaced(c, how):
    did = dialog(c, f"dies by {how}")
    note = cell(c, did, "# notes survive", type="note")
    kept = cell(c, did, "kept = 41\nprint(kept)")
    assert run(c, kept)["status"] == "ok"
    pid = c.get(f"/api/dialogs/{did}/kernel").json()["info"]["pid"]
    before = {m["id"]: m for m in c.get(f"/api/dialogs/{did}").json()["messages"]}
    crash = cell(c, did, CRASHES[how])

    res = run(c, crash)
    # "died", not "timeout": the pool saw the death itself, long before the 60 s limit (how soon: bench_kernels.py).
    assert res["status"] == "died", res
    assert "kernel died" in res["message"] and WHY[how] in res["message"] and "restart" in res["message"]
    if how == "memory":
        assert "MiB before the limit" in stdout(res)  # it really filled the limit, then crashed
    assert c.get(f"/api/dialogs/{did}/kernel").json()["state"] in ("none", "dead")
    # The user is told on the page too.
    stored = c.get(f"/api/messages/{crash}").json()
    assert stored["output_meta"]["status"] == "died"
    assert "The kernel died" in c.get(f"/d/{did}").text
    # The dialog is unchanged: every other cell as it was, outputs and versions included.
    after = {m["id"]: m for m in c.get(f"/api/dialogs/{did}").json()["messages"]}
    assert {k: v for k, v in after.items() if k != crash} == before
    # The next run gets a fresh kernel: new process, no old variables.
    fresh = run(c, cell(c, did, "print('fresh', 'kept' in dir())"))
    assert fresh["status"] == "ok" and stdout(fresh) == "fresh False\n"
    info = c.get(f"/api/dialogs/{did}/kernel").json()["info"]
    assert info["pid"] != pid and info["kernels_assigned"] == 2
    assert note in after


def test_memory_exhaustion_in_python_is_a_memory_error_and_the_kernel_lives(c):
    did = dialog(c, "python hog")
    assert run(c, cell(c, did, "kept = 'still here'"))["status"] == "ok"
    res = run(c, cell(c, did, "hog = [bytearray(64 << 20) for _ in range(10**6)]"))
    assert res["status"] == "error" and res["outputs"][-1]["ename"] == "MemoryError"
    after = run(c, cell(c, did, "print(kept)"))
    assert after["status"] == "ok" and stdout(after) == "still here\n"


def test_runaway_output_is_capped_and_the_server_stays_responsive(c, srv):
    did = dialog(c, "flood")
    mid = cell(c, did, "import sys\nfor _ in range(100):\n    sys.stdout.write('line\\n' * 10**5)")  # 10^7 lines
    result = {}
    runner = threading.Thread(target=lambda: result.update(run(c, mid)))
    runner.start()
    answered_during_run = 0
    with httpx.Client(base_url=srv.base, headers=srv.headers, timeout=30) as other:
        while runner.is_alive():
            r = other.get(f"/api/dialogs/{did}")
            assert r.status_code == 200
            if runner.is_alive():
                answered_during_run += 1
                assert other.get("/").status_code == 200
            time.sleep(0.05)
    runner.join()
    assert answered_during_run >= 1
    assert result["status"] == "ok" and result["truncated"]
    text = stdout(result)
    assert len(text) <= 25_000 and text.startswith("line\n") and text.endswith("line\n")
    meta = c.get(f"/api/messages/{mid}").json()["output_meta"]
    assert meta["truncated"] and meta["original_chars"] == 5 * 10**7
    assert "Output capped" in c.get(f"/d/{did}").text


@pytest.mark.slow
def test_ten_million_prints_are_capped(tmp_path):
    """One print per line: 10^7 small writes (about a minute of kernel time here). No --kernel-memory: the
    kernel's own output buffers grow while it prints faster than it sends, past a 1 GiB address space."""
    s = Server(tmp_path / "prints", "--exec-timeout", "600", "--output-cap", "20000", "--model", "/no/model.gguf")
    s.start()
    try:
        with s.client(timeout=600) as c:
            mid = cell(c, dialog(c, "print flood"), "for i in range(10**7):\n    print(i)")
            res = run(c, mid)
            assert res["status"] == "ok" and res["truncated"] and len(stdout(res)) <= 25_000
            assert c.get("/api/dialogs").status_code == 200
    finally:
        s.stop()


def test_idle_kernels_are_culled_and_restart_on_next_use(tmp_path):
    s = Server(tmp_path / "cull", "--cull-idle", "2", "--model", "/no/model.gguf").start()
    try:
        with s.client() as c:
            did = dialog(c, "sleepy")
            assert run(c, cell(c, did, "value = 1"))["status"] == "ok"
            pid = c.get(f"/api/dialogs/{did}/kernel").json()["info"]["pid"]
            state = None
            for _ in range(300):
                state = c.get(f"/api/dialogs/{did}/kernel").json()["state"]
                if state == "none":
                    break
                time.sleep(0.1)
            assert state == "none"
            for _ in range(200):  # a culled kernel is asked to exit, and killed 2 s later if it does not
                if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"the culled kernel {pid} is still running")
            again = run(c, cell(c, did, "print('value' in dir())"))
            assert again["status"] == "ok" and stdout(again) == "False\n"
            info = c.get(f"/api/dialogs/{did}/kernel").json()["info"]
            assert info["kernels_assigned"] == 2 and info["pid"] != pid
    finally:
        s.stop()
