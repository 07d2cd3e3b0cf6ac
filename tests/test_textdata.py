"""Tests for peftlab.harness.textdata (chapter: book/chapters/rank_alpha.md)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from peftlab.harness import textdata


@pytest.fixture(scope="module")
def pre():
    return {s: textdata.pretraining_text(s, "help_topics") for s in ("train", "held_out")}


@pytest.fixture(scope="module")
def down():
    return {s: textdata.downstream_text(s) for s in ("train", "held_out")}


def test_pretraining_is_the_pydoc_topics_split_by_topic(pre):
    from pydoc_data.topics import topics

    info = textdata.corpus_info("pretraining", "help_topics")
    assert set(info.train_documents) | set(info.held_out_documents) == set(topics)
    assert not set(info.train_documents) & set(info.held_out_documents)
    assert 0.05 < info.held_out_bytes / (info.train_bytes + info.held_out_bytes) < 0.15
    assert pre["train"].dtype == torch.uint8 and pre["train"].numel() == info.train_bytes
    assert pre["held_out"].numel() == info.held_out_bytes
    # The bytes are the topics' UTF-8 text, in sorted order, joined by the separator.
    expected = textdata.SEPARATOR.join(topics[n].encode() for n in info.held_out_documents)
    assert bytes(pre["held_out"].tolist()) == expected


def test_no_paragraph_is_shared_between_splits():
    from pydoc_data.topics import topics

    info = textdata.corpus_info("pretraining", "help_topics")
    paragraphs = lambda docs: {  # noqa: E731
        p for n in docs for p in topics[n].split("\n\n") if len(p) >= textdata.SHARED_PARAGRAPH
    }
    assert not paragraphs(info.train_documents) & paragraphs(info.held_out_documents)
    groups = textdata.topic_groups()
    assert sorted(n for g in groups for n in g) == sorted(topics)
    # Known repeats in the CPython docs land in one group (the reason for grouping).
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    assert group_of["customization"] == group_of["specialnames"]
    assert group_of["for"] == group_of["compound"]


def test_held_out_text_never_appears_in_train(pre):
    train = bytes(pre["train"].tolist())
    held = bytes(pre["held_out"].tolist())
    # Long held-out passages (topic bodies) do not occur verbatim in the train split.
    for start in range(0, len(held) - 200, 1000):
        assert held[start : start + 200] not in train


def test_downstream_is_cpythons_c_headers_split_by_whole_file(down):
    root = Path(sysconfig.get_paths()["include"])
    info = textdata.corpus_info("downstream")
    headers = textdata.downstream_headers()
    assert headers and all(h.endswith(".h") for h in headers)
    assert list(info.held_out_documents) == headers[7::10]
    assert not set(info.train_documents) & set(info.held_out_documents)
    first = (root / info.train_documents[0]).read_bytes()
    assert bytes(down["train"][: len(first)].tolist()) == first
    assert down["held_out"].numel() == info.held_out_bytes
    assert info.python_version.count(".") == 2


def test_downstream_text_says_how_to_install_missing_c_headers(tmp_path, monkeypatch):
    monkeypatch.setattr(textdata, "_include_dir", lambda: tmp_path)  # a Python without its headers
    with pytest.raises(FileNotFoundError, match="python3-dev"):
        textdata.downstream_text("held_out")


@pytest.mark.parametrize("max_bytes", [2, 100, 4096])
def test_downstream_max_bytes_keeps_a_prefix(down, max_bytes):
    small = textdata.downstream_text("train", max_bytes=max_bytes)
    assert torch.equal(small, down["train"][:max_bytes])


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, True, "10"])
def test_downstream_max_bytes_rejects(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        textdata.downstream_text("train", max_bytes=bad)


@pytest.mark.parametrize("fn", [textdata.pretraining_text, textdata.downstream_text])
def test_texts_refuse_an_unknown_split(fn):
    with pytest.raises(ValueError, match="split"):
        fn("test")


def test_corpus_info_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="name"):
        textdata.corpus_info("wikipedia")


@pytest.mark.parametrize("text", ["", "plain ascii", "ünïcödé → λ", "line\nbreaks\ttabs"])
def test_encode_decode_roundtrip(text):
    ids = textdata.encode(text)
    assert ids.dtype == torch.long and ids.numel() == len(text.encode())
    assert textdata.decode(ids) == text
    assert textdata.decode(ids.tolist()) == text


def test_encode_refuses_bytes_decode_refuses_ids_over_255_and_replaces_bad_utf8():
    with pytest.raises(TypeError, match="text"):
        textdata.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        textdata.decode([65, 256])
    assert textdata.decode([0xC3]) == "\ufffd"  # truncated UTF-8 is replaced, not an error


@pytest.mark.parametrize("batch_size,seq_len", [(1, 1), (4, 16), (8, 128)])
def test_random_batch_targets_are_next_bytes(pre, batch_size, seq_len):
    data = pre["held_out"]
    gen = torch.Generator().manual_seed(0)
    x, y = textdata.random_batch(data, batch_size, seq_len, gen)
    assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    hay = bytes(data.tolist())
    for row_x, row_y in zip(x, y):
        window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
        assert window in hay


def test_random_batch_is_seeded(pre):
    a = textdata.random_batch(pre["train"], 4, 32, torch.Generator().manual_seed(7))
    b = textdata.random_batch(pre["train"], 4, 32, torch.Generator().manual_seed(7))
    c = textdata.random_batch(pre["train"], 4, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_random_batch_reaches_both_ends():
    data = torch.arange(10, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    x, y = textdata.random_batch(data, 500, 3, gen)
    assert x[:, 0].min() == 0 and y[:, -1].max() == 9


def test_random_batch_refuses_bad_arguments_naming_them(pre):
    gen = torch.Generator()
    with pytest.raises(TypeError, match="data"):
        textdata.random_batch(pre["train"].view(2, -1), 2, 8, gen)
    with pytest.raises(ValueError, match="seq_len"):
        textdata.random_batch(pre["train"], 2, 0, gen)
    with pytest.raises(ValueError, match="batch_size"):
        textdata.random_batch(pre["train"], 0, 8, gen)
    with pytest.raises(TypeError, match="generator"):
        textdata.random_batch(pre["train"], 2, 8, 0)
    with pytest.raises(ValueError, match="needs at least"):
        textdata.random_batch(torch.zeros(8, dtype=torch.uint8), 2, 8, gen)


@pytest.mark.parametrize("batch_size,seq_len,max_windows", [(3, 7, None), (4, 16, 5), (16, 128, 2)])
def test_eval_batches_cover_the_text_in_order(batch_size, seq_len, max_windows):
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batches = textdata.eval_batches(data, batch_size, seq_len, max_windows)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = (data.numel() - 1) // seq_len if max_windows is None else min(max_windows, (data.numel() - 1) // seq_len)
    assert x.shape == (n, seq_len) and all(b[0].shape[0] <= batch_size for b in batches)
    assert torch.equal(x.flatten(), data[: n * seq_len].long())
    assert torch.equal(y.flatten(), data[1 : n * seq_len + 1].long())


@pytest.mark.parametrize("kw, match", [(dict(batch_size=0), "batch_size must be a positive int"),
                                       (dict(batch_size=2.0), "batch_size must be a positive int"),
                                       (dict(max_windows=0), "max_windows must be a positive int or None"),
                                       (dict(max_windows=1.5), "max_windows must be a positive int or None")])
def test_eval_batches_refuse_bad_batch_size_and_max_windows_naming_them(kw, match):
    args = dict(batch_size=2, seq_len=8, max_windows=None) | kw
    with pytest.raises(ValueError, match=match):
        textdata.eval_batches(torch.zeros(100, dtype=torch.uint8), **args)


@pytest.mark.parametrize("n_windows,seq_len", [(1, 10), (5, 10), (32, 64)])
def test_spaced_windows_span_the_text(n_windows, seq_len):
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x, y = textdata.spaced_windows(data, n_windows, seq_len)
    assert x.shape == y.shape == (n_windows, seq_len)
    assert torch.equal(x[0], data[:seq_len].long())
    if n_windows > 1:
        assert torch.equal(y[-1], data[-seq_len:].long())  # the last window ends at the last byte
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="n_windows"):
        textdata.spaced_windows(data, 0, seq_len)


def test_downstream_splits_are_disjoint_and_in_no_pretraining_corpus():
    docs = {s: set(textdata.downstream_files(s)) for s in ("train", "validation", "held_out")}
    assert not docs["train"] & docs["validation"] and not docs["train"] & docs["held_out"]
    assert not docs["validation"] & docs["held_out"]
    assert set().union(*docs.values()) == set(textdata.downstream_headers())
    pretraining = textdata.corpus_info("pretraining", "stdlib")
    assert not any(d.endswith(".h") for d in pretraining.train_documents + pretraining.held_out_documents)
    assert textdata.downstream_text("validation").numel() > 20_000
    with pytest.raises(ValueError, match="split must be one of"):
        textdata.downstream_text("test")


def test_stdlib_corpus_splits_files_apart_and_leaves_out_tests_and_downstream_files():
    info = textdata.corpus_info("pretraining", "stdlib")
    train, held = set(info.train_documents), set(info.held_out_documents)
    assert not train & held
    sources = set(textdata.stdlib_sources())
    assert sources <= train | held and len(sources) > 500
    assert not any(set(p.split("/")[:-1]) & textdata.STDLIB_EXCLUDED_DIRS for p in sources)
    assert not sources & set(textdata.PRETRAINING_EXCLUDED_FILES)
    assert 0.03 < info.held_out_bytes / (info.train_bytes + info.held_out_bytes) < 0.10
    with pytest.raises(ValueError, match="corpus must be one of"):
        textdata.pretraining_text("train", "wiki")


@pytest.mark.parametrize("kind", textdata.OUTSIDE_KINDS)
def test_outside_texts_ship_with_the_package_and_are_in_no_pretraining_corpus(kind):
    text = bytes(textdata.outside_text(kind).tolist())
    assert len(text) > 20_000
    train = bytes(textdata.pretraining_text("train", "stdlib").tolist())
    first_line = next(line for line in text.splitlines() if len(line) > 40)
    assert first_line not in train
    with pytest.raises(ValueError, match="kind must be one of"):
        textdata.outside_text("french")
