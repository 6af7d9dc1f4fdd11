"""LoRA adapters: registry (rows in the store, files in DATA_DIR/adapters), gguf_file (their GGUF files), cli (the
`adapter` command). May import traces and the leaves (dialog, local_model); never torch."""
