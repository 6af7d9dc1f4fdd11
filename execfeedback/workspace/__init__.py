"""What the page and the API drive: workspace (the store, kernels, resident model and running work, and each
operation that a page route and an API route share), cells (edits of cells), ask (a streamed reply), solve (Solve
and Fix in a dialog) and live (SSE logs).

The page's one door to the loop and the trace store: app.py holds a Workspace. May import `loop`, `traces`,
`adapters`, `settings` and the leaves.
"""
