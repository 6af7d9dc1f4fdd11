"""What the page and the API drive: workspace (the store, kernels, resident model and running work, and each
operation that a page route and an API route share), cells (edits of cells), ask (a streamed reply), solve (Solve
and Fix in a dialog), live (SSE logs), and settings, the one settings table.

The page's one door to the loop and the trace store: app.py holds a Workspace. May import `loop`, `traces`,
`adapters` and the leaves. settings.py imports only the leaves: `loop` and `eval` read it too.
"""
