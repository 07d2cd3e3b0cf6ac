"""Old names keep working for one release: each warns, naming its new home, and does what it did."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch


@pytest.mark.parametrize("old, new", [
    ("peftlab.runtime", "peftlab.book.runtime"),
    ("peftlab.plotting", "peftlab.book.plotting"),
    ("peftlab.claims", "peftlab.book.claims"),
    ("peftlab.pretrained", "peftlab.harness.pretrained"),
    ("peftlab.textdata", "peftlab.harness.textdata"),
    ("peftlab.experiments", "peftlab.harness.experiments"),
])
def test_a_moved_module_imports_as_the_new_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # one module: one state, one set of functions


@pytest.mark.parametrize("module, old, new", [
    ("peftlab.codebooks", "quantize_blockwise", "peftlab.codebooks.quantize_4bit"),
    ("peftlab.codebooks", "dequantize_blockwise", "peftlab.codebooks.dequantize_4bit"),
    ("peftlab.qlora", "ALL_LINEARS", "peftlab.lora.LLAMA_LINEARS"),
    ("peftlab.qlora", "FINETUNE_METHODS", "peftlab.memory.METHODS"),
    ("peftlab.memory", "LINEAR_NAMES", "peftlab.lora.LLAMA_LINEARS"),
    ("peftlab.memory", "PAGE_BYTES", "peftlab.paged.DEFAULT_PAGE_BYTES"),
    ("peftlab.paged", "count_saved_bytes", "peftlab.memory.count_saved_bytes"),
    ("peftlab.paged", "SavedBytes", "peftlab.memory.SavedBytes"),
    ("peftlab.harness.experiments", "load_adapter", "peftlab.harness.experiments.load_run_adapter"),
])
def test_a_renamed_name_is_the_new_object_with_a_warning(module, old, new):
    owner, _, attr = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        value = getattr(importlib.import_module(module), old)
    assert value is getattr(importlib.import_module(owner), attr)


def test_an_unknown_name_is_still_an_attribute_error():
    import peftlab.codebooks

    with pytest.raises(AttributeError, match="no_such_thing"):
        peftlab.codebooks.no_such_thing  # noqa: B018


def test_the_old_8bit_argument_order_still_quantizes_the_same():
    from peftlab import double_quant

    A = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    code = double_quant.dynamic_map(signed=True)
    with pytest.warns(DeprecationWarning, match="quantize_8bit"):
        old_codes, old_absmax = double_quant.quantize_blockwise(A, 128, code)
    new_codes, new_absmax = double_quant.quantize_8bit(A, code, 128)
    assert torch.equal(old_codes, new_codes) and torch.equal(old_absmax, new_absmax)
    with pytest.warns(DeprecationWarning, match="dequantize_8bit"):
        old = double_quant.dequantize_blockwise(new_codes, new_absmax, 128, code)
    assert torch.equal(old, double_quant.dequantize_8bit(new_codes, new_absmax, code, 128))


def test_the_old_dq_blocksize_keyword_still_counts_the_same_bytes():
    from peftlab.memory import quantized_bytes

    with pytest.warns(DeprecationWarning, match="blocksize2="):
        old = quantized_bytes(4096 * 4096, dq_blocksize=128)
    assert old == quantized_bytes(4096 * 4096, blocksize2=128) != quantized_bytes(4096 * 4096)


def test_the_old_qlora_finetune_runs_the_qlora_recipe():
    from peftlab import qlora
    from peftlab.harness import experiments

    with pytest.warns(DeprecationWarning, match="qlora_recipe"):
        old_finetune = qlora.finetune
    settings = dict(steps=2, batch_size=2, seq_len=16, eval_every=1, eval_windows=2, r=2, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.set_num_threads(1)
        old = old_finetune("lora", progress=False, **settings)
    new = experiments.finetune(experiments.qlora_recipe("lora", **settings), progress=False)
    assert old["held_out_loss"] == new["held_out_loss"] and old["optimizer"] == "paged_adamw"
    assert old["max_grad_norm"] == 0.3 and old["targets"] == "all"
