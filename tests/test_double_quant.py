"""Double quantization (peftlab.double_quant) against bitsandbytes' CPU path and torchao, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _reference import bnbF, bnb_dequantize_4bit, bnb_dequantize_4bit_flat, nested_absmax  # tests/_reference.py
from peftlab.double_quant import (
    BLOCKSIZES,
    LUT_SIZE,
    DoubleQuantState,
    dequantize_absmax,
    dequantize_8bit,
    dynamic_map,
    overhead_bits,
    quantize_absmax,
    quantize_8bit,
    roundtrip_absmax,
)
from peftlab.nf4 import dequantize_nf4, from_bnb, quantize_nf4, to_bnb

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _heavy_tailed(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Values over many decades, so that the dense small codes of the dynamic map are exercised.
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    return x.to(dtype)


# --- the dynamic map ------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed: bool) -> None:
    ours, ref = dynamic_map(signed), bnbF.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, ref)


def test_dynamic_map_refuses_a_non_bool_signed() -> None:
    with pytest.raises(TypeError, match="signed"):
        dynamic_map(1)  # type: ignore[arg-type]


# --- 8-bit blockwise quantization -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", [1, 7, 1000, 3 * 4096 + 5, 8192])
def test_quantize_blockwise_matches_bitsandbytes(dtype: torch.dtype, blocksize: int, n: int) -> None:
    A = _heavy_tailed(n, dtype, seed=n + blocksize)
    codes, absmax = quantize_8bit(A, blocksize=blocksize)
    ref_codes, ref_state = bnbF.quantize_blockwise(A, blocksize=blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == A.shape
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_state.absmax)
    out = dequantize_8bit(codes, absmax, blocksize=blocksize, dtype=dtype)
    ref = bnbF.dequantize_blockwise(ref_codes, ref_state)
    assert out.dtype == dtype and torch.equal(out, ref)


# Block sizes bitsandbytes 0.50.2's CPU quantize_blockwise accepts beyond the 4-bit path's BLOCKSIZES:
# any positive int (functional.quantize_blockwise: "blocksize must be positive").
OTHER_8BIT_BLOCKSIZES = (1, 2, 3, 7, 16, 100, 255, 257, 1000, 4095, 4097, 8192, 65536)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", OTHER_8BIT_BLOCKSIZES)
@pytest.mark.parametrize("n", [1, 1000, 3 * 4097 + 5])
def test_quantize_blockwise_matches_bitsandbytes_for_every_block_size_its_cpu_path_accepts(
    dtype: torch.dtype, blocksize: int, n: int
) -> None:
    A = _heavy_tailed(n, dtype, seed=n + blocksize)
    codes, absmax = quantize_8bit(A, blocksize=blocksize)
    ref_codes, ref_state = bnbF.quantize_blockwise(A, blocksize=blocksize)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_state.absmax) and absmax.numel() == -(-n // blocksize)
    out = dequantize_8bit(codes, absmax, blocksize=blocksize, dtype=dtype)
    assert out.dtype == dtype and torch.equal(out, bnbF.dequantize_blockwise(ref_codes, ref_state))


@pytest.mark.parametrize(("blocksize", "error"), [(0, ValueError), (-64, ValueError), (True, TypeError),
                                                  ("256", TypeError), (256.0, TypeError)])
def test_8bit_block_sizes_bitsandbytes_refuses_are_refused_naming_blocksize(blocksize, error) -> None:
    A = torch.rand(10)
    if error is ValueError:  # bitsandbytes refuses it too
        with pytest.raises(ValueError, match="blocksize"):
            bnbF.quantize_blockwise(A, blocksize=blocksize)
    with pytest.raises(error, match="blocksize must be a positive int"):
        quantize_8bit(A, blocksize=blocksize)
    with pytest.raises(error, match="blocksize must be a positive int"):
        dequantize_8bit(torch.zeros(10, dtype=torch.uint8), torch.ones(1), blocksize=blocksize)


def test_the_4bit_path_keeps_its_own_block_sizes() -> None:
    from peftlab.codebooks import check_blocksize

    with pytest.raises(ValueError, match="blocksize2"):
        quantize_absmax(torch.rand(10), 100)
    with pytest.raises(ValueError, match="blocksize"):
        check_blocksize(100)
    quantize_8bit(torch.rand(10), blocksize=100)  # the 8-bit path alone widened


def _bin_edges_and_centres() -> torch.Tensor:
    """Every LUT bin centre and the float32 neighbours of every bin edge, in [-1, 1]."""
    i = torch.arange(LUT_SIZE, dtype=torch.float64)
    centres = (-1 + 2 * i / (LUT_SIZE - 1)).float()
    edges = (-1 + (2 * i[1:] - 1) / (LUT_SIZE - 1)).float()
    up = torch.nextafter(edges, torch.tensor(2.0))
    down = torch.nextafter(edges, torch.tensor(-2.0))
    return torch.cat([centres, edges, up, down, dynamic_map()]).clamp(-1, 1)


@pytest.mark.parametrize("tail", [False, True], ids=["vector-path", "tail-path"])
def test_quantize_blockwise_matches_bitsandbytes_at_every_bin_edge_and_centre(tail: bool) -> None:
    # Blocks of 256 led by 1.0 (so the scale is exactly 1); with `tail`, 5 values are left over so
    # that the last ones go through bitsandbytes' scalar tail loop instead of the AVX2 one.
    values = _bin_edges_and_centres()
    body = values.numel() - values.numel() % 255
    blocks = torch.cat([torch.ones(body // 255, 1), values[:body].view(-1, 255)], dim=1).reshape(-1)
    A = torch.cat([blocks, torch.ones(1), values[body:]] if tail else [blocks])
    codes, absmax = quantize_8bit(A, blocksize=256)
    ref_codes, ref_state = bnbF.quantize_blockwise(A, blocksize=256)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("scale", [3.0, 7.77, 0.123])
def test_quantize_blockwise_multiplies_by_the_reciprocal_like_bitsandbytes(scale: float) -> None:
    # x * (1/absmax) and x / absmax differ in the last bit for some x; near a bin edge that changes
    # the code. Values around every bin edge times `scale`, in blocks led by `scale` itself.
    i = torch.arange(1, LUT_SIZE, dtype=torch.float64)
    x = ((-1 + (2 * i - 1) / (LUT_SIZE - 1)) * scale).float()
    near = [x]
    for direction in (1e9, -1e9):
        y = x
        for _ in range(2):
            y = torch.nextafter(y, torch.tensor(direction))
            near.append(y)
    values = torch.cat(near)
    values = values[values.abs() < scale]
    body = values.numel() - values.numel() % 255
    A = torch.cat([torch.full((body // 255, 1), -scale), values[:body].view(-1, 255)], dim=1).reshape(-1)
    codes, absmax = quantize_8bit(A, blocksize=256)
    ref_codes, ref_state = bnbF.quantize_blockwise(A, blocksize=256)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codes, ref_codes)


def test_quantize_blockwise_takes_the_lower_code_for_a_midpoint_on_a_bin_centre() -> None:
    # A code whose midpoints fall exactly on LUT bin centres: bitsandbytes keeps the lower code there.
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    centres = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)
    code = centres[::256].contiguous()
    mid = 0.5 * (code[:-1] + code[1:])
    assert torch.isin(mid, centres).any()
    A = torch.cat([torch.ones(1), centres])
    codes, _ = quantize_8bit(A, blocksize=4096, code=code)
    ref_codes, _ = bnbF.quantize_blockwise(A, code=code, blocksize=4096)
    assert torch.equal(codes, ref_codes)


def test_quantize_blockwise_follows_bitsandbytes_table_not_the_nearest_code() -> None:
    # bitsandbytes' CPU table puts an exact 0 into code 131 (2.1e-5), not into code 127 (0.0):
    # the reason the package reproduces the table rather than searching for the nearest code.
    A = torch.tensor([1.0, 0.0, -1e-7, 1e-5])
    codes, _ = quantize_8bit(A, blocksize=32)
    ref_codes, _ = bnbF.quantize_blockwise(A, blocksize=32)
    assert torch.equal(codes, ref_codes)
    nearest = (A[:, None] - dynamic_map()[None, :]).abs().argmin(dim=1)
    assert codes[1].item() != nearest[1].item() == 127


def test_quantize_blockwise_zero_block_matches_bitsandbytes_and_dequantizes_to_zeros() -> None:
    A = torch.cat([torch.zeros(256), torch.randn(100)])
    codes, absmax = quantize_8bit(A, blocksize=256)
    ref_codes, ref_state = bnbF.quantize_blockwise(A, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    out = dequantize_8bit(codes, absmax, blocksize=256)
    assert torch.isfinite(out).all() and (out[:256] == 0).all()


def test_quantize_blockwise_with_a_custom_code_matches_bitsandbytes() -> None:
    code = torch.linspace(-1, 1, 256)
    A = _heavy_tailed(5000, torch.float32, seed=3)
    codes, absmax = quantize_8bit(A, blocksize=128, code=code)
    ref_codes, ref_state = bnbF.quantize_blockwise(A, code=code, blocksize=128)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    ours = dequantize_8bit(codes, absmax, blocksize=128, code=code)
    assert torch.equal(ours, bnbF.dequantize_blockwise(ref_codes, ref_state))


# --- double quantization of the NF4 constants -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", [(300, 77), (1024, 1024), (65, 3), (1, 9)])
def test_quantize_absmax_matches_compress_statistics(dtype: torch.dtype, blocksize: int, shape: tuple) -> None:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + blocksize)).to(dtype)
    _, plain = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    _, nested = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    state = quantize_absmax(plain.absmax)
    assert torch.equal(state.codes, nested.absmax)
    assert torch.equal(state.absmax2, nested.state2.absmax)
    assert torch.equal(state.offset, nested.offset)
    assert state.blocksize2 == nested.state2.blocksize == 256
    assert torch.equal(dynamic_map(), nested.state2.code)
    assert torch.equal(dequantize_absmax(state), nested_absmax(nested))


@pytest.mark.parametrize("blocks", [1, 255, 256, 257, 1000])
def test_quantize_absmax_matches_bitsandbytes_for_block_counts_not_divisible_by_256(blocks: int) -> None:
    absmax = 0.5 + torch.rand(blocks, generator=torch.Generator().manual_seed(blocks))
    state = quantize_absmax(absmax)
    ref_codes, ref_state = bnbF.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert state.codes.numel() == blocks and state.absmax2.numel() == -(-blocks // 256)
    assert torch.equal(state.codes, ref_codes) and torch.equal(state.absmax2, ref_state.absmax)


@pytest.mark.parametrize("value", [0.5, 0.1, 3.0e-3])
@pytest.mark.parametrize("blocks", [1, 64, 1000])
def test_equal_constants_match_bitsandbytes_and_dequantize_without_nan(value: float, blocks: int) -> None:
    absmax = torch.full((blocks,), value)
    state = quantize_absmax(absmax)
    out = dequantize_absmax(state)
    assert torch.isfinite(out).all()
    ref_codes, ref_state = bnbF.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(state.codes, ref_codes) and torch.equal(state.absmax2, ref_state.absmax)
    assert torch.allclose(out, absmax, rtol=1e-6, atol=0)
    if value == 0.5:  # the mean is exact: centring gives exact zeros, absmax2 = 0
        assert (state.absmax2 == 0).all() and torch.equal(out, absmax)


def test_all_zero_weights_give_bitsandbytes_codes_and_zero_constants() -> None:
    W = torch.zeros(64, 64)
    _, nested = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = quantize_absmax(torch.zeros(64))
    assert torch.equal(state.codes, nested.absmax) and torch.equal(dequantize_absmax(state), torch.zeros(64))


def test_state_nbytes_counts_its_buffers_it_is_frozen_and_to_copies() -> None:
    state = quantize_absmax(torch.rand(1000) + 0.1)
    # 1000 uint8 codes + 4 float32 absmax2 + 1 float32 offset, counted from the buffers.
    assert state.nbytes == 1000 + 4 * 4 + 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.blocksize2 = 64  # type: ignore[misc]
    moved = state.to("cpu")
    assert moved is not state and torch.equal(dequantize_absmax(moved), dequantize_absmax(state))


@pytest.mark.parametrize("blocksize2", [64, 256, 4096])
def test_overhead_bits_equal_the_bits_of_the_state_buffers(blocksize2: int) -> None:
    blocks = 64 * 4096  # first-level blocks of a 16.8M-parameter tensor at blocksize 64
    state = quantize_absmax(torch.rand(blocks) + 0.1, blocksize2)
    counted = 8 * (state.nbytes - 4) / (64 * blocks)  # without the single offset
    assert counted == overhead_bits(64, blocksize2)


def test_overhead_bits_are_the_qlora_papers_0_5_and_0_127() -> None:
    assert overhead_bits(64, None) == 0.5  # QLoRA §3: 32/64
    assert overhead_bits(64, 256) == pytest.approx(0.127, abs=5e-4)  # 8/64 + 32/(64*256)
    assert overhead_bits(64, None) - overhead_bits(64, 256) == pytest.approx(0.373, abs=5e-4)


# --- the other 8-bit types of the chapter ---------------------------------------------------------


def test_roundtrip_absmax_dynamic_is_quantize_then_dequantize_absmax() -> None:
    absmax = torch.rand(777) + 0.2
    assert torch.equal(roundtrip_absmax(absmax), dequantize_absmax(quantize_absmax(absmax)))


@pytest.mark.parametrize("n_scaler_blocks", [1, 4])
def test_roundtrip_int8_matches_torchao(n_scaler_blocks: int) -> None:
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as nf4
    W = torch.randn(64 * 256 * n_scaler_blocks, generator=torch.Generator().manual_seed(n_scaler_blocks))
    q, factor, mean = nf4.NF4Tensor.double_quantize_scalers(W, 64, 256)
    ref = (q.view(-1, 256) / factor[:, None]).flatten() + mean
    absmax = W.view(-1, 64).abs().amax(dim=1)
    assert torch.equal(roundtrip_absmax(absmax, 256, "int8"), ref)


def test_roundtrip_fp8_e4m3_error_is_within_its_3_mantissa_bits_and_differs_from_dynamic() -> None:
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(0)) + 0.1
    out = roundtrip_absmax(absmax, 256, "fp8_e4m3")
    centred, back = absmax - absmax.mean(), out - absmax.mean()
    # E4M3 keeps 3 mantissa bits: relative error at most 2**-4 for values in its normal range.
    big = centred.abs() > centred.abs().max() * 2.0**-6 / 448 * 64
    assert ((back - centred).abs()[big] <= centred.abs()[big] * 2.0**-4 + 1e-7).all()
    assert not torch.equal(out, roundtrip_absmax(absmax, 256, "dynamic"))


def test_equal_constants_roundtrip_exactly_in_every_scheme() -> None:
    for scheme in ("dynamic", "fp8_e4m3", "int8"):
        assert torch.equal(roundtrip_absmax(torch.full((300,), 0.5), 256, scheme), torch.full((300,), 0.5))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("absmax", "error", "match"),
    [
        ([0.1, 0.2], TypeError, "absmax"),
        (torch.tensor([1, 2]), TypeError, "absmax"),
        (torch.tensor([0.1, 0.2], dtype=torch.float64), TypeError, "absmax"),
        (torch.rand(4, 4), ValueError, "absmax"),
        (torch.empty(0), ValueError, "absmax"),
        (torch.tensor([0.1, float("nan")]), ValueError, "absmax"),
        (torch.tensor([0.1, float("inf")]), ValueError, "absmax"),
    ],
)
def test_quantize_absmax_refuses_bad_absmax_naming_it(absmax, error, match) -> None:
    with pytest.raises(error, match=match):
        quantize_absmax(absmax)


@pytest.mark.parametrize(
    ("blocksize2", "error"),
    [(100, ValueError), (0, ValueError), (8192, ValueError), (True, TypeError), ("256", TypeError), (256.0, TypeError)],
)
def test_quantize_absmax_refuses_bad_blocksize2_naming_it(blocksize2, error) -> None:
    with pytest.raises(error, match="blocksize2"):
        quantize_absmax(torch.rand(10), blocksize2)


def test_quantize_blockwise_rejects_ints_empty_nan_bad_blocksize_and_bad_code() -> None:
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16"):
        quantize_8bit(torch.arange(10))
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        quantize_8bit([0.5, 1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="A must not be empty"):
        quantize_8bit(torch.empty(0))
    with pytest.raises(ValueError, match="A must contain only finite values"):
        quantize_8bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        quantize_8bit(torch.rand(10), blocksize=0)
    with pytest.raises(ValueError, match=r"code must be a float32 tensor of shape \(256,\)"):
        quantize_8bit(torch.rand(10), blocksize=64, code=torch.rand(10))
    with pytest.raises(ValueError, match="code must be sorted"):
        quantize_8bit(torch.rand(10), blocksize=64, code=torch.linspace(1, -1, 256))
    with pytest.raises(TypeError, match="code must be a torch.Tensor or None"):
        quantize_8bit(torch.rand(10), blocksize=64, code=[0.0] * 256)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shift must be a 0-dim float32"):
        quantize_8bit(torch.rand(10), blocksize=64, shift=torch.zeros(1))
    with pytest.raises(TypeError, match="shift must be a 0-dim float32"):
        quantize_8bit(torch.rand(10), blocksize=64, shift=0.5)  # type: ignore[arg-type]


def test_dequantize_blockwise_refuses_bad_codes_absmax_dtype_and_block_count_naming_them() -> None:
    codes, absmax = quantize_8bit(torch.rand(300), blocksize=64)
    with pytest.raises(TypeError, match="codes must be a uint8"):
        dequantize_8bit(codes.int(), absmax, 64)
    with pytest.raises(TypeError, match="absmax must be a 1-D float32"):
        dequantize_8bit(codes, absmax.double(), 64)
    with pytest.raises(TypeError, match="absmax must be a 1-D float32"):
        dequantize_8bit(codes, absmax[None], blocksize=64)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        dequantize_8bit(codes, absmax, blocksize=64, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"absmax must have 5 values \(one per block of 64\), got 4"):
        dequantize_8bit(codes, absmax[:-1], blocksize=64)


def test_double_quant_state_refuses_wrong_dtypes_sizes_and_blocksize2_naming_them() -> None:
    codes, absmax2, offset = torch.zeros(300, dtype=torch.uint8), torch.ones(2), torch.tensor(0.5)
    DoubleQuantState(codes, absmax2, offset)
    with pytest.raises(TypeError, match="codes"):
        DoubleQuantState(codes.float(), absmax2, offset)
    with pytest.raises(TypeError, match="absmax2"):
        DoubleQuantState(codes, absmax2.half(), offset)
    with pytest.raises(TypeError, match="offset"):
        DoubleQuantState(codes, absmax2, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absmax2"):
        DoubleQuantState(codes, torch.ones(3), offset)
    with pytest.raises(ValueError, match="offset"):
        DoubleQuantState(codes, absmax2, offset.view(1))
    with pytest.raises(ValueError, match="blocksize2"):
        DoubleQuantState(codes, absmax2, offset, blocksize2=100)
    with pytest.raises(ValueError, match="codes, absmax2 and offset must be on the same device"):
        DoubleQuantState(codes, absmax2.to("meta"), offset)


def test_dequantize_absmax_refuses_a_non_state_and_roundtrip_absmax_bad_absmax_or_scheme() -> None:
    codes, absmax2, offset = torch.zeros(300, dtype=torch.uint8), torch.ones(2), torch.tensor(0.5)
    with pytest.raises(TypeError, match="state must be a DoubleQuantState"):
        dequantize_absmax((codes, absmax2, offset))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        roundtrip_absmax(torch.rand(10), 256, "fp4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absmax must contain only finite values"):
        roundtrip_absmax(torch.tensor([0.1, float("inf")]), 256, "int8")
    with pytest.raises(TypeError, match="absmax must be float32"):
        roundtrip_absmax(torch.rand(10, dtype=torch.float64), 256, "int8")


# --- end to end through the NF4 module ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", [(300, 77), (512, 256), (7,)])
def test_nf4_with_double_quant_dequantizes_exactly_like_bitsandbytes(dtype: torch.dtype, blocksize: int,
                                                                     shape: tuple) -> None:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize + sum(shape))).to(dtype)
    packed, state = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    ref = bnb_dequantize_4bit_flat(packed, state)  # its CPU kernel is wrong for e.g. 512 x 256 in blocks of 512
    ours = dequantize_nf4(quantize_nf4(W, blocksize=blocksize, double_quant=True))
    assert ours.dtype == dtype and ours.shape == W.shape
    assert torch.equal(ours, ref)


def test_nf4_bits_per_param_is_4_5_plain_and_4_127_with_double_quant() -> None:
    W = torch.randn(4096, 4096)
    assert quantize_nf4(W, blocksize=64, double_quant=False).bits_per_param == pytest.approx(4.5, abs=1e-3)
    assert quantize_nf4(W, blocksize=64, double_quant=True).bits_per_param == pytest.approx(4.127, abs=1e-3)


def test_nf4_bnb_interop_carries_nested_state() -> None:
    W = torch.randn(300, 77, generator=torch.Generator().manual_seed(1))
    t = quantize_nf4(W, blocksize=64, double_quant=True)
    packed, state = to_bnb(t)
    assert state.nested and state.state2.blocksize == 256 and state.absmax.dtype == torch.uint8
    assert torch.equal(bnb_dequantize_4bit(packed, state), dequantize_nf4(t))  # 77 is odd: its public path is right
    ref_packed, ref_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(dequantize_nf4(from_bnb(ref_packed, ref_state)), bnb_dequantize_4bit(ref_packed, ref_state))


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_cuda_same_codes_as_cpu(blocksize: int) -> None:
    A = _heavy_tailed(3 * blocksize + 11, torch.float32, seed=blocksize)
    codes, absmax = quantize_8bit(A.cuda(), blocksize=blocksize)
    ref_codes, ref_absmax = quantize_8bit(A, blocksize=blocksize)
    assert codes.is_cuda and torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.cuda
def test_cuda_state_moves_every_buffer_and_dequantizes_as_on_the_cpu() -> None:
    state = quantize_absmax(torch.rand(1000) + 0.1)
    moved = state.to("cuda")
    assert moved.codes.is_cuda and moved.absmax2.is_cuda and moved.offset.is_cuda
    assert torch.equal(dequantize_absmax(moved).cpu(), dequantize_absmax(state))
