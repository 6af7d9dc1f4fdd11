"""Execution feedback, one job per subpackage: workspace (what the page drives), loop, eval, export, adapters,
finetune; traces.py (the trace store, which all may use); settings.py (the one settings table: each key's type,
range and default; the page, the loop and eval read it); __main__.py (`python -m execfeedback COMMAND`). Imports
point down that list, to dialog, kernels and local_model at the bottom, never at a cli module: MAY_IMPORT in
tests/test_layout_imports.py is the table."""
