"""The server under test: vLLM's process, shape-only models, quantized checkpoints."""
