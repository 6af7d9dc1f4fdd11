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
        const run = act !== "escape" ? (view) => report(textarea, view, "loopbook:" + act)
          // An open completion list closes first; the next Escape goes to the page.
          : (view) => CM.completionStatus(view.state) === "active" ? CM.closeCompletion(view)
            : report(textarea, view, "loopbook:escape");
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
      // Completion only on request (Ctrl+Space): a popup that opens while typing would take Enter.
      CM.autocompletion({ activateOnTyping: false }),
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
