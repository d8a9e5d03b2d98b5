"""Editing and unlearning by training only localized parameters (masked optax, losses, LoRA)."""
