// Loopbook's cell editor: upgrades every `textarea.cell-source` into a CodeMirror 6 editor
// (window.CM, from vendor/codemirror.js), on page load and after every htmx swap.
//
// The textarea stays in the DOM, hidden, and mirrors the editor on every change (followed by an
// `input` event), so htmx forms and `hx-trigger="input ..."` keep working as if no editor existed.
// The page's edit-mode keys (static/keys.js: run, escape, ...) are not handled here: each is reported
// as a bubbling CustomEvent, loopbook:<action>, on the cell <article>, and the page decides what it means.
//
// API: window.loopbook.editors.{get, focus, blur, value, setValue, setLanguage, upgrade}. Each takes
// a cell: the <article class="cell">, any element inside it, its textarea, the article's element id
// ("cell-7") or its data-id ("7").
(function () {
  "use strict";

  const CM = window.CM;
  if (!CM) {
    console.error("loopbook: static/vendor/codemirror.js must be loaded before static/editor.js");
    return;
  }

  const SOURCE = "textarea.cell-source";
  const CELL = "article.cell";
  const LANGUAGES = ["python", "markdown"];

  // A Map, not a WeakMap, so views whose textarea left the page can be found and destroyed.
  const views = new Map(); // textarea -> EditorView
  const languageSlot = new CM.Compartment();
  // Marks programmatic edits that should update the textarea without an `input` event.
  const quiet = CM.Annotation.define();

  // Python inside ``` fences of notes and prompts is highlighted as Python.
  const fencedLanguages = [
    CM.LanguageDescription.of({ name: "python", alias: ["py", "python3", "ipython"], support: CM.python() }),
  ];

  const theme = CM.EditorView.theme({
    "&": { fontSize: "inherit", backgroundColor: "transparent" },
    "&.cm-focused": { outline: "none" },
    ".cm-scroller": {
      fontFamily: "var(--loopbook-code-font, ui-monospace, SFMono-Regular, Menlo, Consolas, monospace)",
      lineHeight: "1.45",
    },
    // One line tall when empty; otherwise the editor grows with its content (no height is set,
    // so the scroller never needs a vertical scrollbar).
    ".cm-content": { minHeight: "1.45em", padding: "4px 0" },
  });

  function languageExtension(lang) {
    if (lang === "python") return CM.python();
    if (lang === "markdown") return [CM.markdown({ codeLanguages: fencedLanguages }), CM.EditorView.lineWrapping];
    return [];
  }

  function languageOf(textarea) {
    const lang = textarea.dataset.lang;
    if (LANGUAGES.includes(lang)) return lang;
    if (lang) {
      console.warn(`loopbook: unknown data-lang="${lang}" on a cell source; editing it as plain text`);
      return null;
    }
    const cell = textarea.closest(CELL);
    return cell && cell.dataset.type === "code" ? "python" : "markdown";
  }

  // -- completion and help from the dialog's kernel -------------------------------------------------
  // Tab (after a name, ".", "[", or a quote; elsewhere it indents) and Ctrl+Space ask the kernel for
  // completions; Shift+Tab (after a name or "(") asks it for help. The kernel counts code points, the
  // editor UTF-16 units: astral characters (emoji) differ, so offsets are converted both ways.
  // Ghost text (the model's completion, below) takes Tab first when it is shown; then the kernel; then indent.

  const codePoints = (text, utf16) => [...text.slice(0, utf16)].length;
  function utf16Of(text, cp) {
    let i = 0;
    for (let n = 0; n < cp && i < text.length; n++) {
      const c = text.charCodeAt(i);
      i += c >= 0xd800 && c <= 0xdbff && i + 1 < text.length ? 2 : 1;
    }
    return i;
  }

  const dialogOf = (view) => {
    const main = document.querySelector("main.dialog");
    const cell = view.dom.closest(CELL);
    return main && cell && cell.dataset.type === "code" ? main.dataset.dialog : null;
  };

  async function askKernel(view, what, pos) {
    const did = dialogOf(view);
    if (!did) return null;
    const code = view.state.doc.toString();
    try {
      const res = await fetch(`/api/dialogs/${did}/${what}`, {
        method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code, cursor_pos: codePoints(code, pos) }),
      });
      const data = await res.json();
      return res.ok ? { code, ...data } : { code, status: "error", message: data.error || `${what} failed` };
    } catch (err) {
      return { code, status: "error", message: "The Loopbook server did not answer." };
    }
  }

  // One note or help panel under the editor of a cell: plain text (textContent), gone on the next edit or Escape.
  function showPanel(view, kind, parts) {
    closePanel(view);
    const box = document.createElement("div");
    box.className = `kernel-panel kernel-${kind}`;
    box.setAttribute("role", kind === "help" ? "tooltip" : "status");
    for (const [cls, text] of parts) {
      if (!text) continue;
      const el = document.createElement(cls === "kernel-sig" ? "pre" : "div");
      el.className = cls;
      el.textContent = text;
      box.append(el);
    }
    view.dom.after(box);
    return box;
  }
  function closePanel(view) {
    const next = view.dom.nextElementSibling;
    if (next && next.classList.contains("kernel-panel")) { next.remove(); return true; }
    return false;
  }

  const KIND = { module: "namespace", instance: "variable", statement: "variable", param: "variable",
    path: "text", "dict key": "property", magic: "keyword" };

  // CodeMirror's completion source: the kernel's matches, in its order (not filtered again).
  async function kernelCompletions(context) {
    const view = context.view;
    if (!view || !dialogOf(view)) return null;
    const res = await askKernel(view, "complete", context.pos);
    if (!res || context.aborted) return null;
    if (res.status !== "ok") {
      showPanel(view, "note", [["kernel-msg", res.message || `No completions (${res.status}).`]]);
      return null;
    }
    if (!res.items.length) {
      showPanel(view, "note", [["kernel-msg", "No completions here."]]);
      return null;
    }
    const from = utf16Of(res.code, res.cursor_start), to = utf16Of(res.code, res.cursor_end);
    return {
      from, to, filter: false,
      options: res.items.map((it) => ({ label: it.text, type: KIND[it.type] || it.type || undefined,
        detail: it.signature || undefined })),
    };
  }

  const keyRun = (keymap, key) => (keymap.find((b) => b.key === key) || {}).run;
  const startCompletion = keyRun(CM.completionKeymap, "Ctrl-Space");
  const acceptCompletion = keyRun(CM.completionKeymap, "Enter");

  function complete(view, { fromTab = false } = {}) {
    if (!dialogOf(view)) return false;
    if (CM.completionStatus(view.state) === "active") { acceptCompletion(view); return true; }
    const sel = view.state.selection.main;
    if (fromTab) {
      if (!sel.empty) return false; // Tab indents a selection
      const before = view.state.sliceDoc(Math.max(0, sel.head - 1), sel.head);
      if (!/[\w.\['"]/.test(before)) return false; // at the start of a line or after a space: indent
    }
    return startCompletion(view);
  }

  function help(view) {
    if (!dialogOf(view)) return false;
    const sel = view.state.selection.main;
    const before = view.state.sliceDoc(Math.max(0, sel.head - 1), sel.head);
    if (!sel.empty || !/[\w.(]/.test(before)) return false; // Shift+Tab dedents instead
    askKernel(view, "inspect", sel.head).then((res) => {
      if (!res) return;
      if (res.status !== "ok" || !res.found) {
        showPanel(view, "note", [["kernel-msg", res.message || `No help (${res.status}).`]]);
      } else if (res.signature || res.docstring) {
        showPanel(view, "help", [["kernel-sig", res.signature], ["kernel-doc", res.docstring]]);
      } else {
        showPanel(view, "help", [["kernel-doc", res.text]]);
      }
    });
    return true;
  }

  // -- ghost text: the model's completion at the cursor ---------------------------------------------
  // After a pause in typing (main.dialog's data-ghost-delay, in ms; 0: only on request) or on Alt+., the
  // resident model is asked for a completion at the cursor of a code or prompt cell (POST
  // /api/dialogs/{id}/ghost). It shows dimmed after the cursor; Tab takes it; Esc, typing on or moving
  // the cursor drops it. What became of it is reported (/ghost/outcome): "accepted" when Tab takes it,
  // then "edited" (with the text it became) if, within EDIT_WINDOW_MS and EDIT_WINDOW_EDITS edits of the
  // cell, whichever ends first, an edit deletes or replaces any of its characters or inserts inside it
  // (typing on at its ends is not editing it); "dropped" when it goes without Tab. A suggestion that
  // arrives after the text or the cursor moved is never shown (and is reported dropped).
  // The vendored CodeMirror bundle has no decorations, so the ghost is an element laid over the editor,
  // never part of the document.

  const EDIT_WINDOW_MS = 5000, EDIT_WINDOW_EDITS = 20;
  const ghostTaken = CM.Annotation.define();
  const ghosts = new WeakMap(); // view -> the suggestion shown: { did, id, text, pos, el }
  const ghostAsks = new WeakMap(); // view -> { timer, abort }: the ask waiting or under way
  const watches = new WeakMap(); // view -> an accepted suggestion watched for edits: { did, id, from, to, until, left }

  function ghostWhere(view) {
    const main = document.querySelector("main.dialog");
    const cell = view.dom.closest(CELL);
    if (!main || !cell || !["code", "prompt"].includes(cell.dataset.type) || !cell.dataset.id) return null;
    return { did: main.dataset.dialog, mid: Number(cell.dataset.id) };
  }

  function ghostDelay() {
    const main = document.querySelector("main.dialog");
    const ms = main ? parseInt(main.dataset.ghostDelay ?? "0", 10) : 0;
    return Number.isFinite(ms) && ms > 0 ? ms : 0;
  }

  function reportGhost(did, id, outcome, final) {
    if (!id) return;
    fetch(`/api/dialogs/${did}/ghost/outcome`, {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(final == null ? { id, outcome } : { id, outcome, final }),
    }).catch(() => {});
  }

  function hideGhost(view) {
    const g = ghosts.get(view);
    if (!g) return null;
    ghosts.delete(view);
    g.el.remove();
    return g;
  }

  function dropGhost(view) {
    const g = hideGhost(view);
    if (g) reportGhost(g.did, g.id, "dropped");
    return Boolean(g);
  }

  function cancelGhostAsk(view) {
    const ask = ghostAsks.get(view);
    if (!ask) return;
    clearTimeout(ask.timer);
    if (ask.abort) ask.abort.abort();
    ghostAsks.delete(view);
  }

  // The first line starts at the cursor, the others where the cursor's line starts (text-indent).
  function placeGhost(view, g) {
    const at = view.coordsAtPos(g.pos);
    const start = view.coordsAtPos(view.state.doc.lineAt(g.pos).from);
    if (!at || !start) return false;
    const box = view.dom.getBoundingClientRect();
    Object.assign(g.el.style, { left: `${start.left - box.left}px`, top: `${at.top - box.top}px`,
      textIndent: `${at.left - start.left}px` });
    return true;
  }

  function showGhost(view, g) {
    dropGhost(view);
    g.el = document.createElement("div");
    g.el.className = "ghost-text";
    g.el.setAttribute("aria-hidden", "true");
    g.el.dataset.completion = g.id;
    g.el.textContent = g.text;
    view.dom.append(g.el);
    if (!placeGhost(view, g)) { g.el.remove(); reportGhost(g.did, g.id, "dropped"); return; }
    ghosts.set(view, g);
  }

  async function askGhost(view, { explicit = false } = {}) {
    const where = ghostWhere(view);
    const sel = view.state.selection.main;
    if (!where || !sel.empty) return false;
    cancelGhostAsk(view);
    const abort = new AbortController();
    ghostAsks.set(view, { abort });
    const text = view.state.doc.toString(), pos = sel.head;
    let data;
    try {
      const res = await fetch(`/api/dialogs/${where.did}/ghost`, {
        method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
        signal: abort.signal,
        body: JSON.stringify({ message_id: where.mid, text, cursor: codePoints(text, pos) }),
      });
      data = await res.json();
      if (!res.ok) data = { status: "error", message: data.error || "Ghost text failed." };
    } catch (err) {
      if (abort.signal.aborted) return true;
      data = { status: "error", message: "The Loopbook server did not answer." };
    }
    if (ghostAsks.get(view) && ghostAsks.get(view).abort !== abort) return true; // a newer ask took over
    ghostAsks.delete(view);
    const moved = view.state.doc.toString() !== text || view.state.selection.main.head !== pos;
    if (data.status === "ok" && data.text && !moved) {
      showGhost(view, { did: where.did, id: data.id, text: data.text, pos });
    } else {
      if (data.id) reportGhost(where.did, data.id, "dropped");
      // Busy (the model is answering) shows nothing; asked for by key, any other reason is said.
      if (explicit && !moved && data.status !== "busy") {
        showPanel(view, "note", [["kernel-msg", data.message || "The model has no suggestion here."]]);
      }
    }
    view.dom.dataset.ghost = data.status; // what the last ask came back with (tests and curious readers)
    return true;
  }

  function acceptGhost(view) {
    const g = ghosts.get(view);
    if (!g) return false;
    if (view.state.selection.main.head !== g.pos || !view.state.selection.main.empty) { dropGhost(view); return false; }
    hideGhost(view);
    view.dispatch({ changes: { from: g.pos, insert: g.text }, selection: { anchor: g.pos + g.text.length },
      annotations: ghostTaken.of(true), userEvent: "input.complete", scrollIntoView: true });
    reportGhost(g.did, g.id, "accepted");
    watches.set(view, { did: g.did, id: g.id, from: g.pos, to: g.pos + g.text.length,
      until: Date.now() + EDIT_WINDOW_MS, left: EDIT_WINDOW_EDITS });
    return true;
  }

  function watchEdits(update) {
    const w = watches.get(update.view);
    if (!w) return;
    if (Date.now() > w.until || w.left <= 0) { watches.delete(update.view); return; }
    let edited = false;
    update.changes.iterChangedRanges((fromA, toA) => {
      if ((fromA < w.to && toA > w.from) || (fromA === toA && fromA > w.from && fromA < w.to)) edited = true;
    });
    if (edited) {
      const from = update.changes.mapPos(w.from, -1), to = update.changes.mapPos(w.to, 1);
      reportGhost(w.did, w.id, "edited", update.state.sliceDoc(from, to));
      watches.delete(update.view);
      return;
    }
    w.from = update.changes.mapPos(w.from, 1);
    w.to = update.changes.mapPos(w.to, -1);
    w.left -= 1;
  }

  function ghostListener() {
    return CM.EditorView.updateListener.of((update) => {
      const view = update.view;
      const taken = update.transactions.some((tr) => tr.annotation(ghostTaken));
      if (update.docChanged && !taken) watchEdits(update);
      if (taken) return;
      if (ghosts.has(view) && (update.docChanged || update.selectionSet)) dropGhost(view);
      if (update.focusChanged && !view.hasFocus) { dropGhost(view); cancelGhostAsk(view); return; }
      if (update.geometryChanged && ghosts.has(view)) placeGhost(view, ghosts.get(view));
      const typed = update.transactions.some((tr) => tr.isUserEvent("input") || tr.isUserEvent("delete"));
      if (!update.docChanged || !typed) return;
      cancelGhostAsk(view);
      const delay = ghostDelay();
      if (delay && ghostWhere(view)) ghostAsks.set(view, { timer: setTimeout(() => askGhost(view), delay) });
    });
  }

  // Keys of static/keys.js whose action the editor itself carries out.
  const EDITOR_ACTIONS = {
    complete: (view, key) => complete(view, { fromTab: key === "Tab" }),
    inspect: (view) => help(view),
    ghost: (view) => { askGhost(view, { explicit: true }); return Boolean(ghostWhere(view)); },
    "ghost-accept": (view) => acceptGhost(view),
  };

  function report(textarea, view, name) {
    const cell = textarea.closest(CELL) || view.dom;
    cell.dispatchEvent(new CustomEvent(name, {
      bubbles: true,
      cancelable: true,
      detail: {
        id: cell.dataset.id ?? null,
        type: cell.dataset.type ?? null,
        source: view.state.doc.toString(),
        view,
      },
    }));
    return true;
  }

  // The edit-mode keys of static/keys.js that name an action, at the highest precedence, so Shift+Enter
  // never inserts a newline and Mod-Enter never runs CodeMirror's insertBlankLine.
  function pageKeys(textarea) {
    const keys = [];
    for (const [row] of (window.loopbook.keys ? window.loopbook.keys.edit[1] : [])) {
      for (const [key, act] of row.filter(([, a]) => a)) {
        const run = EDITOR_ACTIONS[act] ? (view) => EDITOR_ACTIONS[act](view, key)
          : act !== "escape" ? (view) => report(textarea, view, "loopbook:" + act)
          // An open completion list, then a help panel, close first; the next Escape goes to the page.
          : (view) => dropGhost(view) || (CM.completionStatus(view.state) === "active" ? CM.closeCompletion(view)
            : closePanel(view) || report(textarea, view, "loopbook:escape"));
        const name = key.replaceAll("+", "-");
        keys.push({ key: name, run });
        if (name.startsWith("Mod-")) keys.push({ key: "Ctrl-" + name.slice(4), run }); // on a Mac, Mod is Cmd
      }
    }
    return keys;
  }

  function mirror(textarea) {
    return CM.EditorView.updateListener.of((update) => {
      if (!update.docChanged) return;
      closePanel(update.view);
      textarea.value = update.state.doc.toString();
      if (update.transactions.some((tr) => tr.annotation(quiet))) return;
      textarea.dispatchEvent(new Event("input", { bubbles: true }));
    });
  }

  function extensionsFor(textarea) {
    return [
      CM.Prec.highest(CM.keymap.of(pageKeys(textarea))),
      CM.highlightSpecialChars(),
      CM.history(),
      CM.drawSelection(),
      CM.dropCursor(),
      CM.EditorState.allowMultipleSelections.of(true),
      CM.indentOnInput(),
      CM.syntaxHighlighting(CM.defaultHighlightStyle, { fallback: true }),
      CM.bracketMatching(),
      CM.closeBrackets(),
      // Completion only on request (Tab, Ctrl+Space), from the dialog's kernel: a popup that opens while
      // typing would take Enter.
      CM.autocompletion({ activateOnTyping: false, override: [kernelCompletions], interactionDelay: 0 }),
      CM.rectangularSelection(),
      CM.crosshairCursor(),
      CM.indentUnit.of("    "),
      CM.EditorState.tabSize.of(4),
      CM.keymap.of([
        ...CM.closeBracketsKeymap,
        ...CM.defaultKeymap,
        ...CM.historyKeymap,
        ...CM.completionKeymap,
        CM.indentWithTab,
      ]),
      languageSlot.of(languageExtension(languageOf(textarea))),
      // Still focusable and selectable, so a read-only cell can be copied from and run.
      CM.EditorState.readOnly.of(textarea.hasAttribute("data-readonly")),
      textarea.placeholder ? CM.placeholder(textarea.placeholder) : [],
      CM.EditorView.contentAttributes.of({
        "aria-label": textarea.getAttribute("aria-label") || "cell source",
      }),
      theme,
      mirror(textarea),
      ghostListener(),
    ];
  }

  // Where the focused editor of a cell that htmx is about to replace had its cursor, so the
  // replacement cell's editor can take the focus back.
  let pendingFocus = null;

  function upgradeOne(textarea) {
    const existing = views.get(textarea);
    if (existing) return existing;
    // A restored htmx history snapshot carries the dead DOM of an earlier editor: drop it.
    const next = textarea.nextElementSibling;
    if (next && next.classList.contains("cm-editor") && ![...views.values()].some((v) => v.dom === next)) {
      next.remove();
    }
    const view = new CM.EditorView({
      state: CM.EditorState.create({ doc: textarea.value, extensions: extensionsFor(textarea) }),
    });
    textarea.after(view.dom);
    textarea.style.display = "none";
    textarea.dataset.editor = "codemirror";
    views.set(textarea, view);
    restoreFocus(textarea, view);
    return view;
  }

  function restoreFocus(textarea, view) {
    const cell = textarea.closest(CELL);
    if (!pendingFocus || !cell || cell.dataset.id !== pendingFocus.id) return;
    if (Date.now() - pendingFocus.at > 2000) { pendingFocus = null; return; } // the cell went away
    const length = view.state.doc.length;
    const { anchor, head } = pendingFocus;
    pendingFocus = null;
    view.dispatch({ selection: { anchor: Math.min(anchor, length), head: Math.min(head, length) } });
    view.focus();
  }

  function destroy(textarea) {
    const view = views.get(textarea);
    if (!view) return;
    views.delete(textarea);
    view.destroy();
    view.dom.remove();
  }

  function sweep() {
    for (const textarea of [...views.keys()]) {
      if (!textarea.isConnected) destroy(textarea);
    }
  }

  function upgrade(root = document) {
    sweep();
    const found = [];
    if (root.matches && root.matches(SOURCE)) found.push(root);
    if (root.querySelectorAll) found.push(...root.querySelectorAll(SOURCE));
    let created = 0;
    for (const textarea of found) {
      if (!views.has(textarea)) created += 1;
      upgradeOne(textarea);
    }
    return created;
  }

  function textareaOf(cell) {
    let el = cell;
    if (typeof el === "string") {
      el = document.getElementById(el)
        || document.querySelector(`${CELL}[data-id="${CSS.escape(el)}"]`);
    }
    if (!el || !el.matches) return null;
    if (el.matches(SOURCE)) return el;
    const article = el.closest(CELL);
    return article ? article.querySelector(SOURCE) : null;
  }

  function get(cell) {
    const textarea = textareaOf(cell);
    // Lazily upgrade a textarea that arrived before htmx's load event reached it.
    return textarea && textarea.isConnected ? upgradeOne(textarea) : null;
  }

  function focus(cell) {
    const view = get(cell);
    if (!view) return false;
    view.dispatch({ selection: { anchor: view.state.doc.length }, scrollIntoView: true });
    view.focus();
    return true;
  }

  function blur(cell) {
    const view = get(cell);
    if (!view) return false;
    view.contentDOM.blur();
    return true;
  }

  function value(cell) {
    const view = get(cell);
    if (view) return view.state.doc.toString();
    const textarea = textareaOf(cell);
    return textarea ? textarea.value : null;
  }

  // notify=false updates the editor and the textarea without firing `input` (no autosave).
  function setValue(cell, text, { notify = true } = {}) {
    const view = get(cell);
    if (!view) return false;
    view.dispatch({
      changes: { from: 0, to: view.state.doc.length, insert: String(text ?? "") },
      annotations: notify ? [] : [quiet.of(true)],
    });
    return true;
  }

  function setLanguage(cell, lang) {
    if (!LANGUAGES.includes(lang)) {
      throw new Error(`loopbook.editors.setLanguage: language must be one of ${LANGUAGES.join(", ")}, got ${JSON.stringify(lang)}`);
    }
    const view = get(cell);
    if (!view) return false;
    textareaOf(cell).dataset.lang = lang;
    view.dispatch({ effects: languageSlot.reconfigure(languageExtension(lang)) });
    return true;
  }

  const api = { get, focus, blur, value, setValue, setLanguage, upgrade };
  window.loopbook = Object.assign(window.loopbook || {}, { editors: api });

  // htmx calls this before it removes an element (and for each of its descendants). The view is
  // destroyed only once its textarea has really left the page, a tick later.
  document.addEventListener("htmx:beforeCleanupElement", (event) => {
    const view = views.get(event.target);
    if (!view) return;
    if (view.hasFocus) {
      const cell = event.target.closest(CELL);
      const { anchor, head } = view.state.selection.main;
      if (cell && cell.dataset.id) pendingFocus = { id: cell.dataset.id, anchor, head, at: Date.now() };
    }
    setTimeout(sweep, 0);
  });

  if (window.htmx) {
    window.htmx.onLoad((elt) => { upgrade(elt); });
  } else {
    console.warn("loopbook: htmx is not loaded; editors are created on page load only (call loopbook.editors.upgrade() after inserting cells)");
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", () => upgrade(document));
  } else {
    upgrade(document);
  }
})();
