// Loopbook's page behaviour: what the editor's key events mean, and small htmx glue.
(function () {
  "use strict";

  function cellOf(el) { return el && el.closest ? el.closest("article.cell") : null; }

  function runCell(cell) {
    const run = cell && cell.querySelector(":scope > .cell-toolbar .run");
    if (run) { cell.classList.add("running"); htmx.trigger(run, "click"); }
  }

  function nextCell(cell) {
    let next = cell.nextElementSibling;
    while (next && !next.matches("article.cell")) next = next.nextElementSibling;
    return next;
  }

  document.addEventListener("loopbook:run", (e) => runCell(cellOf(e.target)));
  document.addEventListener("loopbook:run-next", (e) => {
    const cell = cellOf(e.target);
    runCell(cell);
    const next = cell && nextCell(cell);
    if (next && window.loopbook && window.loopbook.editors) window.loopbook.editors.focus(next);
  });
  document.addEventListener("loopbook:escape", (e) => {
    const cell = cellOf(e.target);
    if (!cell) return;
    cell.classList.remove("editing");
    if (window.loopbook && window.loopbook.editors) window.loopbook.editors.blur(cell);
    cell.focus();
  });

  // Notes show rendered markdown until clicked; the editor shows while editing.
  document.addEventListener("dblclick", (e) => {
    const cell = cellOf(e.target);
    if (cell && cell.dataset.type === "note") {
      cell.classList.add("editing");
      if (window.loopbook && window.loopbook.editors) window.loopbook.editors.focus(cell);
    }
  });

  document.addEventListener("htmx:afterRequest", (e) => {
    const cell = cellOf(e.detail.elt);
    if (cell) cell.classList.remove("running");
  });

  // Toasts fade on their own.
  document.addEventListener("htmx:afterSwap", (e) => {
    if (e.detail.target && e.detail.target.id === "toast") {
      setTimeout(() => { e.detail.target.innerHTML = ""; }, 5000);
    }
  });
})();
