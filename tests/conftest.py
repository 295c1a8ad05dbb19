"""Test-wide setup: 8 virtual CPU devices, so sharded (mesh) tests run on a laptop or CI, and one
JAX compilation cache for the run.

Both must be set before jax is imported anywhere; single-device tests simply use device 0. Many
tests compile the same small programs (a tiny model's step, a kernel at a test shape), in both xdist
workers: a persistent cache in a fresh directory, made by the first process (the xdist controller,
whose environment the workers inherit) and removed when it ends, compiles each once per run (about
a fifth of tests/adapters' time). Every run starts from an empty cache.

jax writes a cache entry without a lock unless the cache has a size limit, and a limit costs a scan
of the whole directory at every write. So a worker may, rarely, read an entry the other is still
writing: jax then warns and compiles the program itself. That warning is filtered here; no test's
result depends on the cache.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="valora-jax-test-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import logging
import pathlib

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keep each `xdist_group` on one worker under `--dist loadgroup`: pytest-xdist 3.8 marks a group by
    renaming `item._nodeid`, which pytest 9.2 no longer reads (a node id comes from `item._id`), so without
    this the groups' tests spread over both workers and their module fixtures (a golden model, an engine
    and its compiled programs) are built twice."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        renamed = getattr(item, "_nodeid", None)
        if isinstance(renamed, str) and renamed != item.nodeid:
            item._id = coerce_node_id(renamed)


def pytest_configure(config):
    config.addinivalue_line(
        "filterwarnings", "ignore:Error reading persistent compilation cache entry:UserWarning")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """Committed reference outputs made by `make golden` (HF transformers / PEFT in PyTorch)."""
    return GOLDEN


@pytest.fixture
def root_logging():
    """For tests of CLIs whose main() configures the root logger (force=True): pytest's handlers and level
    are put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
