"""Attacks on an edit: relearning (method.md §5.8) and soft prompts (§5.7)."""
