"""The hardware decisions: GPU offload (with given VRAM figures), CPU threads, and this machine's choice."""
from __future__ import annotations

from pathlib import Path

import pytest

from local_model.gguf import read_metadata
from local_model.gpu import COMPUTE_MARGIN, GiB, choose, layer_sizes, plan_offload
from local_model.registry import resolve
from local_model.threads import (adaptive, choose_threads, own_running, physical_cores, runnable_elsewhere,
                                 threads_now)
from parts import assert_offload_matches_the_machine

MiB = 1 << 20


def test_cpu_build_never_offloads():
    p = plan_offload(n_layers=28, layer_bytes=40 * MiB, supported=False, free_bytes=80 * GiB)
    assert p.n_gpu_layers == 0 and p.reason == "CPU (llama.cpp built without GPU offload)"


def test_enough_vram_offloads_everything_with_flash_attention():
    p = plan_offload(n_layers=28, layer_bytes=40 * MiB, kv_layer_bytes=4 * MiB, supported=True,
                     free_bytes=24 * GiB, device="RTX 4090")
    assert p.n_gpu_layers == -1 and p.flash_attn is True
    assert "all 29 layers" in p.reason and "RTX 4090" in p.reason and "flash attention on" in p.reason


def test_short_vram_offloads_what_fits():
    free = COMPUTE_MARGIN + 10 * (100 * MiB)  # room for exactly ten 100 MiB layers
    p = plan_offload(n_layers=32, layer_bytes=96 * MiB, kv_layer_bytes=4 * MiB, supported=True, free_bytes=free)
    assert p.n_gpu_layers == 10 and p.flash_attn is True
    assert "10 of 33 layers" in p.reason and "rest on CPU" in p.reason


def test_too_little_vram_stays_on_cpu():
    p = plan_offload(n_layers=32, layer_bytes=200 * MiB, supported=True, free_bytes=COMPUTE_MARGIN + 50 * MiB)
    assert p.n_gpu_layers == 0 and p.flash_attn is False and p.reason.startswith("CPU")


def test_unknown_vram_offloads_all_and_explicit_choices_win():
    assert plan_offload(n_layers=10, layer_bytes=MiB, supported=True).n_gpu_layers == -1
    p = plan_offload(n_layers=10, layer_bytes=MiB, supported=True, n_gpu_layers=4, flash_attn=False, free_bytes=GiB)
    assert (p.n_gpu_layers, p.flash_attn) == (4, False) and "as asked" in p.reason


def test_layer_sizes_from_the_real_gguf(tmp_path):
    path = resolve("smollm2-135m", tmp_path).path
    meta = read_metadata(path)
    n_layers, per_layer, kv = layer_sizes(meta, path.stat().st_size, n_ctx=4096)
    assert n_layers == 30
    assert per_layer == path.stat().st_size // 31
    assert kv == 2 * 3 * 64 * 2 * 4096  # K and V, 3 KV heads of 64, f16


def test_this_machine_says_what_it_chose(tmp_path):
    path = resolve("smollm2-135m", tmp_path).path
    plan = choose(read_metadata(path), path.stat().st_size, 4096)
    # A GPU build that sees a device offloads (SmolLM2 fits any GPU); a CPU-only build offloads nothing.
    assert_offload_matches_the_machine(plan.n_gpu_layers, plan.reason)


def test_threads_are_one_per_physical_core_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("LOOPBOOK_THREADS", raising=False)
    monkeypatch.delenv("LOOPBOOK_THREADS_BATCH", raising=False)
    # A 4-core CPU with two hyperthreads per core, as sysfs lays it out.
    for cpu in range(8):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    assert physical_cores(set(range(8)), tmp_path) == 4
    assert physical_cores({0, 4}, tmp_path) == 1  # pinned to one core's two siblings
    assert physical_cores({0, 1}, tmp_path / "none") == 2  # no topology: each CPU counts
    assert choose_threads(cores=2)[:2] == (2, 2)  # a 2-vCPU VM decodes with both when nothing else runs
    assert threads_now(2, busy=0) == 2 and threads_now(2, busy=1) == 1 and threads_now(8, busy=20) == 1
    assert adaptive() and not adaptive(n_threads=2)
    assert choose_threads(n_threads=3, n_threads_batch=5, cores=8)[:2] == (3, 5)
    monkeypatch.setenv("LOOPBOOK_THREADS", "1")
    decode, prompt, why = choose_threads(cores=4)
    assert (decode, prompt) == (1, 4) and "as asked" in why
    monkeypatch.setenv("LOOPBOOK_THREADS", "lots")
    with pytest.raises(ValueError, match="LOOPBOOK_THREADS='lots'"):
        choose_threads(cores=4)

def test_what_runs_elsewhere_is_read_now_from_the_kernel(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n")
    tasks = tmp_path / "task"
    for tid, state in ((10, "R"), (11, "S"), (12, "R"), (13, "D")):  # this process: 2 threads running
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (python (worker)) {state} 1 2 3\n")
    assert own_running(tasks) == 2  # a name with spaces and parentheses is read past its last ")"
    assert runnable_elsewhere(stat, tasks=tasks) == 2  # the asking thread and its sibling are not competition
    assert runnable_elsewhere(stat, tasks=tmp_path / "none") == 3  # unreadable: only the asking one counts
    assert runnable_elsewhere(tmp_path / "missing") == 0
    assert runnable_elsewhere() >= 0  # this machine's own /proc/stat

