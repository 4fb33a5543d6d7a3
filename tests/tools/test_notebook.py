"""The notebooks run top to bottom, and are committed without outputs.

Each notebook runs in a real Jupyter kernel (nbclient) on this interpreter, with
``JITRELAY_NOTEBOOK_SMALL=1`` and with ``JITRELAY_NOTEBOOK_SAVE`` pointing at a
temporary folder. It must show every figure, save each as a PNG, and fill its
tables with exact counts and positive rates. The kernel profiling notebook
builds 256 KiB streams and times each kernel a few times; the records notebook
starts a relay, sends 20,000 trades through it and decodes them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOK = NOTEBOOKS / "profile_kernels.ipynb"
RECORDS_NOTEBOOK = NOTEBOOKS / "records.ipynb"
KERNEL = "jitrelay-notebook-test"  # a kernel spec on this interpreter, whatever `python` means on PATH
SMALL_STREAM = 256 * 1024  # STREAM_BYTES of the notebook's small setting
FIGURES = {"kernels_by_size", "kernels_by_rejects", "kernels_by_records", "kernels_by_buffer", "kernel_stages"}
RECORDS_FIGURES = {"records_price", "records_decode"}
SMALL_TRADES = 20_000  # TRADES of the records notebook's small setting
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.timeout(900)  # kernel start and first compile on a loaded machine; not a speed limit


class Table:
    """One Markdown table the notebook displayed: its bold title, column names and rows of cells."""

    def __init__(self, markdown: str):
        lines = markdown.splitlines()
        self.title = lines[0].strip("*")
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
        self.columns = cells[0]
        self.rows = [dict(zip(self.columns, row, strict=True)) for row in cells[2:]]

    def numbers(self, column: str) -> list[float]:
        return [float(row[column].replace(",", "")) for row in self.rows]


class Executed:
    def __init__(self, notebook: nbformat.NotebookNode, saved: Path):
        self.notebook = notebook
        self.saved = saved
        outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
        self.images = [out for out in outputs if "image/png" in out.get("data", {})]
        shown = [Table(out.data["text/markdown"]) for out in outputs if "text/markdown" in out.get("data", {})]
        self.tables = {table.title.split(",")[0].split(":")[0]: table for table in shown}

    def table(self, title: str) -> Table:
        return self.tables[title]


def execute(path: Path, home: Path) -> Executed:
    """Run the notebook at ``path`` in a kernel on this interpreter, small, its figures saved under ``home``."""
    write_kernel_spec(home / "kernels" / KERNEL)
    saved = home / "img"
    notebook = nbformat.read(path, as_version=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(home))
        env.setenv("JITRELAY_NOTEBOOK_SMALL", "1")
        env.setenv("JITRELAY_NOTEBOOK_SAVE", str(saved))
        env.delenv("NUMBA_DISABLE_JIT", raising=False)
        client = NotebookClient(
            notebook,
            kernel_name=KERNEL,
            timeout=600,
            startup_timeout=120,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()  # raises CellExecutionError if any cell fails
    return Executed(notebook, saved)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    return execute(NOTEBOOK, tmp_path_factory.mktemp("jupyter"))


@pytest.fixture(scope="module")
def records_executed(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    return execute(RECORDS_NOTEBOOK, tmp_path_factory.mktemp("jupyter"))


@pytest.mark.parametrize("path", [NOTEBOOK, RECORDS_NOTEBOOK], ids=lambda path: path.stem)
def test_committed_notebook_is_clean(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 8
    assert [(cell.id, cell.outputs, cell.execution_count) for cell in code] == [(cell.id, [], None) for cell in code]
    assert notebook.metadata.kernelspec.name == "python3"
    assert 'os.environ.get("JITRELAY_NOTEBOOK_SMALL") == "1"' in code[0].source


def test_notebook_shows_and_saves_every_figure(executed: Executed):
    assert len(executed.images) == len(FIGURES)
    assert {path.stem for path in executed.saved.iterdir()} == FIGURES
    for name in FIGURES:
        assert (executed.saved / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_notebook_tables(executed: Executed):
    assert set(executed.tables) == {
        "Machine",
        "Scan by message size",
        "Scan and compact by reject share",
        "Scan by records per 256-byte message",
        "Scan by buffer size",
        "ns per message by stage",
        "Headline",
    }
    assert executed.table("Machine").rows[0]["stream"] == "256 KiB"
    assert executed.table("Machine").numbers("copy GB/s")[0] > 0


def test_throughput_by_message_size(executed: Executed):
    table = executed.table("Scan by message size")
    sizes = [int(row["message bytes"]) for row in table.rows]
    assert sizes == [40, 40, 71, 71, 1024, 1024]
    assert [row["CRC"] for row in table.rows] == ["CRC off", "CRC on"] * 3
    assert table.numbers("messages") == [SMALL_STREAM // size for size in sizes]
    for column in ("M msg/s", "GB/s", "× copy"):
        assert all(value > 0 for value in table.numbers(column)), column


def test_throughput_by_rejects_records_and_buffer(executed: Executed):
    rejects = executed.table("Scan and compact by reject share")
    assert [(row["rejected"], row["kernel"]) for row in rejects.rows] == [
        ("0%", "CRC off"),
        ("0%", "CRC on"),
        ("0%", "compact"),
        ("50%", "CRC off"),
        ("50%", "CRC on"),
        ("50%", "compact"),
        ("100%", "CRC off"),
        ("100%", "CRC on"),
    ]
    assert set(rejects.numbers("messages")) == {SMALL_STREAM // 71}
    records = executed.table("Scan by records per 256-byte message")
    assert [row["records"] for row in records.rows] == ["1", "1", "4", "4", "16", "16"]
    assert set(records.numbers("messages")) == {SMALL_STREAM // 256}
    buffer = executed.table("Scan by buffer size")
    assert [row["buffer"] for row in buffer.rows] == ["16 KiB", "64 KiB", "256 KiB"]
    for table in (rejects, records):
        assert all(value > 0 for value in table.numbers("M msg/s") + table.numbers("GB/s"))
    for column in buffer.columns[1:]:
        assert all(value > 0 for value in buffer.numbers(column)), column


def test_time_per_stage(executed: Executed):
    table = executed.table("ns per message by stage")
    assert [int(row["message bytes"]) for row in table.rows] == [40, 71, 1024]
    assert all(value >= 0 for value in table.numbers("judging"))  # a difference of two timings, floored at zero
    for column in ("framing", "CRC", "runs", "sum of the scan's stages", "one scan_into call", "compaction"):
        assert all(value > 0 for value in table.numbers(column)), column
    headline = executed.table("Headline")
    assert [row["kernel"] for row in headline.rows] == ["scan, CRC off", "scan, CRC on", "compact, 25% rejected"]
    assert all(value > 0 for value in headline.numbers("M msg/s") + headline.numbers("GB/s"))


def test_records_notebook_shows_and_saves_its_figures(records_executed: Executed):
    assert len(records_executed.images) == len(RECORDS_FIGURES)
    assert {path.stem for path in records_executed.saved.iterdir()} == RECORDS_FIGURES
    for name in RECORDS_FIGURES:
        assert (records_executed.saved / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_records_notebook_receives_every_trade_and_decodes_each_batch(records_executed: Executed):
    assert set(records_executed.tables) == {"Received", "The hour", "Decode per received batch"}
    received = records_executed.table("Received").rows[0]
    assert (received["trades"], received["wrong size"], received["the one more"]) == ("20,000", "0", "1")
    assert received["its price"] == "57342.10000000"  # publish_record's "57342.1", exactly
    hour = records_executed.table("The hour")
    assert hour.numbers("trades") == [SMALL_TRADES]
    assert 0 < hour.numbers("low")[0] <= hour.numbers("VWAP")[0] <= hour.numbers("high")[0]
    assert hour.numbers("stamp after trade, µs") == [40.0]  # the header stamps publish_records was given
    decode = records_executed.table("Decode per received batch")
    assert [row["decode"] for row in decode.rows] == [
        "records.decode (view)",
        "records.decode(copy=True)",
        "struct.unpack_from loop",
    ]
    assert decode.numbers("trades") == [SMALL_TRADES] * 3
    assert all(value > 0 for value in decode.numbers("M trades/s") + decode.numbers("median µs a batch"))
    assert decode.rows[2]["× struct"] == "1.00"
