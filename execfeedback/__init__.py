"""Execution feedback, one job per subpackage: workspace (what the page drives), loop, eval, export, adapters,
finetune; traces.py (the trace store, which all may use); __main__.py (`python -m execfeedback COMMAND`). Imports
point down that list, to dialog, kernels and local_model at the bottom, never at a cli module: MAY_IMPORT in
tests/test_layout_imports.py is the table."""
