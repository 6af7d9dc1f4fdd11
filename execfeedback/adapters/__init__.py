"""LoRA adapters: the registry (rows in the store, files in DATA_DIR/adapters), their GGUF files, the `adapter` command.

May import `traces` and the leaves (`dialog`, `local_model`); never torch.
"""
