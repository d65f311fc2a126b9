"""Models: catalogue entries (ModelSpec), loading, the GGUF conversion, the adapter folder."""
