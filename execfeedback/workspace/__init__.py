"""What the page and the API drive: ask (a streamed reply), solve (Solve and Fix in a dialog), live (SSE logs).

The page's one door to the loop and the trace store: app.py takes Loop, LoopConfig, RETRY_MODES and
TraceStore from workspace.solve. May import `loop`, `traces`, `adapters` and the leaves.
"""
