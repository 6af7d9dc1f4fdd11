// Entry for static/vendor/codemirror.js: the CodeMirror 6 pieces Loopbook's editor.js uses,
// bundled into one minified IIFE that defines `window.CM`, so the page needs no network and no
// module loader.
//
// Rebuild (reproducible: exact versions in package.json, integrity hashes in package-lock.json):
//     static/build/build.sh
// which runs `npm ci`, then
//     npx esbuild codemirror-entry.js --bundle --format=iife --global-name=CM --minify
//         --target=es2020 --legal-comments=eof --outfile=../vendor/codemirror.js
// and copies htmx.org and htmx-ext-sse from node_modules, then rewrites ../vendor/LICENSES.md
// from the packages esbuild actually bundled (licenses.mjs).
//
// To upgrade: bump the exact versions in package.json, `npm install` in static/build to refresh
// the lockfile, run build.sh, and run tests/test_static_*.py.
//
// The `codemirror` meta package is deliberately not used: its npm `latest` (6.65.7) is a
// mispublished CodeMirror 5 build. The pieces of its basicSetup are imported one by one instead.

export { EditorState, Compartment, Prec, StateEffect, Annotation } from "@codemirror/state";
export {
  EditorView,
  keymap,
  placeholder,
  lineNumbers,
  highlightActiveLine,
  highlightActiveLineGutter,
  highlightSpecialChars,
  drawSelection,
  dropCursor,
  rectangularSelection,
  crosshairCursor,
} from "@codemirror/view";
export {
  defaultKeymap,
  history,
  historyKeymap,
  indentWithTab,
  indentMore,
  indentLess,
  insertNewlineAndIndent,
  undo,
  redo,
} from "@codemirror/commands";
export {
  syntaxHighlighting,
  defaultHighlightStyle,
  HighlightStyle,
  bracketMatching,
  indentOnInput,
  indentUnit,
  foldGutter,
  foldKeymap,
  LanguageDescription,
} from "@codemirror/language";
export {
  autocompletion,
  completionKeymap,
  completionStatus,
  closeCompletion,
  closeBrackets,
  closeBracketsKeymap,
} from "@codemirror/autocomplete";
export { tags } from "@lezer/highlight";
export { python, pythonLanguage } from "@codemirror/lang-python";
export { markdown, markdownLanguage } from "@codemirror/lang-markdown";
