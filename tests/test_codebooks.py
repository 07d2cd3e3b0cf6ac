"""Codebooks and the shared blockwise quantizer, against bitsandbytes 0.50.2 and torch.bucketize."""

from __future__ import annotations

import pytest
import torch

from _reference import bnbF, bnb_dequantize_4bit, bnb_dequantize_4bit_eager  # tests/_reference.py
from peftlab.codebooks import (
    BLOCKSIZES,
    NF4_OFFSET,
    _bucket_codes,
    _prefix16,
    check_blocksize,
    dequantize_4bit,
    fp4_code,
    get_code,
    int4_code,
    nf4_code,
    pack_nibbles,
    quantize_4bit,
    roundtrip,
    unpack_nibbles,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- the tables -------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns: torch.equal on these tells +0.0 from -0.0."""
    return t.contiguous().view(torch.int32)


def test_nf4_code_is_bitsandbytes_table_bit_for_bit():
    assert torch.equal(_bits(nf4_code()), _bits(bnbF.get_4bit_type("nf4", device="cpu")))


def test_nf4_code_is_16_ascending_float32_levels_from_minus_1_to_1_with_one_zero():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert bool((code[1:] > code[:-1]).all())
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8 and code[7].item() == 0.0
    assert code[0].item() == -1.0 and code[-1].item() == 1.0


def test_nf4_code_levels_are_normal_quantiles():
    # Independent of bitsandbytes: the positive levels sit at the N(0,1) quantiles of equally spaced
    # probabilities, scaled by the largest; check with the CDF (erf), not the ppf.
    code = nf4_code().double()
    scale = torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64))
    p = 0.5 * (1 + torch.erf(code[8:] * scale / 2**0.5))
    expected = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1].flip(0)
    torch.testing.assert_close(p, expected, rtol=0, atol=2e-7)


def test_nf4_offset_matches_the_known_expression():
    assert abs(NF4_OFFSET - (1 - 0.5 * (1 / 30 + 1 / 32))) < 1e-7


def test_nf4_code_other_offsets_change_the_table_and_bad_offsets_are_refused():
    assert not torch.equal(nf4_code(0.99), nf4_code())
    for bad in (0.5, 1.0, 1.5, "0.96", True):
        with pytest.raises(ValueError, match="offset"):
            nf4_code(bad)


def test_fp4_code_is_bitsandbytes_table_bit_for_bit():
    ours, theirs = fp4_code(), bnbF.get_4bit_type("fp4", device="cpu")
    assert torch.equal(_bits(ours), _bits(theirs))  # index 8 is +0.0 there too


def test_int4_code_is_bitsandbytes_int4_list():
    # bitsandbytes' get_4bit_type("int4") fails in 0.50.2 (in-place division of an integer tensor),
    # so compare with its list divided by its absmax.
    data = [7, 6, 5, 4, 3, 2, 1, 0, -0, -1, -2, -3, -4, -5, -6, -7]
    expected = torch.tensor(data, dtype=torch.float32) / 7
    assert torch.equal(_bits(int4_code()), _bits(expected))  # the sign of each zero included
    assert torch.unique(int4_code()).numel() == 15


def test_get_code_returns_the_named_table_and_refuses_unknown_names():
    assert torch.equal(get_code("nf4"), nf4_code())
    with pytest.raises(ValueError, match=r"name must be one of \(.nf4."):
        get_code("af4")


# --- bucketing: the 16-bit prefix table against torch.bucketize --------------------------------------


def _hard_values(code: torch.Tensor) -> torch.Tensor:
    """Every midpoint, its float32 neighbours, the levels, zeros, subnormals and out-of-range values."""
    ordered = code.sort(stable=True).values
    mids = (ordered[:-1] + ordered[1:]) / 2
    inf = torch.tensor(float("inf"))
    extra = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 1.0, -1.0, 1.0000001, -1.0000001, 3e38, -3e38])
    return torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), code, extra])


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_bucket_codes_equal_bucketize_on_hard_values_and_random(name):
    code = get_code(name)
    order = torch.sort(code, stable=True).indices
    ordered = code[order]
    mids = (ordered[:-1] + ordered[1:]) / 2
    x = torch.cat([_hard_values(code), torch.rand(100_000) * 2 - 1, torch.randn(10_000) * 1e-3])
    expected = order[torch.bucketize(x, mids)].to(torch.uint8)
    assert torch.equal(_bucket_codes(x, code), expected)


def test_prefix_by_uint16_view_equals_prefix_by_shift():
    x = torch.cat([torch.randn(10_000), _hard_values(nf4_code())])
    expected = torch.tensor([(v >> 16) & 0xFFFF for v in x.view(torch.int32).tolist()], dtype=torch.int32)
    assert torch.equal(_prefix16(x, shift=False), expected)
    assert torch.equal(_prefix16(x, shift=True), expected)


def test_bucket_codes_tie_takes_lower_level():
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    assert torch.equal(_bucket_codes(mids, code), torch.arange(15, dtype=torch.uint8))


def test_bucket_codes_equal_bucketize_at_both_ends_of_every_16bit_prefix():
    # Exhaustive over cells: the smallest and largest float32 of each of the 65,536 prefix cells.
    prefix = torch.arange(65536, dtype=torch.int32) << 16
    x = torch.cat([prefix.view(torch.float32), (prefix | 0xFFFF).view(torch.float32)])
    x = x[torch.isfinite(x)]
    for name in ("nf4", "fp4", "int4"):
        code = get_code(name)
        order = torch.sort(code, stable=True).indices
        mids = (code[order][:-1] + code[order][1:]) / 2
        assert torch.equal(_bucket_codes(x, code), order[torch.bucketize(x, mids)].to(torch.uint8)), name


# --- packing -----------------------------------------------------------------------------------------


def test_pack_nibbles_puts_the_first_value_in_the_high_nibble():
    assert pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x12, 0xF0]
    assert pack_nibbles(torch.tensor([3], dtype=torch.uint8)).tolist() == [0x30]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_unpack_nibbles_inverts_pack_nibbles(n):
    q = torch.randint(0, 16, (n,), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q), n), q)


# --- FP4 through the shared quantizer, against bitsandbytes ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (33, 65), (3, 5, 64), (2, 4100)])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_fp4_blockwise_identical_to_bitsandbytes(dtype, shape, blocksize):
    g = torch.Generator().manual_seed(hash((str(dtype), shape, blocksize)) % 2**31)
    w = torch.randn(shape, generator=g).to(dtype)
    packed, absmax = quantize_4bit(w, fp4_code(), blocksize)
    bpacked, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="fp4")
    assert torch.equal(packed, bpacked.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    ours = dequantize_4bit(packed, absmax, fp4_code(), blocksize, w.numel()).to(dtype)
    assert torch.equal(ours, bnb_dequantize_4bit_eager(bpacked, state).reshape(-1))
    if shape[-1] % blocksize == 0:  # where bitsandbytes' native CPU kernel is right (tests/_reference.py)
        assert torch.equal(ours, bnb_dequantize_4bit(bpacked, state).reshape(-1))


# --- error ordering, bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_has_the_lowest_error_on_normal_data(blocksize):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    err = {name: (roundtrip(w, name, blocksize) - w).pow(2).mean().item() for name in ("nf4", "fp4", "int4")}
    assert err["nf4"] < min(err["fp4"], err["int4"])


def test_roundtrip_keeps_shape_and_dtype():
    w = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = roundtrip(w, "int4", 32)
    assert out.shape == w.shape and out.dtype == w.dtype


@pytest.mark.parametrize("bad", [64.0, "64", True, None])
def test_check_blocksize_refuses_non_ints_naming_blocksize(bad):
    with pytest.raises(TypeError, match="blocksize"):
        check_blocksize(bad)


@pytest.mark.parametrize("bad", [0, -64, 16, 63, 100, 8192])
def test_check_blocksize_refuses_other_values_naming_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64"):
        check_blocksize(bad)


def test_quantize_blockwise_refuses_a_code_not_a_tensor_not_16_levels_or_beyond_1():
    w = torch.randn(64)
    with pytest.raises(TypeError, match="code"):
        quantize_4bit(w, [0.0] * 16)
    with pytest.raises(ValueError, match="code"):
        quantize_4bit(w, torch.zeros(15))
    with pytest.raises(ValueError, match="code"):
        quantize_4bit(w, torch.full((16,), 2.0))
    with pytest.raises(ValueError, match="code"):
        quantize_4bit(w, torch.full((16,), float("nan")))


def test_quantize_blockwise_refuses_a_code_with_two_midpoints_in_one_16bit_prefix_cell():
    # Levels 2**-9 apart near 0.5: their midpoints share a cell of width 2**-8 (7 mantissa bits).
    code = torch.linspace(-1, 1, 16)
    code[12:15] = torch.tensor([0.5, 0.5 + 2**-9, 0.5 + 2**-8])
    with pytest.raises(ValueError, match="code levels are too close"):
        quantize_4bit(torch.randn(64), code)


def test_dequantize_blockwise_refuses_wrong_sizes_dtypes_and_numel_naming_them():
    packed, absmax = quantize_4bit(torch.randn(100), nf4_code(), 32)
    with pytest.raises(ValueError, match="packed must hold 50 bytes"):
        dequantize_4bit(packed[:-1], absmax, nf4_code(), 32, 100)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_4bit(packed, absmax, nf4_code(), 64, 100)
    with pytest.raises(TypeError, match="packed"):
        dequantize_4bit(packed.int(), absmax, nf4_code(), 32, 100)
    with pytest.raises(TypeError, match="absmax"):
        dequantize_4bit(packed, absmax.double(), nf4_code(), 32, 100)
    with pytest.raises(ValueError, match="numel"):
        dequantize_4bit(packed, absmax, nf4_code(), 32, 0)


def test_signed_zero_codebooks_do_not_share_cached_tables():
    # +0.0 == -0.0 as Python floats: the table caches must key on bits, or the sign of zero leaks.
    plus = int4_code()
    minus = plus.clone()
    minus[8] = -0.0
    packed = pack_nibbles(torch.tensor([8, 8], dtype=torch.uint8))
    one = torch.ones(1)
    assert not torch.signbit(dequantize_4bit(packed, one, plus, 32, 2)).any()
    assert torch.signbit(dequantize_4bit(packed, one, minus, 32, 2)).all()


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_roundtrip_equals_nearest_level_by_argmin(name, blocksize):
    # An independent, slow definition: scale by the block's absmax, take the nearest level (argmin of
    # the distance), multiply back. Random data has no exact ties, so the tie rule does not matter here.
    w = torch.randn(5000, generator=torch.Generator().manual_seed(blocksize))
    code = get_code(name)
    padded = torch.nn.functional.pad(w, (0, -w.numel() % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(1, keepdim=True)
    scaled = (padded * (1.0 / absmax)).reshape(-1)[: w.numel()]
    nearest = code[(scaled[:, None] - code[None, :]).abs().argmin(1)]
    expected = (torch.nn.functional.pad(nearest, (0, -w.numel() % blocksize)).view(-1, blocksize) * absmax)
    expected = expected.reshape(-1)[: w.numel()]
    full = w.numel() - w.numel() % blocksize  # the trailing block divides instead of multiplying
    torch.testing.assert_close(roundtrip(w, name, blocksize)[:full], expected[:full], rtol=0, atol=0)
    torch.testing.assert_close(roundtrip(w, name, blocksize), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_fast_quantizer_gives_the_readable_references_bytes_on_every_float16_value(name, blocksize):
    from peftlab.codebooks import quantize_4bit_reference

    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    w = every[torch.isfinite(every)]
    w = w[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))]  # mix small and large per block
    code = get_code(name)
    packed, absmax = quantize_4bit(w, code, blocksize)
    ref_packed, ref_absmax = quantize_4bit_reference(w, code, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    scaled = torch.cat([w[:-1].float(), torch.tensor([0.5, -0.25])])  # odd count, partial block
    assert torch.equal(quantize_4bit(scaled, code, blocksize)[0], quantize_4bit_reference(scaled, code, blocksize)[0])


def test_readable_reference_refuses_what_the_fast_path_refuses():
    from peftlab.codebooks import quantize_4bit_reference

    with pytest.raises(ValueError, match="finite"):
        quantize_4bit_reference(torch.tensor([1.0, float("nan")]), nf4_code())
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit_reference(torch.ones(8), nf4_code(), 100)
