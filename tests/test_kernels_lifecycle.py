"""KernelPool lifecycles that need a pool of their own: limits, culling, shutdown and exit cleanup."""

import asyncio
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kernels import KernelPool
from kernels.launch import make_runtime_dir
from kernelhelpers import pid_alive

ROOT = Path(__file__).resolve().parent.parent


def wait_gone(pids, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def test_memory_and_cpu_limits_apply_to_the_kernel():
    async def main():
        pool = KernelPool(spare=False, resource_limits={"memory_bytes": 1 << 30, "cpu_seconds": 10})
        try:
            limits = await pool.execute(
                "limited",
                "import resource as r\nprint(r.getrlimit(r.RLIMIT_AS)[0], r.getrlimit(r.RLIMIT_CPU)[0])",
            )
            await pool.execute("limited", "before = 'kept'")
            hog = await pool.execute("limited", "hog = []\nwhile True: hog.append(bytearray(50 * 2**20))")
            after_hog = await pool.execute("limited", "del hog\nprint(before)")
            spin = await pool.execute("limited", "while True: pass", timeout=120)
            state_after_spin = pool.state("limited")
            again = await pool.execute("limited", "print('fresh')")
            return limits, hog, after_hog, spin, state_after_spin, again, pool.info("limited")
        finally:
            await pool.shutdown_all()

    limits, hog, after_hog, spin, state_after_spin, again, info = asyncio.run(main())
    assert limits.stdout == f"{1 << 30} 10\n"
    # Under RLIMIT_AS CPython turns exhaustion into a MemoryError; the kernel and its variables survive.
    assert hog.status == "error" and hog.error["ename"] == "MemoryError"
    assert after_hog.stdout == "kept\n"
    assert spin.status == "died" and "SIGXCPU" in spin.message and "CPU-time limit" in spin.message
    assert state_after_spin == "dead"
    assert again.stdout == "fresh\n" and info["kernels_assigned"] == 2 and info["resource_limits"]["cpu_seconds"] == 10


def test_idle_kernels_are_culled_and_come_back_on_the_next_run():
    async def main():
        pool = KernelPool(spare=False, cull_idle_s=1.0)
        try:
            await pool.execute("sleepy", "value = 1")
            pid = pool.info("sleepy")["pid"]
            for _ in range(200):
                if pool.state("sleepy") == "none":
                    break
                await asyncio.sleep(0.05)
            culled_state = pool.state("sleepy")
            again = await pool.execute("sleepy", "value")
            return pid, culled_state, again, pool.info("sleepy")
        finally:
            await pool.shutdown_all()

    pid, culled_state, again, info = asyncio.run(main())
    assert culled_state == "none" and not pid_alive(pid)
    assert again.status == "error" and again.error["ename"] == "NameError"  # a fresh kernel
    assert info["pid"] != pid and info["kernels_assigned"] == 2


def test_shutdown_all_leaves_no_processes_and_no_runtime_dir():
    async def main():
        pool = KernelPool(spare=True)
        await pool.start()
        child = await pool.execute("one", "import subprocess\np = subprocess.Popen(['sleep', '300'])\nprint(p.pid)")
        await pool.ensure("two")
        await pool.start()  # waits for the refilled spare
        running = asyncio.create_task(pool.execute("two", "import time\ntime.sleep(60)"))
        while pool.state("two") != "busy":
            await asyncio.sleep(0.02)
        pids = pool.pids()
        runtime = Path(pool.info("one")["connection_file"]).parent
        files_before = sorted(p.name for p in runtime.iterdir())
        await pool.shutdown_all()
        return int(child.stdout), pids, runtime, files_before, pool.pids(), pool.state("one"), await running

    child_pid, pids, runtime, files_before, pids_after, state, cut_short = asyncio.run(main())
    assert cut_short.status == "interrupted" and "shut down" in cut_short.message
    assert len(pids) == 3  # two keys and the spare
    assert any(name.endswith(".json") for name in files_before)
    assert wait_gone(pids + [child_pid]) == []
    assert not runtime.exists() and pids_after == [] and state == "none"


def test_kernels_do_not_outlive_an_app_that_exits_without_shutdown(tmp_path):
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from kernels import KernelPool

        async def main():
            pool = KernelPool(spare=True)
            await pool.start()
            await pool.ensure("a")
            await pool.start()  # the refilled spare
            print(*pool.pids(), flush=True)
            print(pool.info("a")["connection_file"], flush=True)

        asyncio.run(main())  # no shutdown_all: the atexit hook must clean up
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    pids_line, conn = out.stdout.strip().splitlines()
    pids = [int(p) for p in pids_line.split()]
    assert len(pids) == 2
    assert wait_gone(pids) == []
    assert not Path(conn).parent.exists()


def test_kernels_and_folders_of_a_killed_app_are_cleaned_up():
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from kernels import KernelPool

        async def main():
            pool = KernelPool(spare=False)
            await pool.ensure("a")
            print(pool.info("a")["pid"], pool.info("a")["connection_file"], flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no shutdown_all

        asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9
    pid, conn = out.stdout.split()
    assert wait_gone([int(pid)], timeout=15) == []  # ipykernel exits when its parent dies
    runtime = Path(conn).parent
    assert runtime.exists()
    fresh, created = make_runtime_dir()  # the next app sweeps folders whose owner is gone
    try:
        assert created and not runtime.exists()
    finally:
        shutil.rmtree(fresh)
