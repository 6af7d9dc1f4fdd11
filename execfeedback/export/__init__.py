"""Dataset export: exporter runs one into an ExportReport (report), which card renders as the dataset card; hygiene,
rows, schema, options, source, split, writers and parallel are its parts; cli is `python -m execfeedback export`.
May import traces and dialog."""
