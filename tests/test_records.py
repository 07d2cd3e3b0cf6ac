"""peftlab.book.records (GPU measurements kept with provenance), peftlab.files, and how the book draws a record."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import jupytext
import pytest
import torch
from nbclient import NotebookClient

from peftlab.book import plotting, records, runtime
from peftlab import files

ROOT = Path(__file__).resolve().parents[1]

PROVENANCE = {"device": "NVIDIA Test GPU", "capability": "7.5", "cuda": "12.4", "torch": "2.13.0",
              "bitsandbytes": "0.50.2", "peftlab": "0.1.0", "python": "3.12.1", "date": "2026-11-30"}


def test_save_record_without_cuda_refuses_to_invent_a_gpu(book, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        records.save_record("demo-x", {"a": 1})


def test_gpu_provenance_names_device_capability_cuda_and_date(fake_gpu):
    fake_gpu((8, 0), "NVIDIA A100")
    p = records.gpu_provenance()
    assert p["device"] == "NVIDIA A100" and p["capability"] == "8.0"
    assert set(p) == set(records._PROVENANCE_KEYS)
    assert len(p["date"]) == 10 and p["date"][4] == "-"


def test_record_round_trips_through_the_record_folder(book, monkeypatch, tmp_path):
    folder = tmp_path / "results" / "gpu"
    monkeypatch.setenv(records.RECORD_DIR_ENV, str(folder))
    path = records.save_record("demo-timing", {"ms": [1.5, 2.0], "shape": [4096, 4096]}, provenance=PROVENANCE)
    assert path == folder / "demo-timing.json"
    assert json.loads(path.read_text())["provenance"]["device"] == "NVIDIA Test GPU"
    back = records.load_record("demo-timing")
    assert back.data == {"ms": [1.5, 2.0], "shape": [4096, 4096]} and back.device == "NVIDIA Test GPU"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_without_the_variable_records_go_to_the_output_folder_and_load_from_results(book):
    path = records.save_record("demo-out", {"x": 1}, provenance=PROVENANCE)
    assert path.parent == runtime.output_dir("gpu-records")
    assert records.load_record("demo-out") is None  # the book reads results/gpu only
    (book / "results" / "gpu").mkdir(parents=True)
    shutil.copy(path, book / "results" / "gpu" / "demo-out.json")
    assert records.load_record("demo-out").data == {"x": 1}


def test_caption_says_device_capability_cuda_versions_and_date():
    text = records.Record("x", {}, PROVENANCE).caption()
    for part in ("NVIDIA Test GPU", "compute capability 7.5", "CUDA 12.4", "torch 2.13.0",
                 "bitsandbytes 0.50.2", "peftlab 0.1.0", "2026-11-30"):
        assert part in text


@pytest.mark.parametrize("data, error", [([1, 2], TypeError), ({"x": float("nan")}, ValueError),
                                         ({"x": object()}, ValueError)])
def test_save_record_refuses_data_that_is_not_plain_json(book, data, error):
    with pytest.raises(error, match="data"):
        records.save_record("demo-bad", data, provenance=PROVENANCE)
    assert not list(runtime.output_dir("gpu-records").iterdir())


def test_save_record_refuses_incomplete_provenance_and_bad_names(book):
    with pytest.raises(ValueError, match="provenance lacks .*cuda"):
        records.save_record("demo-p", {}, provenance={k: v for k, v in PROVENANCE.items() if k != "cuda"})
    with pytest.raises(ValueError, match="name"):
        records.save_record("Bad Name", {}, provenance=PROVENANCE)


def test_a_broken_record_file_is_an_error_naming_it(book):
    folder = book / "results" / "gpu"
    folder.mkdir(parents=True)
    (folder / "demo-broken.json").write_text('{"name": "demo-broken"}')
    with pytest.raises(ValueError, match="demo-broken.json"):
        records.load_record("demo-broken")
    (folder / "demo-other.json").write_text(json.dumps({"name": "x", "data": {}, "provenance": PROVENANCE}))
    with pytest.raises(ValueError, match="demo-other"):
        records.load_record("demo-other")


def _figure():
    fig, ax = plotting.new_figure()
    ax.plot([0, 1], [1, 0])
    return fig


def test_figure_from_a_record_carries_its_provenance_and_device(book):
    record = records.Record("demo", {}, PROVENANCE)
    plotting.save_figure(_figure(), "demo-gpu", "Timings.", record=record)
    (entry,) = plotting.load_figure_records()
    assert entry["gpu"] == "NVIDIA Test GPU"
    assert entry["caption"] == "Timings. " + record.caption() and "Produced on" not in entry["caption"]
    page = plotting.figures_markdown()
    assert "**GPU**: NVIDIA Test GPU" in page
    block = plotting.figure_markdown("demo-gpu")
    assert block.startswith("```{figure} ../../_static/figures/demo-gpu.svg\n:name: fig-demo-gpu\n")
    assert entry["caption"] in block


def test_figures_page_shows_a_thumbnail_linking_to_the_full_figure(book):
    plotting.save_figure(_figure(), "demo-thumb", "A line.")
    thumb = book / "_static" / "figures" / "thumbnails" / "demo-thumb.png"
    full = book / "_static" / "figures" / "demo-thumb.png"
    assert thumb.is_file() and 0 < thumb.stat().st_size < full.stat().st_size
    row = plotting.figures_markdown().splitlines()[-1]
    assert '<a href="../../_static/figures/demo-thumb.png"><img src="../../_static/figures/thumbnails/demo-thumb.png"' in row


def test_figure_markdown_refuses_a_figure_not_saved(book):
    with pytest.raises(ValueError, match="demo-none"):
        plotting.figure_markdown("demo-none")


def test_figures_display_under_their_cell_except_in_the_book_build(book, monkeypatch):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    plotting.save_figure(_figure(), "demo-a", "Shown.")
    assert len(shown) == 1
    monkeypatch.setenv(runtime.BOOK_BUILD_ENV, "1")
    plotting.save_figure(_figure(), "demo-b", "Glued only.")
    assert len(shown) == 1


def test_the_book_build_extension_marks_the_kernels_environment(monkeypatch):
    monkeypatch.setenv(runtime.BOOK_BUILD_ENV, "0")  # so that the variable is restored after the test
    monkeypatch.delenv(runtime.BOOK_BUILD_ENV)
    monkeypatch.syspath_prepend(str(ROOT / "book" / "_ext"))
    import peftlab_build

    assert not runtime.in_book_build()
    assert peftlab_build.setup(None)["parallel_read_safe"]
    assert runtime.in_book_build() and os.environ[runtime.BOOK_BUILD_ENV] == "1"


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    files.atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable by others, not mkstemp's 0600


def _synthetic_block_record() -> dict:
    """A GPU record of the memory chapter's shape, from the estimate (measured = estimate + 1 %)."""
    from transformers import LlamaConfig

    from peftlab.memory import COMPONENTS, METHODS, estimate

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1, vocab_size=32000)
    seqs = [256, 512, 1024, 2048]
    data = {"seq_lengths": seqs, "components": {}, "peak": {}}
    for m in METHODS:
        est = {s: estimate(config, m, seq=s, dtype=torch.bfloat16).as_dict() for s in seqs}
        meas = {s: {c: int(v * 1.01) for c, v in est[s].items()} for s in seqs}
        for s in seqs:
            meas[s]["total"] = sum(meas[s][c] for c in COMPONENTS)
        data["components"][m] = {"measured": meas[512], "estimated": est[512]}
        data["peak"][m] = {"measured": [meas[s]["total"] for s in seqs], "estimated": [est[s]["total"] for s in seqs]}
    return data


def _run_chapter_in(tmp_path: Path, chapter: str) -> dict:
    """Execute ``book/chapters/<chapter>.md`` inside a throwaway book root, up to the cell that
    glues ``<chapter>-gpu-section`` (what follows it cannot change it); return the glued values."""
    (tmp_path / "_config.yml").write_text("title: t\n")
    (tmp_path / "_toc.yml").write_text(f"root: intro\nchapters:\n  - file: book/chapters/{chapter}\n")
    folder = tmp_path / "book" / "chapters"
    folder.mkdir(parents=True)
    nb = jupytext.read(ROOT / "book" / "chapters" / f"{chapter}.md")
    env = {k: v for k, v in os.environ.items() if k not in (records.RECORD_DIR_ENV,)}
    env[runtime.BOOK_BUILD_ENV] = "1"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    client.km = client.create_kernel_manager()
    client.start_new_kernel(env=env)
    client.start_new_kernel_client()
    try:
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
            if f'glue("{chapter}-gpu-section"' in cell.source:
                break
        else:
            raise AssertionError(f"{chapter}.md glues no {chapter}-gpu-section")
    finally:
        client._cleanup_kernel()
    glued = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for mime, value in out.get("data", {}).items():
                if mime.startswith("application/papermill.record/"):
                    glued[out["metadata"]["scrapbook"]["name"]] = value
    return glued


def test_memory_chapter_draws_a_synthetic_gpu_record(tmp_path):
    folder = tmp_path / "results" / "gpu"
    folder.mkdir(parents=True)
    record = {"name": "memory-llama7b-block", "provenance": PROVENANCE, "data": _synthetic_block_record()}
    (folder / "memory-llama7b-block.json").write_text(json.dumps(record))
    glued = _run_chapter_in(tmp_path, "memory")
    section = glued["memory-gpu-section"]
    assert section.startswith("**Measured on a GPU.** The NVIDIA Test GPU ran the cell above")
    assert "\n\n```{figure} ../../_static/figures/memory-gpu-block.svg\n:name: fig-memory-gpu-block" in section
    assert "Measured on NVIDIA Test GPU (compute capability 7.5, CUDA 12.4) on 2026-11-30" in section
    assert "at most 1.0%" in section  # the synthetic record's 1 % departure, read back from the figure's data
    for fmt in plotting.FORMATS:
        assert (tmp_path / "_static" / "figures" / f"memory-gpu-block.{fmt}").stat().st_size > 0
    entry = json.loads((tmp_path / "_build" / ".peftlab" / "figure-records" / "memory-gpu-block.json").read_text())
    assert entry["gpu"] == "NVIDIA Test GPU"


def _synthetic_paged_record() -> dict:
    names = ("torch.optim.AdamW", "bitsandbytes PagedAdamW", "peftlab PagedAdamW")
    runs = {pressure: {name: {"ms_per_step": 2.0 + i + 10 * spike, "max_param_diff": 0.0 if i != 1 else 1e-7,
                              "paged_mib_per_step": None if i == 0 else 512.0 * spike}
                       for i, name in enumerate(names)}
            for spike, pressure in enumerate(("no spike", "a spike before every step"))}
    return {"state_mib": 512.0, "timed_steps": 9, "runs": runs}


def _synthetic_nf4_record() -> dict:
    return {"shape": [4096, 11008], "dtype": "bfloat16", "numel": 4096 * 11008, "codes_differing": 3,
            "absmax_equal": True, "dequantize_equal": True,
            "ms": {"quantize": {"peftlab (PyTorch)": 1.5, "bitsandbytes (CUDA)": 0.4},
                   "dequantize": {"peftlab (PyTorch)": 0.9, "bitsandbytes (CUDA)": 0.2}}}


@pytest.mark.parametrize("chapter, name, figure, data, says", [
    ("paged", "paged-adamw-gpu", "paged-gpu-steps", _synthetic_paged_record,
     "the package's parameters differ from torch.optim.AdamW's by at most 0.0e+00"),
    ("nf4", "nf4-gpu-timings", "nf4-gpu-timings", _synthetic_nf4_record,
     "3 of 45,088,768 codes differ from bitsandbytes' CUDA quantizer, and the absmax and the dequantized values are "
     "identical"),
])
def test_chapter_draws_a_synthetic_gpu_timing_record(tmp_path, chapter, name, figure, data, says):
    folder = tmp_path / "results" / "gpu"
    folder.mkdir(parents=True)
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "provenance": PROVENANCE, "data": data()}))
    glued = _run_chapter_in(tmp_path, chapter)
    section = glued[f"{chapter}-gpu-section"]
    assert section.startswith("**Measured on a GPU.** The NVIDIA Test GPU ran the cell above")
    assert f"\n\n```{{figure}} ../../_static/figures/{figure}.svg\n:name: fig-{figure}" in section
    assert "Measured on NVIDIA Test GPU" in section and says in section
    assert (tmp_path / "_static" / "figures" / f"{figure}.png").stat().st_size > 0


def test_every_committed_gpu_record_loads_and_names_its_gpu():
    """What scripts/gpu-check.sh committed must be readable by the build (an empty folder passes)."""
    for path in sorted((ROOT / records.RESULTS_FOLDER).glob("*.json")):
        record = records.load_record(path.stem, ROOT / records.RESULTS_FOLDER)
        assert record.device and record.provenance["cuda"] not in ("", "None"), path


def test_gpu_section_is_one_line_until_a_record_exists():
    pending = records.gpu_section(None)
    assert "\n" not in pending and "scripts/gpu-check.sh" in pending


def test_gpu_section_names_the_recording_device_before_the_chapters_body():
    record = records.Record(name="demo-gpu", data={}, provenance=PROVENANCE)
    section = records.gpu_section(record, "FIGURE\n\nThere it held.")
    assert section.startswith("**Measured on a GPU.** The NVIDIA Test GPU ran the cell above")
    assert section.endswith("\n\nFIGURE\n\nThere it held.")
    with pytest.raises(TypeError, match="body"):
        records.gpu_section(record, None)
