"""peftlab.book.runtime, peftlab.book.plotting and peftlab.book.claims: the helpers every chapter uses."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from peftlab import devices
from peftlab.book import claims, plotting, runtime


def test_book_root_found_from_a_subfolder(book):
    sub = book / "book" / "chapters"
    sub.mkdir(parents=True)
    assert runtime.book_root(sub) == book.resolve()


def test_outside_a_book_output_goes_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runtime.output_dir("claims") == tmp_path.resolve() / "peftlab-output" / "claims"


def test_seed_everything_makes_draws_repeat():
    runtime.seed_everything(7)
    a = (torch.randn(5), np.random.rand(3))
    runtime.seed_everything(7)
    b = (torch.randn(5), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(TypeError, match="seed"):
        runtime.seed_everything(-1)


def test_provenance_names_device_seed_and_versions():
    text = runtime.provenance(seed=5)
    assert "seed 5" in text and "torch" in text and "peftlab" in text
    assert runtime.device_name() in text


def _draw(seed: int):
    rng = np.random.default_rng(seed)
    fig, ax = plotting.new_figure()
    ax.plot(rng.normal(size=50), label="x")
    ax.legend()
    return fig


def test_save_figure_writes_identical_files_twice(book):
    assert plotting.save_figure(_draw(0), "demo-line", "A line.") is None  # a cell ending with it shows nothing
    (record,) = plotting.load_figure_records()
    bytes1 = {f: (book / "_static" / "figures" / f).read_bytes() for f in record["files"]}
    plotting.save_figure(_draw(0), "demo-line", "A line.")
    bytes2 = {f: (book / "_static" / "figures" / f).read_bytes() for f in record["files"]}
    assert sorted(bytes1) == ["demo-line.pdf", "demo-line.png", "demo-line.svg"]
    assert bytes1 == bytes2
    assert b"Date" not in bytes1["demo-line.svg"] and b"CreationDate" not in bytes1["demo-line.pdf"]


def test_save_figure_records_caption_with_provenance(book):
    plotting.save_figure(_draw(1), "demo-rec", "Recorded.")
    (record,) = plotting.load_figure_records()
    assert record["chapter"] == "demo" and record["label"] == "fig-demo-rec"
    assert record["caption"].startswith("Recorded. Produced on") and "seed 3" in record["caption"]
    assert "{numref}`fig-demo-rec`" in plotting.figures_markdown()


@pytest.mark.parametrize("name", ["Bad Name", "under_score", "", "-x"])
def test_save_figure_refuses_unstable_names(book, name):
    with pytest.raises(ValueError, match="name"):
        plotting.save_figure(_draw(0), name, "c")


def test_save_figure_refuses_non_figures_and_empty_captions(book):
    with pytest.raises(TypeError, match="fig must be a matplotlib Figure"):
        plotting.save_figure("not a figure", "x", "c")
    with pytest.raises(ValueError, match="caption must be a non-empty str"):
        plotting.save_figure(_draw(0), "demo-x", " ")
    assert plotting.load_figure_records() == []


@pytest.mark.parametrize("name", ["", None, 3])
def test_start_chapter_refuses_a_name_that_is_not_a_non_empty_str(name):
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        runtime.start_chapter(name)


def test_claim_passes_and_records(book):
    assert claims.claim("demo-ok", 0.1271, 0.127, rel=0.01, source="QLoRA §3", what="bits") is None
    (c,) = claims.load_claims()
    assert c.measured == 0.1271 and c.expected == 0.127 and c.passed and c.chapter == "demo" and c.tolerance == "within 0.01 relative"
    assert json.loads((book / "_build" / ".peftlab" / "claims" / "demo-ok.json").read_text())["passed"]
    assert "✓" in claims.claims_markdown()


@pytest.mark.parametrize(
    "measured, expected, kwargs",
    [(1.2, 1.0, {"rel": 0.1}), (50.0, 48.0, {"relation": "<"}), (3.0, 3.0, {"relation": ">"})],
)
def test_broken_claims_fail_loudly_and_are_recorded(book, measured, expected, kwargs):
    with pytest.raises(claims.ClaimError, match="demo-bad"):
        claims.claim("demo-bad", measured, expected, source="s", what="w", **kwargs)
    assert not claims.load_claims()[0].passed


def test_claim_tolerance_is_an_inclusive_bound(book):
    claims.claim("demo-edge", 1.5, 1.0, abs=0.5, source="s", what="w")
    claims.claim("demo-lt", 47.9, 48.0, relation="<", source="s", what="w")
    assert all(c.passed for c in claims.load_claims())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"measured": float("nan")}, ValueError, "measured must be finite"),
        ({"measured": "1"}, TypeError, "measured must be a real number"),
        ({"expected": float("inf")}, ValueError, "expected must be finite"),
        ({"rel": None}, ValueError, "relation='approx' needs a tolerance"),
        ({"relation": "<"}, ValueError, "rel/abs only apply to relation='approx'"),
        ({"relation": "~"}, ValueError, "relation must be 'approx' or one of"),
        ({"key": "Bad key"}, ValueError, "key must be lowercase words"),
        ({"source": " "}, ValueError, "source must be a non-empty str"),
        ({"what": ""}, ValueError, "what must be a non-empty str"),
    ],
)
def test_claim_refuses_bad_input_naming_the_parameter(book, kwargs, error, match):
    args = {"key": "demo-x", "measured": 1.0, "expected": 1.0, "rel": 0.1, "source": "s", "what": "w"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        claims.claim(**args)
    assert claims.load_claims() == []  # refused before anything is recorded


def test_claim_accepts_tensors(book):
    claims.claim("demo-t", torch.tensor(2.0), 2, abs=0.0, source="s", what="w")
    (c,) = claims.load_claims()
    assert c.measured == 2.0 and isinstance(c.measured, float)


def test_claim_glues_integers_as_integers(book, monkeypatch):
    glued = {}
    monkeypatch.setattr(claims, "glue", lambda name, value, display=False: glued.__setitem__(name, value))
    claims.claim("demo-count", torch.tensor(0), 0, relation="==", source="s", what="w")
    claims.claim("demo-big", 6_738_415_616, np.int64(6_738_415_616), relation="==", source="s", what="w")
    claims.claim("demo-real", 0.5, 1, relation="<", source="s", what="w")
    assert glued == {"demo-count": 0, "demo-count-expected": 0, "demo-big": 6_738_415_616,
                     "demo-big-expected": 6_738_415_616, "demo-real": 0.5, "demo-real-expected": 1}
    assert [type(v) for v in glued.values()] == [int, int, int, int, float, int]


def test_glued_ints_render_as_ints_in_the_prose():
    """What ``{glue:text}`key``` and ``{glue:text}`key:,``` print for a glued value (myst-nb reads its repr)."""
    import myst_nb.core.variables as variables
    assert variables.format_plain_text(repr(0), "") == "0"
    assert variables.format_plain_text(repr(6_738_415_616), ",") == "6,738,415,616"
    assert variables.format_plain_text(repr(0.0), "") == "0.0"  # why a count must not be glued as a float


def test_figures_are_listed_in_book_order(book):
    (book / "_toc.yml").write_text(
        "root: intro\nparts:\n  - chapters:\n    - file: book/chapters/zeta\n    - file: book/chapters/alpha\n"
    )
    runtime.start_chapter("alpha")
    plotting.save_figure(_draw(0), "alpha-b", "Second saved in alpha.")
    runtime.start_chapter("zeta")
    plotting.save_figure(_draw(0), "zeta-z", "First saved in zeta.")
    plotting.save_figure(_draw(0), "zeta-a", "Second saved in zeta.")
    names = [r["name"] for r in plotting.load_figure_records()]
    assert names == ["zeta-z", "zeta-a", "alpha-b"]  # TOC order, then the order the chapter saved them


@pytest.mark.parametrize(
    "x, text",
    [(6_738_415_616.0, "6,738,415,616"), (1e4, "10,000"), (9250.4, "9,250"), (174_600_000_000.5, "174,600,000,000"),
     (0.127, "0.127"), (3.0437, "3.044"), (-0.0, "0"), (2.5e-5, "2.5e-05")],
)
def test_claim_numbers_print_readably(x, text):
    assert claims.format_number(x) == text


# -- device, dtype and determinism (CUDA mocked: these run on a CPU) --------------------------------------


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                                 ((9, 0), torch.bfloat16)])
def test_sixteen_bit_dtype_is_bf16_unless_a_gpu_before_compute_capability_8(fake_gpu, capability, expected):
    fake_gpu(capability)
    for rule in (devices.sixteen_bit_dtype, devices.default_compute_dtype):  # the same on CUDA
        assert rule("cuda") == expected and rule(torch.device("cuda", 0)) == expected
    assert devices.native_bf16("cuda") is (expected == torch.bfloat16)
    assert devices.sixteen_bit_dtype("cpu") == torch.bfloat16  # the paper's; a CPU has no faster 16-bit type
    # a 4-bit layer's default off CUDA: float32, faster there than 16-bit
    assert devices.default_compute_dtype("cpu") == torch.float32
    assert devices.default_compute_dtype("meta") == torch.float32


def test_no_native_bf16_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.native_bf16() is False and devices.native_bf16("cpu") is False


@pytest.mark.parametrize("capability,bf16", [((7, 5), "False"), ((8, 0), "True")])
def test_describe_environment_reports_native_bf16_not_emulated(fake_gpu, capability, bf16):
    fake_gpu(capability, name="Tesla T4" if capability < (8, 0) else "NVIDIA A100")
    assert runtime.describe_environment()["bf16"] == bf16


def test_start_chapter_sets_cublas_workspace_and_cudnn_determinism(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    runtime.start_chapter("demo", seed=0)
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert torch.are_deterministic_algorithms_enabled()


def test_start_chapter_keeps_a_readers_cublas_workspace_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    runtime.start_chapter("demo", seed=0)
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_synchronize_waits_for_cuda_devices_only(sync_log):
    devices.synchronize("cpu")
    devices.synchronize(None)
    devices.synchronize(torch.device("meta"))
    assert sync_log == []
    devices.synchronize("cuda:1")
    assert sync_log == [("sync", torch.device("cuda", 1))]


def test_stopwatch_synchronizes_before_each_clock_read(sync_log, monkeypatch):
    ticks = iter([10.0, 10.5, 20.0, 20.25])

    def clock():
        sync_log.append(("clock", None))
        return next(ticks)

    monkeypatch.setattr(devices.time, "perf_counter", clock)
    watch = devices.Stopwatch("cuda")
    for _ in range(2):
        with watch:
            sync_log.append(("work", None))
    cuda = torch.device("cuda")
    assert sync_log == [("sync", cuda), ("clock", None), ("work", None), ("sync", cuda), ("clock", None)] * 2
    assert watch.seconds == pytest.approx(0.75)


def test_median_seconds_times_every_call_between_synchronizations(sync_log):
    calls = []
    devices.median_seconds(lambda: calls.append(len(sync_log)), device="cuda", repeats=3, warmup=2)
    # two warm-up calls, untimed; then each timed call has one synchronization before and one after it
    assert calls == [0, 0, 1, 3, 5] and len(sync_log) == 6
    assert devices.median_seconds(lambda: None, device="cpu", repeats=1) >= 0
    with pytest.raises(ValueError, match="repeats"):
        devices.median_seconds(lambda: None, repeats=0)


def test_a_skipped_gpu_cell_speaks_in_a_notebook_and_is_silent_in_the_book(monkeypatch, capsys):
    monkeypatch.delenv(runtime.BOOK_BUILD_ENV, raising=False)
    runtime.report_gpu_skipped("No CUDA device here: skipped.")
    assert capsys.readouterr().out == "No CUDA device here: skipped.\n"
    monkeypatch.setenv(runtime.BOOK_BUILD_ENV, "1")
    runtime.report_gpu_skipped("No CUDA device here: skipped.")
    assert capsys.readouterr().out == ""
    with pytest.raises(TypeError, match="message"):
        runtime.report_gpu_skipped("")
