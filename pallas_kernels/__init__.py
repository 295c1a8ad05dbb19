"""ATMM: batched heterogeneous-rank LoRA as Pallas kernels for GPU (Triton) and TPU (Mosaic).

Depends on nothing else of the project.
"""
from pallas_kernels.api import BACKENDS, batched_lora, lora_projection, resolve_backend
from pallas_kernels.tiles import ShapeKey, Tiles, TileTable

__all__ = ["BACKENDS", "ShapeKey", "TileTable", "Tiles", "batched_lora", "lora_projection",
           "resolve_backend"]
