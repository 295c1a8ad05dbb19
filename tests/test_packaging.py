"""A wheel ships the data the code looks up beside its packages: the tile tables and the default task
file live in `configs/`, which `pyproject.toml` installs as package data of a `configs` namespace package.
A new file under `configs/` that no package-data pattern names would be missing from every non-editable
install, where the kernels would fall back to heuristic tiles with only a warning."""
import pathlib
import tomllib

from pallas_kernels import tiles
from train import task_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _setuptools_config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_config_file_is_package_data_of_the_wheel():
    setuptools = _setuptools_config()
    assert "configs*" in setuptools["packages"]["find"]["include"]
    patterns = setuptools["package-data"]["configs"]
    files = [path.relative_to(CONFIGS) for path in CONFIGS.rglob("*") if path.is_file()]
    assert files, "configs/ holds no files"
    unshipped = [str(path) for path in files if not any(path.match(pattern) for pattern in patterns)]
    assert not unshipped, f"add a package-data pattern for {unshipped} in pyproject.toml"


def test_the_code_looks_up_its_data_inside_configs():
    assert tiles.TABLE_DIR.is_relative_to(CONFIGS) and tiles.TABLE_DIR.is_dir()
    assert task_config.DEFAULT_TASKS_FILE.is_relative_to(CONFIGS) and task_config.DEFAULT_TASKS_FILE.is_file()
