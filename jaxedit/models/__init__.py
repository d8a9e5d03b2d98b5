"""Model core: configs, the pure forward, checkpoints (HF safetensors, GGUF), the registry."""
