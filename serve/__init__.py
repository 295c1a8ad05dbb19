"""Serving: jitted prefill/decode, mixed-adapter batches, merged/unmerged/mixture modes."""
