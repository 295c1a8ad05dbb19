"""Test-wide setup: 8 virtual CPU devices, so sharded (mesh) tests run on a laptop or CI.

The flag must be set before jax is imported anywhere; single-device tests simply use device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import pathlib

import pytest

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """Committed reference outputs made by `make golden` (HF transformers / PEFT in PyTorch)."""
    return GOLDEN
