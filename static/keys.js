// The keyboard, declared once: the help overlay (?) is made from this list, and the page's key handlers
// (static/app.js) and the editor's (static/editor.js) look their keys up in it.
//
// A key is named as a KeyboardEvent says it, with modifiers first: "Mod" is Ctrl, or Cmd on a Mac (both
// work), "Shift" is written only for keys that are not characters ("P" is Shift+P, "?" is Shift+/), and
// "d d" is d pressed twice, quickly. Each row: [[key, action], ...] and what they do; an action null is the
// editor's own (CodeMirror's keymaps), listed here to be shown.
(function () {
  "use strict";
  window.loopbook = Object.assign(window.loopbook || {}, { keys: {
    command: ["Command mode (a cell is selected; Esc gets you here)", [
      [[["Enter", "edit"]], "edit the cell"],
      [[["Shift+Enter", "run-next"]], "run, select the next cell (adds one at the end)"],
      [[["Mod+Enter", "run"]], "run in place"],
      [[["Alt+Enter", "run-insert"]], "run, add a cell below"],
      [[["s", "solve"], ["Mod+Shift+Enter", "solve-or-fix"]], "Solve a prompt (code runs here)"],
      [[["f", "fix"]], "Fix a failed code cell"],
      [[["ArrowUp", "select-up"], ["ArrowDown", "select-down"], ["k", "select-up"], ["j", "select-down"]],
        "select the cell above / below"],
      [[["Home", "select-first"], ["End", "select-last"]], "first / last cell"],
      [[["Mod+Shift+ArrowUp", "move-up"], ["Mod+Shift+ArrowDown", "move-down"]], "move the cell up / down"],
      [[["a", "add-above"], ["b", "add-below"]], "add a cell above / below"],
      [[["d d", "delete"]], "delete the cell"],
      [[["z", "undo-delete"]], "undo the last delete"],
      [[["x", "cut"], ["c", "copy"], ["v", "paste-below"], ["V", "paste-above"]], "cut, copy, paste below / above"],
      [[["y", "to-code"], ["m", "to-note"], ["p", "to-prompt"]], "make the cell code, note, prompt"],
      [[["P", "pin"], ["S", "skip"]], "pin (survives truncation) · skip (left out of the context)"],
      [[["r", "run-above"]], "run all code cells above"],
      [[["i i", "interrupt"]], "interrupt the kernel, stop the model"],
      [[["0 0", "restart"]], "restart the kernel"],
      [[["Mod+s", "save"]], "save now"],
      [[["?", "help"], ["h", "help"]], "this list"],
    ]],
    edit: ["Edit mode (typing in a cell)", [
      [[["Escape", "escape"]], "back to command mode (a note or prompt shows rendered); first it drops ghost "
        + "text, closes a completion list or help"],
      [[["Shift+Enter", "run-next"], ["Mod+Enter", "run"], ["Alt+Enter", "run-insert"]], "as in command mode"],
      [[["Mod+Shift+Enter", "solve-or-fix"]], "Solve a prompt / Fix a code cell"],
      [[["Alt+.", "ghost"]], "ask the model for ghost text at the cursor (it also comes by itself after a pause in "
        + "typing, unless the app runs with --ghost-delay 0)"],
      [[["Tab", "ghost-accept"]], "take the ghost text; Esc, typing on or moving the cursor drops it"],
      [[["Tab", "complete"], ["Ctrl+Space", "complete"]],
        "complete from the dialog's kernel (Tab: after a name, . [ or a quote; elsewhere it indents; "
        + "in the list, Tab or Enter takes the choice). The model's ghost text, when shown, takes Tab first"],
      [[["Shift+Tab", "inspect"]], "help from the kernel: signature and docstring (after a name or "
        + "\"(\"; elsewhere it dedents); Esc closes it"],
      [[["Mod+s", "save"]], "save now (cells also save as you type)"],
    ]],
  } });
})();
