"""Qwen2-VL and Qwen2.5-VL: config, vision encoder, model, host-side inputs, processor, registry entries."""
