// Loopbook's notebook page: the keyboard model (command mode and edit mode, as in Jupyter), the run
// queue, autosave, and the glue between the cell toolbar, the server's cell fragments and the editors.
//
// Command mode: one cell is selected (class "selected") and has the focus. Edit mode: the focus is in
// the selected cell's editor (class "editing"; a note or prompt shows its editor only then). The keys of
// both are declared in static/keys.js; the editor (static/editor.js) reports the edit-mode ones as
// loopbook:<action> events on the cell.
//
// Every change goes to the server as one small request, and only the cells it touched are swapped
// (the server answers with those cells' HTML). Runs queue here, in order; a failed run clears the
// rest of the queue, as Jupyter does.
(function () {
  "use strict";

  // Under the page's CSP (script-src 'self', style-src 'self'), htmx must not add its inline
  // indicator <style> (app.css has those rules), evaluate strings, or run scripts from fragments.
  if (window.htmx) {
    Object.assign(htmx.config, { includeIndicatorStyles: false, allowEval: false, allowScriptTags: false });
  }

  // CodeMirror's styles (style-mod) go into a <style> element when the editor lives in a document
  // (constructable stylesheets only for shadow roots), and the CSP blocks that element: the editors
  // would lose their layout (white-space, cursor, selection). The first mount decides, so mount one
  // throwaway editor while `document.head` reads as missing: style-mod then keeps every editor's
  // rules in one adopted CSSStyleSheet, which the CSP allows. This runs before editor.js creates
  // any editor (it waits for DOMContentLoaded).
  (function adoptEditorStyles() {
    if (!window.CM || !("adoptedStyleSheets" in document) || !window.CSSStyleSheet) return;
    Object.defineProperty(document, "head", { value: null, configurable: true });
    try {
      new window.CM.EditorView({ doc: "" }).destroy();
    } catch (err) {
      console.warn("loopbook: could not adopt the editor styles", err);
    } finally {
      delete document.head; // back to Document.prototype's getter
    }
  })();

  const CELL = "article.cell";
  const SAVE_DELAY_MS = 600;
  const DOUBLE_KEY_MS = 800; // d d, i i, 0 0
  const KERNEL_POLL_MS = 5000;
  const FAILED = /\bstatus-(error|timeout|died|interrupted)\b/;

  const dialogPage = () => document.querySelector("main.dialog");
  const dialogId = () => dialogPage().dataset.dialog;
  const editors = () => (window.loopbook && window.loopbook.editors) || null;
  const byId = (id) => (id == null ? null : document.getElementById("cell-" + id));
  const cellOf = (el) => (el && el.closest ? el.closest(CELL) : null);
  const allCells = () => [...document.querySelectorAll("#cells > " + CELL)];
  const SOURCE = "textarea.cell-source, textarea.cell-source-lazy";
  const textareaOf = (cell) => cell.querySelector(SOURCE);
  const sourceOf = (cell) => { const ta = textareaOf(cell); return ta ? ta.value : ""; };

  function sibling(cell, forward) {
    let el = cell && (forward ? cell.nextElementSibling : cell.previousElementSibling);
    while (el && !el.matches(CELL)) el = forward ? el.nextElementSibling : el.previousElementSibling;
    return el;
  }
  const nextCell = (cell) => sibling(cell, true);
  const prevCell = (cell) => sibling(cell, false);

  // -- messages ----------------------------------------------------------------------------------

  function toast(text, { error = false } = {}) {
    const box = document.getElementById("toast");
    if (!box || !text) return;
    const msg = document.createElement("div");
    msg.className = "toast-msg" + (error ? " toast-error" : "");
    msg.textContent = text;
    box.append(msg);
    setTimeout(() => msg.remove(), error ? 9000 : 4000);
  }

  class Refused extends Error {}

  // Names this tab to the server, so its own saves still on their way back are no conflict (see base).
  const TAB = Math.random().toString(36).slice(2) + Date.now().toString(36);

  // One request to the page routes. Errors the server explains (a toast fragment, HX-Retarget) or an
  // HTTP error become a toast and a Refused exception, so callers stop where they are.
  async function call(method, url, values, { quiet = false } = {}) {
    const init = { method, headers: { "HX-Request": "true", "X-Loopbook-Tab": TAB }, credentials: "same-origin" };
    if (values) init.body = new URLSearchParams(values);
    let res;
    try {
      res = await fetch(url, init);
    } catch (err) {
      if (!quiet) toast("The Loopbook server did not answer: is it still running?", { error: true });
      throw new Refused(String(err));
    }
    const text = await res.text();
    if (res.ok && !res.headers.get("HX-Retarget")) return text;
    let message = text;
    if (res.status === 401) message = "Your session ended: open the URL Loopbook printed at start-up again.";
    else {
      const holder = document.createElement("template");
      holder.innerHTML = text;
      message = holder.content.textContent.trim() || `${method} ${url} failed (${res.status}).`;
      try { message = JSON.parse(text).error || message; } catch (e) { /* not JSON */ }
    }
    if (!quiet) toast(message, { error: true });
    throw new Refused(message);
  }

  // -- swapping server fragments in ---------------------------------------------------------------

  const SWAP = (style) => ({ swapStyle: style, swapDelay: 0, settleDelay: 0 });

  function fragmentOf(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    return tpl.content;
  }

  // Replace a cell with the server's version. keepSource keeps the live editor (and what was typed
  // while a run was on its way) instead of the source the server sent back.
  function swapCell(id, html, { keepSource = false } = {}) {
    const old = byId(id);
    if (!old) return null;
    const frag = fragmentOf(html);
    const fresh = frag.querySelector(CELL);
    let refocus = null;
    if (keepSource && fresh) {
      const live = textareaOf(old), incoming = textareaOf(fresh);
      const view = live && editors() ? editors().get(live) : null;
      if (live && incoming && view) {
        if (view.hasFocus) refocus = view;
        incoming.replaceWith(live);
        live.after(view.dom);
      }
    }
    const wasEditing = old.classList.contains("editing") && refocus;
    htmx.swap(old, frag, SWAP("outerHTML"));
    const now = byId(id);
    if (now && wasEditing) now.classList.add("editing");
    if (refocus) refocus.focus();
    return now;
  }

  // Insert new cells (add, paste, undo, code to cells) next to `ref`, or at the end.
  function insertCells(html, ref, where) {
    const frag = fragmentOf(html);
    const ids = [...frag.querySelectorAll(CELL)].map((cell) => cell.dataset.id);
    if (ref && ref.isConnected) htmx.swap(ref, frag, SWAP(where === "above" ? "beforebegin" : "afterend"));
    else htmx.swap("#cells", frag, SWAP("beforeend"));
    return ids.map(byId).filter(Boolean);
  }

  // The token meter (the header's context count and each prompt's budget note) after a change: one request
  // a little after the last change, its fragments put in place by id.
  let meterTimer = null;
  function refreshMeter() {
    if (!dialogPage()) return;
    clearTimeout(meterTimer);
    meterTimer = setTimeout(async () => {
      let html;
      try { html = await call("GET", `/d/${dialogId()}/meter`, null, { quiet: true }); } catch (err) { return; }
      for (const fresh of [...fragmentOf(html).children]) {
        const old = fresh.id && document.getElementById(fresh.id);
        if (old) { fresh.removeAttribute("hx-swap-oob"); old.replaceWith(fresh); }
      }
    }, 250);
  }

  // Structural edits (add, delete, move, paste, type) run one after another, each against the page
  // as the previous one left it.
  let ops = Promise.resolve();
  let pendingOps = 0;
  function serial(fn) {
    pendingOps += 1;
    ops = ops.then(fn, fn).catch((err) => { if (!(err instanceof Refused)) console.error(err); })
      .finally(() => {
        pendingOps -= 1;
        refreshMeter();
        if (pendingOps === 0) typeahead = null; // the edit it waited for never came (an error said why)
      });
    return ops;
  }

  // Characters typed after a key that ends in edit mode (Enter, or Shift+Enter that adds a cell) but
  // before that editor exists: they are kept here and typed into it, instead of being taken as
  // command keys ("Write" would otherwise run all cells above, on its "r").
  let typeahead = null;
  function expectEdit() { if (!typeahead) typeahead = []; }

  // -- editors made as cells near the screen ----------------------------------------------------------
  // The server marks all but the first cells' sources "cell-source-lazy"; each becomes a "cell-source"
  // (which editor.js turns into an editor) when it comes within a screen or so of the viewport, or
  // when it is about to be edited.

  const LAZY = "textarea.cell-source-lazy";

  function wake(ta) {
    if (!ta.classList.contains("cell-source-lazy")) return;
    if (nearScreen) nearScreen.unobserve(ta);
    ta.classList.replace("cell-source-lazy", "cell-source");
    if (editors()) editors().upgrade(ta);
  }

  const nearScreen = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
    for (const entry of entries) if (entry.isIntersecting) wake(entry.target);
  }, { rootMargin: "1200px 0px" }) : null;

  function watchLazy(root = document) {
    for (const ta of root.querySelectorAll(LAZY)) {
      if (nearScreen) nearScreen.observe(ta); else wake(ta);
    }
  }

  function ensureEditor(cell) {
    const ta = cell && cell.querySelector(LAZY);
    if (ta) wake(ta);
  }

  // -- selection and modes ------------------------------------------------------------------------

  let selectedId = null;

  function selected() {
    const el = byId(selectedId);
    return el && el.isConnected ? el : null;
  }

  function select(cell, { focus = true, scroll = true } = {}) {
    if (!cell) return;
    const before = selected();
    if (before && before !== cell) before.classList.remove("selected");
    for (const other of document.querySelectorAll(CELL + ".selected")) if (other !== cell) other.classList.remove("selected");
    cell.classList.add("selected");
    selectedId = cell.dataset.id;
    placeToolbar(cell);
    if (focus && document.activeElement !== cell) cell.focus({ preventScroll: true });
    if (scroll) cell.scrollIntoView({ block: "nearest" });
  }

  // One toolbar, in the selected cell, built here rather than sent with every cell (it was half of a
  // cell's bytes). Out of the Tab order: every button has a key.
  const isType = (...types) => (cell) => types.includes(cell.dataset.type);
  const failed = (cell) => {
    const out = cell.querySelector(":scope > .cell-body > .outputs");
    return Boolean(out && /\bstatus-(error|timeout|died)\b/.test(out.className));
  };
  const has = (cls, yes, no) => (cell) => (cell.classList.contains(cls) ? yes : no);
  const TOOLBAR = [
    // [action, label, title, shown for]
    ["run", "Run", "Run (Ctrl+Enter)", isType("code")],
    ["ask", "Ask", "Ask the model (Ctrl+Enter)", isType("prompt")],
    ["solve", "Solve", "Ask for code, run it here, feed errors back until it works (s)", isType("prompt")],
    ["fix", "Fix", "Let the model fix this cell from its error (f)", (c) => isType("code")(c) && failed(c)],
    ["test", has("test", "Untest", "Test"), "Code cells marked as tests are the visible checks of Solve and Fix",
      isType("code")],
    ["pin", has("pinned", "Unpin", "Pin"), "Pinned cells survive context truncation (Shift+P)"],
    ["skip", has("skipped", "Unskip", "Skip"), "Skipped cells are left out of the model's context (Shift+S)"],
    ["up", "↑", "Move up (Ctrl+Shift+Up)"],
    ["down", "↓", "Move down (Ctrl+Shift+Down)"],
    ["add-below", "+", "Add a cell below (b)"],
    ["delete", "Delete", "Delete (d d; z undoes)"],
  ];
  let toolbar = null;

  function placeToolbar(cell) {
    if (!toolbar) {
      toolbar = document.createElement("div");
      toolbar.className = "cell-toolbar";
      toolbar.setAttribute("role", "toolbar");
      toolbar.setAttribute("aria-label", "Cell actions");
      const type = document.createElement("select");
      type.className = "cell-type";
      type.dataset.act = "type";
      type.tabIndex = -1;
      type.title = "Cell type (y m p)";
      type.setAttribute("aria-label", "Cell type");
      for (const [value, label] of [["code", "Code"], ["note", "Note"], ["prompt", "Prompt"]]) {
        type.append(new Option(label, value));
      }
      toolbar.append(type);
      for (const [act, , title] of TOOLBAR) {
        const b = document.createElement("button");
        b.type = "button";
        b.dataset.act = act;
        b.className = act;
        b.tabIndex = -1;
        b.title = title;
        toolbar.append(b);
      }
    }
    toolbar.querySelector("select").value = cell.dataset.type;
    for (const [act, label, , shown] of TOOLBAR) {
      const b = toolbar.querySelector(`button[data-act="${act}"]`);
      b.hidden = Boolean(shown && !shown(cell));
      b.textContent = typeof label === "function" ? label(cell) : label;
    }
    const body = cell.querySelector(":scope > .cell-body");
    if (body && toolbar.parentNode !== body) body.prepend(toolbar);
  }

  function editingCell() {
    const a = document.activeElement;
    return a && a.closest && a.closest(".cm-editor") ? cellOf(a) : null;
  }

  function startEdit(cell) {
    if (!cell) return;
    ensureEditor(cell);
    select(cell, { focus: false });
    cell.classList.add("editing");
    const ed = editors();
    if (!ed || !ed.focus(cell)) {
      const ta = textareaOf(cell);
      if (ta) { ta.hidden = false; ta.focus(); }
    }
    const typed = typeahead ? typeahead.join("") : "";
    typeahead = null;
    const view = ed && ed.get(cell);
    if (typed && view) view.dispatch(view.state.replaceSelection(typed));
    cell.scrollIntoView({ block: "nearest" });
  }

  // Leave edit mode; a note or prompt shows its markdown rendered again (saved first if changed).
  function leaveEdit(cell, { render = true } = {}) {
    if (!cell) return;
    cell.classList.remove("editing");
    if (editors()) editors().blur(cell);
    select(cell);
    if (render) renderIfChanged(cell);
  }

  // -- saving -------------------------------------------------------------------------------------

  const saveTimers = new Map(); // cell id -> timer of a pending autosave
  const saveChains = new Map(); // cell id -> the latest save request, so saves arrive in order
  const savedText = new Map(); // cell id -> the source the server has, when it differs from the textarea's default
  const owned = new Set(); // cells whose next render a queued job does (their ask or solve swaps them)
  const rendering = new Set();

  function savedSource(cell) {
    const id = cell.dataset.id;
    if (savedText.has(id)) return savedText.get(id);
    const ta = textareaOf(cell);
    return ta ? ta.defaultValue : "";
  }

  function scheduleSave(id) {
    clearTimeout(saveTimers.get(id));
    saveTimers.set(id, setTimeout(() => save(id).catch(() => {}), SAVE_DELAY_MS)); // a refusal is told in a toast
  }

  function save(id) {
    saveTimers.delete(id);
    const cell = byId(id);
    if (!cell) return Promise.resolve();
    const source = sourceOf(cell);
    const previous = saveChains.get(id) || Promise.resolve();
    if (source === savedSource(cell)) return previous;
    const request = previous.catch(() => {}).then(() => call("PUT", `/cells/${id}`, { source, base: savedSource(cell) }))
      .then(() => { savedText.set(id, source); refreshMeter(); });
    saveChains.set(id, request);
    return request;
  }

  // Send a pending autosave now; resolves once the server has the cell's text.
  function flush(cell) {
    if (!cell) return Promise.resolve();
    const id = cell.dataset.id;
    if (saveTimers.has(id)) { clearTimeout(saveTimers.get(id)); return save(id); }
    if (sourceOf(cell) !== savedSource(cell)) return save(id);
    return saveChains.get(id) || Promise.resolve();
  }

  async function renderIfChanged(cell) {
    const id = cell.dataset.id;
    if (cell.dataset.type === "code" || owned.has(id) || rendering.has(id)) return;
    const ta = textareaOf(cell);
    if (!ta || ta.value === ta.defaultValue) return;
    rendering.add(id);
    clearTimeout(saveTimers.get(id));
    saveTimers.delete(id);
    const source = ta.value;
    try {
      const html = await call("POST", `/cells/${id}/save`, { source, base: savedSource(cell) });
      const now = byId(id);
      if (now && !now.classList.contains("editing")) swapCell(id, html);
      else savedText.set(id, source);
    } catch (err) { /* told in a toast */ } finally {
      rendering.delete(id);
    }
  }

  // -- the run queue --------------------------------------------------------------------------------

  const queue = [];
  let current = null;

  function markQueue() {
    for (const el of document.querySelectorAll(CELL + ".queued, " + CELL + ".running")) {
      el.classList.remove("queued", "running");
    }
    for (const job of queue) { const el = byId(job.id); if (el) el.classList.add("queued"); }
    if (current) { const el = byId(current.id); if (el) el.classList.add("running"); }
  }

  function enqueue(cell, kind) {
    if (!cell) return;
    const id = cell.dataset.id;
    if (kind === "ask" || kind === "solve" || kind === "note") owned.add(id);
    queue.push({ id, kind, source: sourceOf(cell) });
    markQueue();
    pump();
  }

  function clearQueue() {
    for (const job of queue) owned.delete(job.id);
    queue.length = 0;
    markQueue();
  }

  async function pump() {
    if (current) return;
    while (queue.length) {
      current = queue.shift();
      markQueue();
      let ok = false;
      try {
        if (byId(current.id)) ok = await JOBS[current.kind](current);
        else ok = true; // deleted while it waited
      } catch (err) {
        if (!(err instanceof Refused)) console.error(err);
      }
      owned.delete(current.id);
      current = null;
      refreshMeter();
      if (!ok) clearQueue();
      markQueue();
    }
    refreshKernel();
  }

  function waitForStream(id) {
    return new Promise((resolve) => {
      const check = () => {
        const el = byId(id);
        if (!el || !el.querySelector(".streaming")) resolve();
        else setTimeout(check, 200);
      };
      check();
    });
  }

  // What a job sends with the text it saves: the text this tab last had from the server (see save), so a
  // tab that missed a newer edit is refused instead of putting its older text back.
  const sent = (job) => ({ source: job.source, base: savedSource(byId(job.id)) });

  // -- live output of a running cell --------------------------------------------------------------
  // The server applies the kernel's batches (kernels.apply_events) and sends each changed output rendered as
  // a finished run's are: {clear, n, set: [[index, html], ...]}. Output i becomes set's html (appended at the
  // end); outputs past n go (after clear_output). At most one event per 40 ms, so a flood stays cheap here.

  function applyLive(id, ev) {
    const cell = byId(id);
    const box = cell && cell.querySelector(".outputs");
    if (!box) return;
    if (!box.classList.contains("live")) box.className = "outputs live status-running";
    for (const [i, html] of ev.set) {
      const frag = fragmentOf(html);
      if (i < box.children.length) box.children[i].replaceWith(frag);
      else box.append(frag);
    }
    while (box.children.length > ev.n) box.lastElementChild.remove();
  }

  // Follow a cell's run. `wait`: opened as this tab sends Run (the stream waits for the run to start, and
  // the Run's answer swaps the cell); otherwise a run found going on when the page loaded, whose "done"
  // brings the finished cell.
  function followRun(id, { wait = false } = {}) {
    const src = new EventSource(`/cells/${id}/run-stream${wait ? "?wait=1" : ""}`);
    src.addEventListener("outputs", (e) => applyLive(id, JSON.parse(e.data)));
    src.addEventListener("done", (e) => {
      src.close();
      if (!wait) swapCell(id, e.data, { keepSource: true });
    });
    src.onerror = () => src.close(); // no reconnecting: the Run's answer (or a reload) has the outputs
    return src;
  }

  const JOBS = {
    async run(job) {
      setKernel("busy");
      const follow = followRun(job.id, { wait: true });
      let html;
      try {
        html = await call("POST", `/cells/${job.id}/run`, sent(job));
      } finally {
        follow.close();
      }
      const el = swapCell(job.id, html, { keepSource: true });
      savedText.set(job.id, job.source);
      if (el && sourceOf(el) !== job.source) scheduleSave(job.id); // typed while it ran
      const out = el && el.querySelector(".outputs");
      return !(out && FAILED.test(out.className));
    },
    async ask(job) {
      const html = await call("POST", `/cells/${job.id}/ask`, sent(job));
      savedText.delete(job.id);
      swapCell(job.id, html);
      await waitForStream(job.id);
      const el = byId(job.id);
      return !(el && el.querySelector(".reply.status-error"));
    },
    async solve(job) {
      const html = await call("POST", `/cells/${job.id}/solve`, sent(job));
      savedText.delete(job.id);
      swapCell(job.id, html);
      await waitForStream(job.id);
      return true;
    },
    async fix(job) {
      await flush(byId(job.id));
      const html = await call("POST", `/cells/${job.id}/fix`);
      swapCell(job.id, html);
      await waitForStream(job.id);
      return true;
    },
    async note(job) {
      const html = await call("POST", `/cells/${job.id}/save`, sent(job));
      savedText.delete(job.id);
      const el = byId(job.id);
      if (el && !el.classList.contains("editing")) swapCell(job.id, html);
      return true;
    },
  };

  // Run a cell: code runs in the kernel, a prompt is asked, a note is rendered.
  function runCell(cell, { then = "stay" } = {}) {
    if (!cell) return;
    const editing = editingCell() === cell;
    const type = cell.dataset.type;
    if (type !== "code" && editing) {
      cell.classList.remove("editing");
      if (editors()) editors().blur(cell);
    }
    enqueue(cell, type === "code" ? "run" : type === "prompt" ? "ask" : "note");
    const next = then === "next" ? nextCell(cell) : null;
    if (then === "next" && next) {
      select(next);
    } else if (then === "next" || then === "insert") {
      // Out of the editor now, so what is typed while the new cell is on its way goes into it.
      if (editingCell() === cell) { cell.classList.remove("editing"); select(cell, { scroll: false }); }
      expectEdit();
      return addCell(cell.dataset.id, "below", "code", { edit: true });
    } else if (!(editing && type === "code")) {
      select(cell);
    }
  }

  function solveOrFix(cell) {
    if (!cell) return;
    if (cell.dataset.type === "prompt") {
      if (editingCell() === cell) { cell.classList.remove("editing"); editors() && editors().blur(cell); }
      enqueue(cell, "solve");
      select(cell);
    } else if (cell.dataset.type === "code") {
      if (!failed(cell)) { toast("Fix works on a code cell whose last run failed."); return; }
      enqueue(cell, "fix");
      select(cell);
    } else {
      toast("Solve works on a prompt cell (p makes this cell a prompt).");
    }
  }

  function runAll(upTo) {
    for (const cell of allCells()) {
      if (cell === upTo) break;
      if (cell.dataset.type === "code" && !cell.classList.contains("skipped")) enqueue(cell, "run");
    }
  }

  // -- kernel ---------------------------------------------------------------------------------------

  function setKernel(state) {
    const badge = document.getElementById("kernel-state");
    if (!badge) return;
    badge.textContent = "kernel: " + state;
    badge.className = "kernel-state kernel-" + state;
    badge.dataset.state = state;
  }

  async function refreshKernel() {
    if (!dialogPage()) return;
    try {
      const html = await call("GET", `/d/${dialogId()}/kernel`, null, { quiet: true });
      if (document.getElementById("kernel-state")) htmx.swap("#kernel-state", html, SWAP("outerHTML"));
    } catch (err) { /* the next poll tries again */ }
  }

  // The server stops the model wherever it works in the dialog, then interrupts the kernel.
  async function interrupt() {
    clearQueue();
    const html = await call("POST", `/d/${dialogId()}/interrupt`);
    htmx.swap("#kernel-state", html, SWAP("outerHTML"));
    toast("Interrupted.");
  }

  async function restart() {
    clearQueue();
    setKernel("restarting");
    try {
      const html = await call("POST", `/d/${dialogId()}/restart`);
      htmx.swap("#kernel-state", html, SWAP("outerHTML"));
      toast("Kernel restarted: its variables are gone.");
    } finally {
      refreshKernel();
    }
  }

  // -- cell edits -----------------------------------------------------------------------------------

  async function addCell(refId, where, type = "code", { edit = false } = {}) {
    const ref = byId(refId);
    const params = new URLSearchParams({ type });
    if (ref) params.set(where === "above" ? "before" : "after", refId);
    const html = await call("POST", `/d/${dialogId()}/cells?${params}`);
    const [cell] = insertCells(html, ref, where);
    if (cell) { select(cell); if (edit) startEdit(cell); }
  }

  const undo = []; // deleted cells, newest last: {id, prevId, nextId}

  async function deleteCell(id, { cut = false } = {}) {
    const cell = byId(id);
    if (!cell) return;
    await flush(cell).catch(() => {});
    const prev = prevCell(cell), next = nextCell(cell);
    await call("DELETE", `/cells/${id}`);
    undo.push({ id, prevId: prev && prev.dataset.id, nextId: next && next.dataset.id });
    if (cut) setClipboard(id);
    const wasSelected = selectedId === id;
    htmx.swap(cell, "", SWAP("delete"));
    if (wasSelected) select(next || prev);
    toast(cut ? "Cut: v pastes it, z brings it back here." : "Deleted: z brings it back.");
  }

  async function undoDelete() {
    const last = undo.pop();
    if (!last) { toast("Nothing to undo."); return; }
    const prev = byId(last.prevId), next = byId(last.nextId);
    const params = new URLSearchParams();
    if (prev) params.set("after", last.prevId); else if (next) params.set("before", last.nextId);
    const html = await call("POST", `/cells/${last.id}/restore?${params}`);
    const [cell] = insertCells(html, prev || next, prev ? "below" : "above");
    if (cell) select(cell);
  }

  const CLIPBOARD = "loopbook.clipboard";
  function setClipboard(id) {
    try { localStorage.setItem(CLIPBOARD, id); } catch (e) { window.__loopbookClipboard = id; }
  }
  function clipboard() {
    try { return localStorage.getItem(CLIPBOARD); } catch (e) { return window.__loopbookClipboard || null; }
  }

  async function copyCell(id) {
    const cell = byId(id);
    if (!cell) return;
    await flush(cell).catch(() => {});
    setClipboard(id);
    toast("Copied: v pastes it below a cell, Shift+V above.");
  }

  async function paste(refId, where) {
    const from = clipboard();
    if (!from) { toast("Nothing to paste: c copies a cell, x cuts one."); return; }
    const ref = byId(refId);
    const params = new URLSearchParams({ dialog: dialogId() });
    if (ref) params.set(where === "above" ? "before" : "after", refId);
    const html = await call("POST", `/cells/${from}/paste?${params}`);
    const [cell] = insertCells(html, ref, where);
    if (cell) select(cell);
  }

  async function setType(id, type) {
    const cell = byId(id);
    if (!cell || cell.dataset.type === type) return;
    await flush(cell);
    const html = await call("POST", `/cells/${id}/type?type=${encodeURIComponent(type)}`);
    savedText.delete(id);
    swapCell(id, html);
    if (selectedId === id) select(byId(id));
  }

  async function toggle(id, field) {
    const cell = byId(id);
    if (!cell) return;
    await flush(cell);
    const html = await call("POST", `/cells/${id}/toggle?field=${field}`);
    savedText.delete(id);
    swapCell(id, html);
    if (selectedId === id) select(byId(id));
  }

  async function move(id, offset) {
    const cell = byId(id);
    const other = cell && (offset < 0 ? prevCell(cell) : nextCell(cell));
    if (!other) return;
    await call("POST", `/cells/${id}/move?offset=${offset}`);
    const view = editingCell() === cell && editors() ? editors().get(cell) : null;
    if (offset < 0) other.before(cell); else other.after(cell);
    if (view) view.focus();
    else if (selectedId === id) select(cell);
    cell.scrollIntoView({ block: "nearest" });
  }

  async function extract(id) {
    const html = await call("POST", `/cells/${id}/extract`);
    const [cell] = insertCells(html, byId(id), "below");
    if (cell) select(cell);
  }

  // A reply edited by hand: the editor and the rendered reply swap in place.
  async function swapReply(cell, method, query, values) {
    const id = cell.dataset.id;
    const html = await call(method, `/cells/${id}/reply${query}`, values);
    const old = document.getElementById(`reply-${id}`);
    if (old) htmx.swap(old, html, SWAP("outerHTML"));
  }

  async function showAll(button) {
    const box = button.closest(".out-collapsed");
    const html = await call("GET", button.dataset.url);
    if (box && box.isConnected) htmx.swap(box, html, SWAP("outerHTML"));
  }

  // -- help -----------------------------------------------------------------------------------------

  const KEYS = window.loopbook.keys; // static/keys.js
  const help = () => document.getElementById("keys-help");
  const helpOpen = () => { const h = help(); return Boolean(h && !h.hidden); };
  function toggleHelp(show = !helpOpen()) {
    const h = help();
    if (!h) return;
    h.hidden = !show;
    if (show) h.querySelector(".close").focus();
    else if (selected()) select(selected());
  }

  // A key as the help shows it: "Mod+Shift+ArrowUp" is "Ctrl/Cmd+Shift+↑", "P" is "Shift+P".
  const SHOWN = { Mod: "Ctrl/Cmd", ArrowUp: "↑", ArrowDown: "↓", Escape: "Esc" };
  const shown = (key) => key.split("+").map((k) => SHOWN[k] || (/^[A-Z]$/.test(k) ? "Shift+" + k : k)).join("+");

  function fillHelp() {
    const box = help() && help().querySelector(".help-box");
    if (!box) return;
    const el = (tag, cls, text) => Object.assign(document.createElement(tag), { className: cls, textContent: text });
    for (const [title, rows] of Object.values(KEYS)) {
      const section = el("div", "key-section");
      section.append(el("h2", "", title));
      for (const [keys, what] of rows) {
        const row = el("div", "key-row");
        row.append(el("span", "keys", keys.map(([key]) => shown(key)).join("  ·  ")), el("span", "what", what));
        section.append(row);
      }
      box.append(section);
    }
  }

  // -- keys -----------------------------------------------------------------------------------------

  let lastKey = null, lastKeyAt = 0;
  function pressedTwice(key) {
    const now = Date.now();
    const twice = lastKey === key && now - lastKeyAt < DOUBLE_KEY_MS;
    lastKey = twice ? null : key;
    lastKeyAt = now;
    return twice;
  }

  // A key event named as static/keys.js names keys: "Mod+Shift+Enter", "Alt+Enter", "P", "?", "Mod+s".
  function keyName(e) {
    const mod = e.ctrlKey || e.metaKey, char = e.key.length === 1;
    return [mod && "Mod", e.altKey && "Alt", e.shiftKey && !char && "Shift", mod && char ? e.key.toLowerCase() : e.key]
      .filter(Boolean).join("+");
  }
  const bound = (mode) => new Map(KEYS[mode][1].flatMap(([keys]) => keys).filter(([, act]) => act));
  const COMMAND_KEYS = bound("command");

  // What each action of static/keys.js does, on the selected cell (and its id).
  const COMMANDS = {
    edit: (cell) => startEdit(cell),
    run: (cell) => runCell(cell),
    "run-next": (cell) => runCell(cell, { then: "next" }),
    "run-insert": (cell) => runCell(cell, { then: "insert" }),
    "solve-or-fix": (cell) => solveOrFix(cell),
    solve: (cell) => {
      if (cell && cell.dataset.type === "prompt") solveOrFix(cell);
      else toast("s solves a prompt cell (p makes this cell a prompt).");
    },
    fix: (cell) => {
      if (cell && cell.dataset.type === "code") solveOrFix(cell);
      else toast("f fixes a code cell whose run failed.");
    },
    "select-up": (cell) => cell && select(prevCell(cell) || cell),
    "select-down": (cell) => cell && select(nextCell(cell) || cell),
    "select-first": () => select(allCells()[0]),
    "select-last": () => select(allCells().at(-1)),
    "move-up": (cell, id) => id && move(id, -1),
    "move-down": (cell, id) => id && move(id, 1),
    "add-above": (cell, id) => addCell(id, "above"),
    "add-below": (cell, id) => addCell(id, "below"),
    delete: (cell, id) => id && deleteCell(id),
    "undo-delete": () => undoDelete(),
    cut: (cell, id) => id && deleteCell(id, { cut: true }),
    copy: (cell, id) => id && copyCell(id),
    "paste-below": (cell, id) => paste(id, "below"),
    "paste-above": (cell, id) => paste(id, "above"),
    "to-code": (cell, id) => id && setType(id, "code"),
    "to-note": (cell, id) => id && setType(id, "note"),
    "to-prompt": (cell, id) => id && setType(id, "prompt"),
    pin: (cell, id) => id && toggle(id, "pinned"),
    skip: (cell, id) => id && toggle(id, "skipped"),
    "run-above": (cell) => cell && runAll(cell),
    interrupt: () => interrupt(),
    restart: () => restart(),
    save: (cell) => cell && flush(cell).then(() => toast("Saved.")),
    help: () => toggleHelp(true),
    escape: (cell) => leaveEdit(cell),
  };

  // Command-mode keys. Each key becomes an action that runs in order after the edits before it, on
  // the cell selected by then: "b p Enter" adds a cell, makes *it* a prompt and edits it, however fast
  // it is typed. Keys the map does not bind are the browser's (copy, find, ...).
  function commandKey(e) {
    const name = keyName(e);
    const twice = COMMAND_KEYS.get(`${name} ${name}`);
    if (twice) return pressedTwice(name) ? COMMANDS[twice] : () => {};
    lastKey = null;
    if (name === "Escape") return () => {};
    const act = COMMAND_KEYS.get(name);
    if (act === "edit") expectEdit();
    return act ? COMMANDS[act] : null;
  }

  document.addEventListener("keydown", (e) => {
    if (!dialogPage() || e.defaultPrevented || e.isComposing) return;
    if (helpOpen()) {
      if (e.key === "Escape" || e.key === "?" || e.key === "h") { e.preventDefault(); toggleHelp(false); }
      return;
    }
    const t = e.target;
    if (t.closest && t.closest(".cm-editor, input, textarea, select, a[href], summary, iframe, [contenteditable]")) {
      // Esc on a control inside a cell (a link, the attempts' summary) is back to command mode there.
      const cell = e.key === "Escape" && !t.closest(".cm-editor") ? cellOf(t) : null;
      if (cell) { e.preventDefault(); select(cell); }
      return;
    }
    if (t.matches && t.matches("button") && (e.key === "Enter" || e.key === " ")) return;
    if (typeahead && !e.ctrlKey && !e.metaKey && !e.altKey) {
      const typed = e.key.length === 1 ? e.key : e.key === "Enter" && !e.shiftKey ? "\n" : null;
      if (typed !== null) { typeahead.push(typed); e.preventDefault(); return; }
      if (e.key === "Backspace") { typeahead.pop(); e.preventDefault(); return; }
    }
    const action = commandKey(e);
    if (!action) return;
    e.preventDefault();
    serial(() => {
      let cell = selected();
      if (!cell) { cell = allCells()[0] || null; if (cell) select(cell); }
      return action(cell, cell ? cell.dataset.id : null);
    });
  });

  // The editor's keys (edit mode), reported as loopbook:<action> events, in order with the command keys.
  for (const act of new Set(bound("edit").values())) {
    document.addEventListener("loopbook:" + act, (e) => {
      const cell = cellOf(e.target);
      if (cell) serial(() => COMMANDS[act](cell, cell.dataset.id));
    });
  }

  // -- mouse and focus ------------------------------------------------------------------------------

  const ACTIONS = {
    run: (cell) => runCell(cell),
    ask: (cell) => runCell(cell),
    solve: (cell) => solveOrFix(cell),
    fix: (cell) => solveOrFix(cell),
    stop: (cell) => call("POST", `/cells/${cell.dataset.id}/stop`).catch(() => {}),
    test: (cell) => serial(() => toggle(cell.dataset.id, "is_test")),
    pin: (cell) => serial(() => toggle(cell.dataset.id, "pinned")),
    skip: (cell) => serial(() => toggle(cell.dataset.id, "skipped")),
    up: (cell) => serial(() => move(cell.dataset.id, -1)),
    down: (cell) => serial(() => move(cell.dataset.id, 1)),
    "add-below": (cell) => serial(() => addCell(cell.dataset.id, "below", "code", { edit: true })),
    delete: (cell) => serial(() => deleteCell(cell.dataset.id)),
    extract: (cell) => serial(() => extract(cell.dataset.id)),
    "edit-reply": (cell) => swapReply(cell, "GET", "?edit=1").then(() => {
      const box = cell.querySelector(".reply-source");
      if (box) box.focus();
    }).catch(() => {}),
    "save-reply": (cell) => {
      const box = cell.querySelector(".reply-source");
      return swapReply(cell, "POST", "", { reply: box.value, base: box.defaultValue }).catch(() => {});
    },
    "cancel-reply": (cell) => swapReply(cell, "GET", "").catch(() => {}),
    "show-all": (cell, el) => showAll(el).catch(() => {}),
    "add-code": () => serial(() => addCell(null, "end", "code", { edit: true })),
    "add-note": () => serial(() => addCell(null, "end", "note", { edit: true })),
    "add-prompt": () => serial(() => addCell(null, "end", "prompt", { edit: true })),
    "run-all": () => runAll(null),
    interrupt: () => interrupt().catch(() => {}),
    restart: () => { if (window.confirm("Restart the kernel? Its variables are lost.")) restart().catch(() => {}); },
    help: () => toggleHelp(),
  };

  document.addEventListener("click", (e) => {
    if (!dialogPage()) return;
    const el = e.target.closest("[data-act]");
    const cell = cellOf(e.target);
    if (el && el.tagName !== "SELECT" && ACTIONS[el.dataset.act]) {
      e.preventDefault();
      if (cell) select(cell, { scroll: false });
      ACTIONS[el.dataset.act](cell, el);
      return;
    }
    if (cell && !e.target.closest(".cm-editor, a, button, select, iframe, input, summary")) {
      select(cell, { scroll: false });
    }
  });

  document.addEventListener("change", (e) => {
    if (e.target.matches && e.target.matches("select[data-act=type]")) {
      const cell = cellOf(e.target);
      if (cell) serial(() => setType(cell.dataset.id, e.target.value));
    }
  });

  document.addEventListener("dblclick", (e) => {
    const cell = cellOf(e.target);
    if (cell && e.target.closest(".md-view")) startEdit(cell);
  });

  document.addEventListener("focusin", (e) => {
    const cell = cellOf(e.target);
    if (!cell) return;
    if (cell.dataset.id !== selectedId || !cell.classList.contains("selected")) select(cell, { focus: false, scroll: false });
    if (e.target.closest(".cm-editor")) cell.classList.add("editing");
  });

  // Focus leaving a cell's editor for somewhere outside the cell ends edit mode there.
  document.addEventListener("focusout", (e) => {
    const cell = cellOf(e.target);
    if (!cell || !e.target.closest(".cm-editor")) return;
    setTimeout(() => {
      if (!cell.isConnected) return;
      const now = document.activeElement;
      if (now && cell.contains(now)) {
        if (!now.closest(".cm-editor")) cell.classList.remove("editing");
        return;
      }
      if (!document.hasFocus()) return; // the window lost focus: still editing when it comes back
      cell.classList.remove("editing");
      renderIfChanged(cell);
    }, 0);
  });

  document.addEventListener("input", (e) => {
    const ta = e.target;
    if (!ta.matches || !ta.matches(SOURCE)) return;
    const cell = cellOf(ta);
    if (cell) scheduleSave(cell.dataset.id);
  });

  // A cell swapped in by a stream (a finished reply or Solve) keeps the selection and queue marks.
  document.addEventListener("htmx:load", (e) => {
    const el = e.detail && e.detail.elt;
    if (!el || !el.matches || !el.matches(CELL)) return;
    if (el.dataset.id === selectedId) {
      el.classList.add("selected");
      placeToolbar(el);
      if (!document.activeElement || document.activeElement === document.body) el.focus({ preventScroll: true });
    }
    if (queue.some((job) => job.id === el.dataset.id)) el.classList.add("queued");
    if (current && current.id === el.dataset.id) el.classList.add("running");
  });

  // Fragments the server sends to #toast (htmx-driven requests) fade like the others.
  document.addEventListener("htmx:afterSwap", (e) => {
    const box = e.detail.target;
    if (box && box.id === "toast") {
      for (const msg of box.querySelectorAll(".toast-msg")) setTimeout(() => msg.remove(), 9000);
    }
  });

  // Renaming: the tab title follows the dialog's.
  document.addEventListener("htmx:afterRequest", (e) => {
    const form = e.detail.elt;
    if (form && form.matches && form.matches("form.rename") && e.detail.successful) {
      const input = form.querySelector("input[name=title]");
      if (input) document.title = `${input.value} · Loopbook`;
    }
  });

  // Unsaved typing is sent on the way out.
  window.addEventListener("pagehide", () => {
    for (const id of [...saveTimers.keys()]) {
      clearTimeout(saveTimers.get(id));
      const cell = byId(id);
      if (!cell) continue;
      fetch(`/cells/${id}`, { method: "PUT", keepalive: true, credentials: "same-origin",
        headers: { "HX-Request": "true", "X-Loopbook-Tab": TAB },
        body: new URLSearchParams({ source: sourceOf(cell), base: savedSource(cell) }) });
    }
  });

  // -- home page ------------------------------------------------------------------------------------

  document.addEventListener("keydown", (e) => {
    if (dialogPage() || e.key !== "/" || e.defaultPrevented) return;
    if (e.target.closest && e.target.closest("input, textarea, select, [contenteditable]")) return;
    const search = document.querySelector("form.search input[type=search]");
    if (search) { e.preventDefault(); search.focus(); }
  });

  // -- start ----------------------------------------------------------------------------------------

  function start() {
    for (const msg of document.querySelectorAll("#toast .toast-msg")) setTimeout(() => msg.remove(), 9000);
    if (!dialogPage()) return;
    fillHelp();
    watchLazy();
    for (const box of document.querySelectorAll('.outputs[data-live="run"]')) {
      const cell = cellOf(box);
      if (cell) followRun(cell.dataset.id);
    }
    const wanted = /^#cell-(\d+)$/.exec(location.hash);
    const cells = allCells();
    const first = (wanted && byId(wanted[1])) || cells[0];
    if (first) {
      select(first, { scroll: Boolean(wanted) });
      // A new dialog opens on its one empty cell, ready to type in.
      if (cells.length === 1 && first.dataset.type === "code" && !sourceOf(first).trim()) startEdit(first);
    }
    setInterval(() => { if (!document.hidden && !current) refreshKernel(); }, KERNEL_POLL_MS);
  }

  window.loopbook = Object.assign(window.loopbook || {}, {
    page: { select, selected, startEdit, leaveEdit, runCell, flush, queue: () => queue.map((j) => ({ ...j })) },
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
