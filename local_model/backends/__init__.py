"""The backends behind local_model's protocol: llama.cpp in process (llama, with batch for k sequences),
and two remote ones sharing remote.py (anthropic, openai). Imports only local_model's own modules."""
