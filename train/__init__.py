"""Accuracy-aware adapter generation (`python -m train`)."""
