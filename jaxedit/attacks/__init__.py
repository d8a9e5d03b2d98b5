"""Attacks on an edit: relearning (method.md §5.8)."""
