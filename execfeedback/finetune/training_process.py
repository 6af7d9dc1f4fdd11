"""Fine-tuning runs in a process of its own, where Hugging Face's `kernels` package owns that name.

Our top-level `kernels/` (the Jupyter kernels) shares its name with Hugging Face's `kernels`, which
transformers imports at start-up. Python has one `sys.modules["kernels"]` per process, so no path order
can please both: the app and the tests load ours, and only the training process loads transformers.
`use_hf_kernels()` binds the name to Hugging Face's package there (or to nothing, when it is not
installed), whatever `sys.path` says; `run_own_process()` is how any other process starts a training run.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "kernels"


class TrainingProcessError(RuntimeError):
    """Hugging Face's stack was asked for in a process that already holds Loopbook's `kernels`."""


def is_ours(module) -> bool:
    """Whether a module object is Loopbook's own `kernels` package."""
    folder = getattr(module, "__path__", None)
    return bool(folder) and any(Path(p).resolve() == OURS for p in folder)


def _not_the_checkout(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() != ROOT
    except OSError:
        return True


def use_hf_kernels() -> None:
    """Bind `kernels` in this process to Hugging Face's package before transformers imports it."""
    loaded = sys.modules.get("kernels", False)
    if loaded is not False:
        if loaded is not None and is_ours(loaded):
            raise TrainingProcessError(
                "Loopbook's own `kernels` package is loaded in this process, so transformers cannot import Hugging "
                "Face's package of the same name. Run training in its own process: `python -m execfeedback finetune "
                "...`, or execfeedback.finetune.main(argv), which starts one.")
        return  # Hugging Face's already, or marked absent
    spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if _not_the_checkout(p)])
    if spec is None or spec.loader is None:
        # Not installed: mark it absent, so that transformers' availability check (find_spec) says None
        # instead of finding our folder on sys.path.
        sys.modules["kernels"] = None  # type: ignore[assignment]
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


def run_own_process(command: str, argv: list[str]) -> int:
    """Run `python -m execfeedback COMMAND ARGV` in a child, relaying its output; errors come back as SystemExit."""
    # A session of its own, so that a Ctrl-C at the terminal reaches the child once, through us: a second
    # SIGINT would cut short the checkpoint the child writes when it is stopped.
    proc = subprocess.Popen([sys.executable, "-m", "execfeedback", command, *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1, start_new_session=True)
    error: list[str] = []
    out, err = sys.stdout, sys.stderr

    def pump(src, dst, keep: bool) -> None:
        for line in src:
            dst.write(line)
            dst.flush()
            if keep and (error or line.startswith("error: ")):
                error.append(line)

    pumps = [threading.Thread(target=pump, args=(proc.stdout, out, False), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in pumps:
            t.join(timeout=10)
    if rc == 1 and error:
        raise SystemExit("".join(error).rstrip("\n"))
    if rc == 2:
        raise SystemExit(2)  # argparse's usage error, already printed by the child
    return rc
