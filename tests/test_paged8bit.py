"""PagedAdamW(optim_bits=8) against bitsandbytes' AdamW8bit (its 0.50.2 CPU kernels), bit for bit.

The 8-bit states are explained in the chapter *LoRA variants* (book/chapters/variants.md), the paging
in *Paged optimizers* (book/chapters/paged.md).

Every comparison with bitsandbytes is exact (``rtol=0, atol=0``): our step runs bitsandbytes' CPU
kernels' operations in their order (``backends/cpu/ops.py``) and quantizes with the same lookup table
(peftlab.double_quant, byte-identical to ``quantize_blockwise``), so no rounding can differ. The tests run
on one thread (the ``one_thread`` fixture): the same element-wise loops then split the same way.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import pytest
import torch

from _reference import bnb  # tests/_reference.py: skips this module without bitsandbytes
from peftlab.memory import estimate
from peftlab.shapes import LlamaShape
from peftlab.paged import MIN_8BIT_SIZE, STATE_BLOCKSIZE, PagedAdamW, state_bytes
from peftlab.pages import DEFAULT_PAGE_BYTES, PagedTensor, PagePool

pytestmark = pytest.mark.usefixtures("one_thread")

# above and below min_8bit_size (4096), exactly at it and one below, and sizes that are not a multiple
# of the block size (5000, 64 × 130 = 8320, 3 × 2049 = 6147): their last block is partial
SHAPES = [(5000,), (1000,), (64, 130), (4096,), (4095,), (3, 2049)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
BNB_KEYS = {"exp_avg_codes": "state1", "exp_avg_absmax": "absmax1",
            "exp_avg_sq_codes": "state2", "exp_avg_sq_absmax": "absmax2"}


def _init(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _grad(shape: torch.Size, step: int, index: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradients whose scale varies over four decades from element to element (so blocks get very
    different absmax); the second block of the first parameter is always zero (a block with absmax 0)."""
    g = torch.Generator().manual_seed(1000 * step + index)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    if index == 0:
        x.view(-1)[STATE_BLOCKSIZE:2 * STATE_BLOCKSIZE] = 0
    return x.to(dtype)


def _evict_all(pool: PagePool, step: int) -> None:
    pool.evict_all()


def _spike(pool: PagePool, step: int) -> None:
    with pool.reserve(pool.capacity_bytes // 2):
        pass


def _run(dtype=torch.float32, page_bytes=DEFAULT_PAGE_BYTES, capacity=2**30, perturb=None, steps=60,
         with_bnb=True):
    """Our 8-bit PagedAdamW and bitsandbytes' AdamW8bit on the same gradients; ``perturb(pool, step)``
    between steps."""
    init = _init(dtype)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    pool = PagePool(capacity, page_bytes=page_bytes)
    opt = PagedAdamW(ours, pool=pool, optim_bits=8, **HYPER)
    opt_bnb = bnb.optim.AdamW8bit(theirs, **HYPER) if with_bnb else None
    for step in range(steps):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a.grad = _grad(a.shape, step, i, dtype)
            b.grad = a.grad.clone()
        opt.step()
        if opt_bnb is not None:
            opt_bnb.step()
        if perturb is not None:
            perturb(pool, step)
    return ours, theirs, opt, opt_bnb, pool


def _our_states(opt: PagedAdamW, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.to_tensor() for k, v in opt.state[p].items() if isinstance(v, PagedTensor)}


PAGINGS = [(DEFAULT_PAGE_BYTES, None), (1024, _evict_all), (3000, _spike)]


@lru_cache(maxsize=None)
def _compared(dtype: torch.dtype, page_bytes: int, perturb):
    """One 60-step run of each per setting, shared by the tests of parameters (1) and states (2), which
    only read it."""
    return _run(dtype, page_bytes, 64 * 1024 if perturb else 2**30, perturb)


# -- (1) the parameters: bitsandbytes' AdamW8bit's, bit for bit ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_bytes, perturb", PAGINGS)
def test_params_equal_bitsandbytes_adamw8bit(dtype, page_bytes, perturb):
    """60 steps: every parameter equals bitsandbytes' exactly (tolerance 0; see the module docstring),
    with one page per state or many (pages of 1024 bytes: 4 blocks of codes, 256 absmax), paged out or
    squeezed by a spike between steps. 16-bit parameters: both update a float32 copy and round it once."""
    ours, theirs, opt, _, pool = _compared(dtype, page_bytes, perturb)
    for a, b, p0 in zip(ours, theirs, _init(dtype)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, p0)  # the parameters moved: equality is not trivial
    if perturb is not None:
        assert pool.stats.page_outs > 0 and pool.stats.page_ins > 0


def test_params_differ_from_32bit_adamw_by_the_quantization_only():
    """Sanity of the reference: 8-bit steps are not 32-bit steps (else test 1 would prove little), yet
    stay close to them; 32-bit states only below min_8bit_size, where ours equal bitsandbytes' too."""
    ours, theirs, opt, _, _ = _run(steps=30)
    init = [p.clone().requires_grad_() for p in _init(torch.float32)]
    opt32 = PagedAdamW(init, optim_bits=32, **HYPER)
    for step in range(30):
        for i, p in enumerate(init):
            p.grad = _grad(p.shape, step, i, torch.float32)
        opt32.step()
    for a, ref in zip(ours, init):
        if opt.is_8bit(a):
            assert not torch.equal(a, ref)
        # 30 steps of at most lr each: 8-bit and 32-bit end within a few steps' size of each other
        assert (a - ref).abs().max() < 30 * HYPER["lr"]


# -- (2) the states: bitsandbytes' bytes ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_bytes, perturb", PAGINGS)
def test_state_bytes_equal_bitsandbytes_state1_state2_absmax1_absmax2(dtype, page_bytes, perturb):
    """After 60 steps our codes are bitsandbytes' ``state1``/``state2`` (uint8) and our absmax its
    ``absmax1``/``absmax2`` (float32, one per block of 256), byte for byte; parameters below 4096
    elements keep float32 ``exp_avg``/``exp_avg_sq`` equal to its 32-bit ``state1``/``state2``."""
    ours, theirs, opt, opt_bnb, _ = _compared(dtype, page_bytes, perturb)
    for a, b in zip(ours, theirs):
        st, st_bnb = _our_states(opt, a), opt_bnb.state[b]
        eight_bit = a.numel() >= MIN_8BIT_SIZE
        assert opt.is_8bit(a) == eight_bit == (st_bnb["state1"].dtype == torch.uint8)
        assert opt.state[a]["step"].item() == st_bnb["step"] == 60
        if eight_bit:
            assert set(st) == set(BNB_KEYS)
            blocks = math.ceil(a.numel() / STATE_BLOCKSIZE)
            for ours_key, bnb_key in BNB_KEYS.items():
                expected_shape = a.shape if "codes" in ours_key else (blocks,)
                assert st[ours_key].shape == st_bnb[bnb_key].shape == expected_shape
                assert st[ours_key].dtype == st_bnb[bnb_key].dtype
                assert torch.equal(st[ours_key], st_bnb[bnb_key]), ours_key
            # the all-zero block of the first parameter: m and v have absmax 0 there
            if a is ours[0]:
                assert st["exp_avg_absmax"][1] == 0 and st["exp_avg_sq_absmax"][1] == 0
        else:
            assert set(st) == {"exp_avg", "exp_avg_sq"}
            assert torch.equal(st["exp_avg"], st_bnb["state1"])
            assert torch.equal(st["exp_avg_sq"], st_bnb["state2"])


# -- (3) paging changes nothing -------------------------------------------------------------------------
@pytest.mark.parametrize("page_bytes", [256, 1024, 4096])
def test_paging_out_and_in_between_steps_gives_identical_steps(page_bytes):
    """A pool that holds barely one update's pages (so every step pages in what the last evicted), and
    everything paged out between steps, against an unlimited pool with the same page size: identical
    parameters and state bytes."""
    free, _, opt_free, _, _ = _run(page_bytes=page_bytes, steps=25, with_bnb=False)
    need = max(opt_free._update_bytes(p) for p in free)
    tight, _, opt_tight, _, pool = _run(page_bytes=page_bytes, capacity=need, perturb=_evict_all, steps=25,
                                        with_bnb=False)
    assert pool.stats.page_outs > 0 and pool.stats.page_ins > 0
    assert pool.stats.peak_device_bytes <= need
    for a, b in zip(free, tight):
        assert torch.equal(a, b)
        for key, value in _our_states(opt_free, a).items():
            assert torch.equal(_our_states(opt_tight, b)[key], value)


def test_codes_and_absmax_live_in_pages_of_whole_blocks():
    """A block is requantized as a whole: codes pages hold whole blocks, and each codes page finds all its
    absmax in one absmax page (pages of 1000 bytes: 768 codes = 3 blocks, 249 absmax = 83 pages' worth)."""
    p = torch.zeros(5000, requires_grad=True)
    opt = PagedAdamW([p], pool=PagePool(2**30, page_bytes=1000), optim_bits=8)
    p.grad = torch.ones_like(p)
    opt.step()
    codes, absmax = opt.state[p]["exp_avg_codes"], opt.state[p]["exp_avg_absmax"]
    assert [pg.numel for pg in codes.pages] == [768] * 6 + [392]
    assert [pg.numel for pg in absmax.pages] == [20]  # 20 blocks fit in one page of 249
    assert all(pg.nbytes <= 1000 for pg in codes.pages + absmax.pages)


# -- state_dict ------------------------------------------------------------------------------------------
def test_state_dict_holds_ordinary_tensors_and_round_trips_into_another_page_size():
    """The 8-bit state dict holds only tensors and numbers (``torch.load(weights_only=True)`` reads it);
    loaded into an optimizer whose pool has other pages, training continues exactly as without the
    round trip."""
    ours, _, opt, _, _ = _run(steps=10, with_bnb=False)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)  # refuses any pickled custom object
    for p, s in zip(ours, sd["state"].values()):
        if p.numel() >= MIN_8BIT_SIZE:
            assert s["exp_avg_codes"].dtype == s["exp_avg_sq_codes"].dtype == torch.uint8
            assert s["exp_avg_absmax"].dtype == s["exp_avg_sq_absmax"].dtype == torch.float32
        else:
            assert s["exp_avg"].dtype == torch.float32
    copies = [p.detach().clone().requires_grad_() for p in ours]
    other = PagedAdamW(copies, pool=PagePool(2**30, page_bytes=1024), optim_bits=8, **HYPER)
    other.load_state_dict(sd)
    for a, b in zip(ours, copies):
        assert other.is_8bit(b) == opt.is_8bit(a)
        for key, value in _our_states(opt, a).items():
            assert torch.equal(_our_states(other, b)[key], value)
    for step in range(10, 20):
        for i, (a, b) in enumerate(zip(ours, copies)):
            a.grad = _grad(a.shape, step, i, torch.float32)
            b.grad = a.grad.clone()
        opt.step()
        other.step()
    for a, b in zip(ours, copies):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_codes_of_the_wrong_shape():
    ours, _, opt, _, _ = _run(steps=1, with_bnb=False)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"][:-1]
    with pytest.raises(ValueError, match="exp_avg_codes"):
        opt.load_state_dict(sd)


# -- (4) the memory model counts what the pool holds -------------------------------------------------------
def test_pool_bytes_equal_state_bytes_memory_estimate_and_bitsandbytes_buffers():
    """LoRA (r = 37) on a small LLaMA shape whose adapters fall on both sides of min_8bit_size (48 × 37 =
    1776 elements: 32-bit states; 128 × 37 = 4736, not a multiple of 256: 8-bit): the pool's bytes after a
    step equal :func:`peftlab.memory.estimate`'s ``optimizer_bits=8`` count, and the bytes of
    bitsandbytes' own state tensors (``state1``, ``state2``, ``absmax1``, ``absmax2``). The same for 32
    bits."""
    shape = LlamaShape("tiny", d_model=48, n_layers=2, n_heads=4, ffn=128, vocab=100)
    r = 37
    numels = shape.trained_numels("lora", r)
    assert min(numels) < MIN_8BIT_SIZE <= max(numels) and any(n % STATE_BLOCKSIZE for n in numels)
    for bits in (8, 32):
        params = [torch.zeros(n, requires_grad=True) for n in numels]
        opt = PagedAdamW(params, optim_bits=bits)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        measured = opt.pool.stats.resident_bytes + opt.pool.stats.host_bytes
        estimated = estimate(shape, "lora", r=r, optimizer_bits=bits, lora_dtype=torch.float32)
        assert measured == estimated.optimizer_states == sum(state_bytes(n, bits) for n in numels)
        theirs = [torch.zeros(n, requires_grad=True) for n in numels]
        opt_bnb = (bnb.optim.AdamW8bit(theirs) if bits == 8 else bnb.optim.AdamW(theirs, optim_bits=32))
        for p in theirs:
            p.grad = torch.randn_like(p)
        opt_bnb.step()
        bnb_bytes = sum(v.numel() * v.element_size() for s in opt_bnb.state.values() for k, v in s.items()
                        if k in ("state1", "state2", "absmax1", "absmax2"))
        assert measured == bnb_bytes


def test_state_bytes_counts_codes_and_one_absmax_per_block():
    assert state_bytes(5000, 8) == 2 * (5000 + 4 * 20)  # 19 full blocks and a partial one
    assert state_bytes(4096, 8) == 2 * (4096 + 4 * 16)
    assert state_bytes(4095, 8) == state_bytes(4095, 32) == 8 * 4095  # below min_8bit_size
    assert state_bytes(100, 8, min_8bit_size=0) == 2 * (100 + 4)
    # a LoRA matrix of LLaMA-7B (4096 × 64): about a quarter of the 32-bit bytes
    assert state_bytes(4096 * 64, 8) / state_bytes(4096 * 64, 32) == pytest.approx(0.2539, abs=1e-4)


# -- (5) bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(optim_bits=16), ValueError, "optim_bits must be 8 or 32, got 16"),
    (dict(optim_bits=4), ValueError, "optim_bits"),
    (dict(optim_bits=8.0), TypeError, "optim_bits must be an int"),
    (dict(optim_bits="8"), TypeError, "optim_bits must be an int"),
    (dict(optim_bits=True), TypeError, "optim_bits must be an int"),
    (dict(optim_bits=None), TypeError, "optim_bits"),
    (dict(optim_bits=8, min_8bit_size=-1), ValueError, "min_8bit_size"),
    (dict(optim_bits=8, min_8bit_size=4096.0), TypeError, "min_8bit_size"),
])
def test_refuses_bad_optim_bits_and_min_8bit_size_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PagedAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("args, exc, match", [
    ((100, 16), ValueError, "optim_bits"), ((100, 8.0), TypeError, "optim_bits"),
    ((-1, 8), ValueError, "numel"), ((1.5, 8), ValueError, "numel"),
])
def test_state_bytes_refuses_bad_input_naming_it(args, exc, match):
    with pytest.raises(exc, match=match):
        state_bytes(*args)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_step_with_non_finite_gradients_is_refused_before_anything_changes(bad):
    """8-bit states cannot hold NaN or inf (the block's absmax would be lost): the step is refused, and no
    parameter or state has changed (not even those of parameters before the bad one)."""
    ours, _, opt, _, _ = _run(steps=3, with_bnb=False)
    before = [p.detach().clone() for p in ours], [_our_states(opt, p) for p in ours]
    for i, p in enumerate(ours):
        p.grad = _grad(p.shape, 3, i, torch.float32)
    ours[-1].grad.view(-1)[7] = bad
    with pytest.raises(ValueError, match="finite"):
        opt.step()
    for p, p0, s0 in zip(ours, *before):
        assert torch.equal(p, p0)
        assert all(torch.equal(v, s0[k]) for k, v in _our_states(opt, p).items())
        assert opt.state[p]["step"].item() == 3


def test_a_step_that_cannot_fit_one_page_of_each_8bit_state_is_refused():
    from peftlab.pages import PoolMemoryError

    p = torch.zeros(8192, requires_grad=True)
    pool = PagePool(4096, page_bytes=2048)  # codes pages of 2048 bytes: two of them fill the pool
    opt = PagedAdamW([p], pool=pool, optim_bits=8)
    p.grad = torch.ones_like(p)
    with pytest.raises(PoolMemoryError):
        opt.step()
    assert torch.equal(p, torch.zeros_like(p)) and not opt.state[p]
