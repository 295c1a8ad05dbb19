"""notebooks/quickstart_tpu.ipynb, executed top to bottom on CPU by nbclient with a shortened parameter cell
(two classify tasks, a few steps, the Pallas TPU kernels in interpret mode), and stored without outputs."""

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "notebooks" / "quickstart_tpu.ipynb"
PARAMETERS = "parameters"  # the tag of the cell whose values a run may replace (papermill's convention)


def ci_parameters(out: pathlib.Path) -> str:
    """What CI puts after the parameter cell: the settings of a short CPU run. Two classify tasks that
    cannot meet their requirements in 4 steps end in two adapters, so the mixed batch mixes them."""
    return f"""
INSTALL = False
TASKS = ["colour", "shape"]
N_TRAIN, N_VAL = 16, 8
STEPS = 4
BATCH_SIZE = 8
RANK = 4
TOWERS = ["language_model"]
DATA_PARALLEL = 1
OUT = {str(out)!r}
INTERPRET = True
MIXED_ROWS = 4
SERVE_REQUESTS = 4
""".strip()


def text_of(cell) -> str:
    """A cell's printed and Markdown outputs, one after another on lines of their own."""
    return "\n".join(output.get("text", "") + output.get("data", {}).get("text/markdown", "")
                     for output in cell.outputs)


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert sum(PARAMETERS in cell.metadata.get("tags", []) for cell in code) == 1


@pytest.mark.slow
def test_the_quickstart_runs_top_to_bottom_on_cpu(tmp_path):
    notebook = nbformat.read(QUICKSTART, as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if PARAMETERS in cell.metadata.get("tags", []))
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(ci_parameters(tmp_path / "run"),
                                                            metadata={"tags": ["injected-parameters"]}))
    # Any cell that raises fails the test (CellExecutionError names the cell and shows its traceback).
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    outputs = "\n".join(text_of(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "Pallas interpret mode: True" in outputs
    assert "loaded: adapter_0 (colour), adapter_1 (shape)" in outputs or \
           "loaded: adapter_0 (shape), adapter_1 (colour)" in outputs
    assert "rows' adapters: ['adapter_0', 'adapter_1', 'adapter_0', 'adapter_1']" in outputs or \
           "rows' adapters: ['adapter_1', 'adapter_0', 'adapter_1', 'adapter_0']" in outputs
    pool_rows = re.findall(r"^\| \d+ \| (\w+) \| (adapter_\d) \| (.+?) \| .+? \|$", outputs, re.MULTILINE)
    assert [task for task, _, _ in pool_rows] == ["colour", "shape", "colour", "shape"]
    assert "wrote 4 responses" in outputs and "(0 failed)" in outputs
    # The same examples (the tasks in turn) through serve.batch's engine (the reference kernels on CPU):
    # the pool's answers with the Pallas TPU kernels agree.
    served = re.findall(r"^ *(\w+)-\d+ +(adapter_\d): (.+)$", outputs, re.MULTILINE)
    assert served == pool_rows
    assert "# Adapter report" in outputs
    assert any("image/png" in output.get("data", {}) for output in notebook.cells[-1].outputs)
