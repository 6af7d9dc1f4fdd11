"""Dataset export: the traces as SFT, preference, KTO, trajectory and correction files, with a dataset card.

exporter runs an export into an ExportReport (report), which card renders; hygiene, rows, schema, options,
source, split, writers and parallel are its parts; cli is `python -m execfeedback export`. May import
`traces` and `dialog`.
"""
