"""What the page and the API drive: one store, its kernels, the resident model, the running replies and loops,
and the operations on them that a page route and an API route share."""

from __future__ import annotations

import asyncio
from typing import Any

from dialog import InvalidInput, Store
from dialog.notebook import import_ipynb
from kernels import KernelPool
from kernels.helper_setup import kernel_env, kernel_init_code
from local_model.loader import BACKENDS
from local_model.resident import Resident

from ..adapters.registry import get as get_adapter, list_adapters, resolve_adapter
from ..loop.loop import Loop, LoopConfig
from ..traces import TraceStore
from .ask import KernelAccess, ask, dialog_key, sampling_from
from .live import Live, LiveHub, OutputsLive
from .meter import TokenMeter
from .prompt_refs import find_refs, resolve
from .solve import fix_task, land, loop_config, solve_task, summary
from .. import settings as table
from .cells import Cells

ATTEMPT_FIELDS = ("id", "round", "candidate", "exec_status", "passed", "ename", "evalue", "author")


class Workspace:
    """`url` and `token`: where a kernel's `loopbook` helper reaches the app, and the token its own derives from.
    `defaults`: the app's setting values, under each dialog's own and each request's."""

    def __init__(self, store: Store, pool: KernelPool, models: Resident, *, url: str, token: str,
                 kernel_cwd: str | None = None, defaults: dict | None = None):
        self.store, self.pool, self.models = store, pool, models
        self.url, self.token, self.kernel_cwd = url, token, kernel_cwd
        self.defaults = {k: s.default for k, s in table.SETTINGS.items()} | (defaults or {})
        self.traces = TraceStore(store)
        self.cells = Cells(store, self.traces)
        self.hub = LiveHub()
        self.meter = TokenMeter(models, self.defaults)
        self.loops: dict[int, Loop] = {}
        self.stopping: dict[int, asyncio.Event] = {}  # the replies being written: set to stop one
        self.background: set[asyncio.Task] = set()

    async def close(self) -> None:
        await self.pool.shutdown_all()
        await asyncio.to_thread(self.models.close)
        self.store.close()

    # -- dialogs ---------------------------------------------------------------------------------------

    def new_dialog(self, title: Any, *, empty_cell: bool = False) -> dict:
        """A new dialog; with `empty_cell`, it opens on one, as a new Jupyter notebook does (the page's)."""
        d = self.store.create_dialog(title)
        if empty_cell:
            self.store.add_message(d["id"], "code", "")
        return d

    def check_settings(self, settings: dict, patch: dict | None = None) -> None:
        table.check_dialog(settings, patch, adapter_exists=lambda name: get_adapter(self.store, name))

    def change_dialog(self, dialog_id: Any, **changes: Any) -> dict:
        """Change a dialog's `title` and `settings` (those given) together, or not at all; settings are checked
        as Ask and Solve would check them."""
        d = self.store.get_dialog(dialog_id)
        if "settings" in changes:
            if not isinstance(changes["settings"], dict):
                raise InvalidInput("'settings' must be an object.")
            self.check_settings({**d["settings"], **changes["settings"]}, changes["settings"])
        with self.store.transaction():
            if "title" in changes:
                d = self.store.rename_dialog(d["id"], changes["title"])
            if "settings" in changes:
                d = self.store.update_dialog_settings(d["id"], **changes["settings"])
        return d

    async def delete_dialog(self, dialog_id: Any) -> int:
        """A deleted dialog takes its kernel with it."""
        d = self.store.get_dialog(dialog_id)
        await self.pool.shutdown(dialog_key(d["id"]))
        self.store.delete_dialog(d["id"])
        return d["id"]

    def import_notebook(self, data: bytes, title: str | None) -> dict:
        return import_ipynb(self.store, data, title, check_settings=self.check_settings)

    # -- kernels ---------------------------------------------------------------------------------------

    def kernel_state(self, dialog_id: int) -> str:
        return self.pool.state(dialog_key(dialog_id))

    def kernel_info(self, dialog_id: int) -> dict:
        return self.pool.info(dialog_key(dialog_id))

    async def prepare_kernel(self, dialog_id: int) -> str:
        """The dialog's kernel, set up with its working directory and the `loopbook` helper; returns its key."""
        key = dialog_key(dialog_id)
        env = kernel_env(self.url, self.token, dialog_id, self.store.get_dialog(dialog_id)["created_at"])
        await self.pool.ensure(key, cwd=self.kernel_cwd, env=env, init_code=kernel_init_code())
        return key

    async def _introspect_args(self, dialog_id: Any, body: dict) -> tuple[str, str, int]:
        """(kernel key, code, cursor_pos) of a complete/inspect request; a dialog without a kernel gets one (the
        warm spare: at once), so Tab works before the first run."""
        did = self.store.get_dialog(dialog_id)["id"]
        code, pos = body.get("code"), body.get("cursor_pos")
        if not isinstance(code, str):
            raise InvalidInput("'code' must be a string: the cell's text.")
        if pos is None:
            pos = len(code)
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= len(code):
            raise InvalidInput(f"'cursor_pos' must be a whole number from 0 to the code's length in code points "
                               f"({len(code)}); got {str(pos)[:40]!r}.")
        key = dialog_key(did)
        if self.pool.state(key) == "none":
            await self.prepare_kernel(did)
        return key, code, pos

    async def complete(self, dialog_id: Any, body: dict) -> dict:
        """Completions from the dialog's kernel at `cursor_pos` (code points) of `code`: kernels.Completion as a
        dict; status "busy" at once while a cell runs (with a message to show)."""
        key, code, pos = await self._introspect_args(dialog_id, body)
        return (await self.pool.complete(key, code, pos)).to_dict()

    async def inspect(self, dialog_id: Any, body: dict) -> dict:
        """Help (signature, docstring) for the name at `cursor_pos`: kernels.Inspection as a dict."""
        key, code, pos = await self._introspect_args(dialog_id, body)
        out = (await self.pool.inspect(key, code, pos)).to_dict()
        out.pop("sections", None)
        return out

    async def interrupt(self, dialog_id: Any) -> int:
        """Stop the model wherever it works in the dialog (replies, Solve and Fix), then interrupt its kernel."""
        did = self.store.get_dialog(dialog_id)["id"]
        for m in self.store.messages(did):
            if m["id"] in self.loops or self.hub.running(f"reply-{m['id']}"):
                await self.stop(m["id"])
        await self.pool.interrupt(dialog_key(did))
        return did

    async def restart(self, dialog_id: Any) -> int:
        did = self.store.get_dialog(dialog_id)["id"]
        await self.pool.restart(dialog_key(did))
        return did

    async def run(self, message_id: Any, *, from_kernel: bool = False) -> dict:
        """Run a code cell in its dialog's kernel and store what came back. From a cell of that very kernel
        (its `loopbook` helper), a run while the kernel is busy would wait on the caller: it is queued instead."""
        m = self.store.get_message(message_id)
        if from_kernel and self.kernel_state(m["dialog_id"]) == "busy":
            task = asyncio.create_task(self._run(m["id"]))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            return {"status": "queued", "outputs": []}
        return await self._run(m["id"])

    async def _run(self, message_id: Any) -> dict:
        m = self.store.get_message(message_id)
        if m["type"] != "code":
            raise InvalidInput(f"Message {m['id']} is a {m['type']}, not code: only code runs.")
        if not m["source"].strip():
            m = self.store.update_message(m["id"], outputs=[], output_meta={"status": "ok", "empty": True})
            return {"status": "ok", "outputs": [], "execution_count": m["execution_count"], "message": "Empty cell."}
        # The outputs, live, as the kernel sends them (run_outputs); closed once the result is stored, so a
        # follower's last look and the stored cell agree.
        view = await self.hub.open_outputs(f"run-{m['id']}")
        try:
            key = await self.prepare_kernel(m["dialog_id"])
            res = await self.pool.execute(key, m["source"], on_batch=view.on_batch)
            meta = {"status": res.status, "duration_s": round(res.duration_s, 4), "truncated": res.truncated,
                    "original_chars": res.original_chars, "message": res.message}
            self.store.update_message(m["id"], outputs=res.outputs, output_meta=meta,
                                      execution_count=res.execution_count)
        finally:
            self.hub.close_outputs(view)
        return {"status": res.status, "outputs": res.outputs, "execution_count": res.execution_count,
                "message": res.message, "truncated": res.truncated, "duration_s": meta["duration_s"]}

    def tokens(self, dialog_id: Any) -> dict:
        """The token meter of a dialog (workspace/meter.py): per-cell tokens, context used against n_ctx, and the
        cells each prompt over its budget would leave out."""
        d = self.store.get_dialog(dialog_id)
        return self.meter.dialog(d, self.store.messages(d["id"]))

    # -- the model -------------------------------------------------------------------------------------

    def model_status(self) -> dict:
        status = self.models.status()
        if self.models.engine is not None:
            status["manifest"] = self.models.engine.manifest
        return status

    def adapter_choices(self) -> list[dict]:
        """Every registered adapter, with whether it fits the loaded model and why (or why not)."""
        manifest = self.models.engine.manifest if self.models.engine is not None else None
        sha = manifest.get("sha256") if manifest else None
        loaded = (manifest or {}).get("file_name") or (manifest or {}).get("model") or "the loaded model"
        out = []
        for a in list_adapters(self.store):
            base = a.get("base_model") or a["base_file"]
            if manifest is None:
                fits, why = True, f"For {base}; checked against the model when it is used (no model is loaded yet)."
            elif sha is None:
                fits, why = False, f"Needs the in-process GGUF base {base}; {loaded} has no file to load it onto."
            else:
                fits = a["base_sha256"] == sha
                why = f"For {base}." if fits else \
                    f"Needs base model {base} (sha256 {a['base_sha256'][:12]}...); the loaded model is {loaded}."
            out.append({"name": a["name"], "base": base, "fits": fits, "why": why})
        return out

    def sampling(self, settings: dict, body: dict):
        """Sampling: the app's defaults, then the dialog's settings, then the request's."""
        defaults = {k: self.defaults[k] for k in table.keys(table.ASK)}
        return sampling_from({**defaults, **settings}, {k: body.get(k) for k in table.keys(table.ASK)})

    async def engine_for(self, body: dict, settings: dict):
        """The engine a request runs on: its model, and the request's or else the dialog's LoRA adapter."""
        for key in table.keys(table.ENGINE):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise InvalidInput(f"'{key}' must be a string.")
        if body.get("backend") is not None and body["backend"].lower() not in BACKENDS:
            raise InvalidInput(f"Unknown backend {body['backend'][:40]!r}; Loopbook's backends are "
                               f"{', '.join(BACKENDS)}.")
        adapter = body.get("adapter") or settings.get("adapter")
        lora_path, entry = None, {}
        if adapter:
            # The base's sha256 is checked before llama.cpp sees the adapter: it crashes on another base's.
            lora_path, entry = resolve_adapter(self.store, adapter, model=body.get("model") or self.models.model,
                                               data_dir=self.store.data_dir)
        backend = body["backend"].lower() if body.get("backend") else None
        return await self.models.get(body.get("model"), backend, lora_path=lora_path, manifest_extra=entry)

    @staticmethod
    def _refuse_unknown(body: dict, *where: str) -> None:
        known = [k for w in where for k in table.keys(w)]
        unknown = set(body) - set(known)
        if unknown:
            raise InvalidInput(f"Unknown setting(s) {', '.join(sorted(map(str, unknown)))}; known: {', '.join(known)}.")

    def reply_live(self, message_id: Any) -> Live | None:
        return self.hub.get(f"reply-{message_id}")

    def loop_live(self, message_id: Any) -> Live | None:
        return self.hub.get(f"loop-{message_id}")

    def run_outputs(self, message_id: int) -> OutputsLive | None:
        """The live outputs of a code cell's run going on now (None when it is not running)."""
        return self.hub.outputs(f"run-{message_id}")

    async def follow_run(self, message_id: Any, wait_s: float = 5.0) -> OutputsLive | None:
        """The cell's run going on now, or the next to start within `wait_s`."""
        return await self.hub.wait_outputs(f"run-{self.store.get_message(message_id)['id']}", wait_s)

    async def ask(self, message_id: Any, body: dict) -> tuple[dict, Live, asyncio.Task]:
        """Validate, pick the engine, and start answering a prompt in the background: (message, live log, task)."""
        m = self.store.get_message(message_id)
        if m["type"] != "prompt":
            raise InvalidInput(f"Message {m['id']} is a {m['type']} cell; only prompts are answered.")
        if self.hub.running(f"reply-{m['id']}"):
            raise InvalidInput("This prompt is already being answered; stop it first.")
        self._refuse_unknown(body, table.ENGINE, table.ASK)
        settings = self.store.get_dialog(m["dialog_id"])["settings"]
        sampling = self.sampling(settings, body)
        engine = await self.engine_for(body, settings)
        live = self.hub.open(f"reply-{m['id']}")
        kernel = KernelAccess(self.pool, lambda: self.prepare_kernel(m["dialog_id"]))
        stop = self.stopping[m["id"]] = asyncio.Event()
        steps = settings.get("tool_steps")
        task = asyncio.create_task(ask(self.store, engine, m["id"], sampling=sampling, live=live, kernel=kernel,
                                       tool_steps=self.defaults["tool_steps"] if steps is None else steps, stop=stop))
        task.add_done_callback(lambda _t: self.stopping.pop(m["id"], None) if self.stopping.get(m["id"]) is stop
                               else None)
        return m, live, task

    async def solve(self, message_id: Any, body: dict, kind: str = "solve") -> tuple[dict, Live, asyncio.Task]:
        """Solve a prompt (or, with kind "fix", fix a failed code cell): build the task and run the loop in the
        background; returns (message, live log, task), the task's result the API's summary."""
        self._refuse_unknown(body, table.LOOP, table.ASK, table.ENGINE)
        m = self.store.get_message(message_id)
        if m["id"] in self.loops:
            raise InvalidInput("A loop is already running on this cell; stop it first.")
        settings = self.store.get_dialog(m["dialog_id"])["settings"]
        sampling = self.sampling(settings, body)
        base = LoopConfig(**{k: self.defaults[k] for k in table.keys(table.LOOP)}, sampling=sampling)
        cfg = loop_config(settings, {k: body.get(k) for k in table.keys(table.LOOP)}, base)
        engine = await self.engine_for(body, settings)
        await self.prepare_kernel(m["dialog_id"])
        notes: list[str] = []
        if kind == "solve":
            # $`name` values go into the task's own turn, as an Ask puts them; the code it writes runs in the kernel,
            # so an &`fn` is simply a function it may call.
            resolved = await resolve(self.pool, dialog_key(m["dialog_id"]), m["source"]) \
                if find_refs(m["source"]) else None
            notes = resolved.notes if resolved else []
            task = solve_task(self.store, engine, m["id"], sampling.max_tokens,
                              source=resolved.text if resolved else None)
        else:
            task = fix_task(self.store, engine, m["id"])
        loop = Loop(engine, self.pool, self.traces, cfg)
        live = self.hub.open(f"loop-{m['id']}")
        for note in notes:
            live.publish({"type": "note", "round": 0, "text": note})
        # Each candidate's outputs as its code runs: kernels' batches, in the loop's log (an attempt_start
        # begins a new list).
        loop.on_batch = lambda events: live.publish({"type": "outputs", "events": events})
        self.loops[m["id"]] = loop

        async def run():
            try:
                result = None
                async for ev in loop.run(task):
                    if ev["type"] == "done":
                        result = ev["result"]
                    else:
                        live.publish(ev if ev["type"] != "attempt" else
                                     {"type": "attempt", "attempt": {k: ev["attempt"].get(k) for k in ATTEMPT_FIELDS}})
                code_id = land(self.store, self.traces, task, result)
                out = summary(result, code_id)
                live.publish({"type": "done", "summary": out})
                return out
            finally:
                self.loops.pop(m["id"], None)
                live.close()

        return m, live, asyncio.create_task(run())

    async def stop(self, message_id: Any) -> bool:
        """Stop whatever works on this message: a loop (generation and code) or a streaming reply."""
        m = self.store.get_message(message_id)
        loop = self.loops.get(m["id"])
        if loop is not None:
            await loop.stop()
            return True
        meta = m.get("reply_meta") if isinstance(m.get("reply_meta"), dict) else {}
        rid = meta.get("request_id") if isinstance(meta.get("request_id"), str) else None
        stop = self.stopping.get(m["id"])  # a reply between two steps of its tool loop has no generation to cancel
        fresh = stop is not None and not stop.is_set()
        if fresh:
            stop.set()
        return bool(rid and self.models.engine and self.models.engine.cancel(rid)) or fresh

    # -- traces ----------------------------------------------------------------------------------------

    def latest_traces(self, dialog_id: int) -> dict[int, dict]:
        """The newest Solve/Fix trace of each message of a dialog, in one query (the page shows one per cell)."""
        out: dict[int, dict] = {}
        for t in self.traces.iter_traces("dialog_id = ?", (dialog_id,)):
            if t.get("message_id") is not None:
                out[t["message_id"]] = t
        return out

    def latest_trace(self, message_id: int) -> dict | None:
        traces = [t for t in self.traces.traces_for_message(message_id) if t["message_id"] == message_id]
        return traces[-1] if traces else None
