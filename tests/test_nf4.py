"""NF4Tensor, quantize_nf4/dequantize_nf4, to_bnb/from_bnb: byte-identical to bitsandbytes 0.50.2."""

from __future__ import annotations

import math

import pytest
import torch

from _reference import (  # tests/_reference.py
    bnb_dequantize_4bit,
    bnb_dequantize_4bit_eager,
    bnb_dequantize_4bit_flat,
    bnbF,
)
from peftlab.codebooks import BLOCKSIZES, nf4_code, unpack_nibbles
from peftlab.nf4 import NF4Tensor, dequantize_nf4, from_bnb, quantize_nf4, to_bnb

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1,), (7,), (64,), (65,), (3, 5, 7), (33, 65), (7, 320), (2, 4096), (5000,)]


def sample(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- byte identity with bitsandbytes ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_nf4_bytes_and_dequantized_values_equal_bitsandbytes(dtype, shape, blocksize):
    w = sample(shape, dtype, seed=blocksize + len(shape))
    q = quantize_nf4(w, blocksize)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    out = dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1), bnb_dequantize_4bit_eager(packed, state).reshape(-1))
    if shape[-1] % blocksize == 0 or shape[-1] % 2:  # where the public CPU path is right (tests/_reference.py)
        assert torch.equal(out.reshape(-1), bnb_dequantize_4bit(packed, state).reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2.0**-10, 3.0])
def test_values_on_midpoints_quantize_like_bitsandbytes_and_ties_take_the_lower_code(dtype, scale):
    # A block of 64 holding +-absmax and values that land exactly on every midpoint after scaling.
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    inf = torch.tensor(float("inf"))
    body = torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), code[:1]])
    block = torch.cat([torch.tensor([1.0]), body, torch.zeros(64 - 1 - body.numel())])
    w = (block * scale).to(dtype)
    q = quantize_nf4(w, 64)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    if dtype == torch.float32 and scale != 3.0:  # exact scaling: the midpoints themselves take the lower code
        codes = unpack_nibbles(q.packed, w.numel())
        assert torch.equal(codes[1:16], torch.arange(15, dtype=torch.uint8))


@pytest.mark.parametrize(
    "values",
    [
        torch.zeros(100),  # all-zero blocks, full and partial
        torch.full((100,), -0.0),
        torch.tensor([1e-40, -3e-42] * 50),  # subnormal absmax
        torch.tensor([3e38, -1e38, 1.0] * 33),  # near float32 max
        torch.cat([torch.randn(63), torch.tensor([1e4]), torch.randn(36)]),  # one outlier
    ],
    ids=["zeros", "negative-zeros", "subnormal", "huge", "outlier"],
)
@pytest.mark.parametrize("blocksize", [32, 64])
def test_edge_values_identical_to_bitsandbytes(values, blocksize):
    q = quantize_nf4(values, blocksize)
    packed, state = bnbF.quantize_4bit(values, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnb_dequantize_4bit_eager(packed, state).reshape(-1))


def test_non_contiguous_input_quantizes_like_bitsandbytes_and_like_its_contiguous_copy():
    w = sample((64, 96), torch.float32).t()
    q = quantize_nf4(w, 32)
    packed, state = bnbF.quantize_4bit(w, blocksize=32, quant_type="nf4")
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(quantize_nf4(w.contiguous(), 32)))
    assert dequantize_nf4(q).shape == (96, 64)


@pytest.mark.parametrize("shape", [(7, 320), (256, 64)])  # rows straddling blocks of 128; rows shorter than one
def test_bnb_native_cpu_dequantize_4bit_is_wrong_for_2d_rows_straddling_a_block(shape):
    # Documents the bitsandbytes 0.50.2 CPU bug that tests/_reference.py routes around (the chapter says so
    # too): its native kernel disagrees with its own quantizer; its definition and its 1-D path agree with ours.
    w = sample(shape, torch.float32)
    packed, state = bnbF.quantize_4bit(w, blocksize=128, quant_type="nf4")
    codes = unpack_nibbles(packed, w.numel()).long()
    definition = (nf4_code()[codes] * state.absmax.repeat_interleave(128)[: w.numel()]).view(shape)
    ours = dequantize_nf4(quantize_nf4(w, 128))
    assert torch.equal(ours, definition)
    assert torch.equal(bnb_dequantize_4bit_eager(packed, state), definition)
    assert torch.equal(bnb_dequantize_4bit_flat(packed, state), definition)
    native = bnbF.dequantize_4bit(packed, state)
    if torch.equal(native, definition):
        pytest.skip("bitsandbytes' native CPU kernel is right here (fixed upstream?): drop the workaround in "
                    "tests/_reference.py")
    assert (native - w).abs().max() > (ours - w).abs().max()


# --- error bound: the nearest level -------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_dequantize_error_is_at_most_half_the_widest_level_gap_times_absmax(blocksize):
    code = nf4_code()
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    w = sample((3, 3000), torch.float32)
    q = quantize_nf4(w, blocksize)
    err = (dequantize_nf4(q) - w).abs().reshape(-1)
    scale = q.absmax.repeat_interleave(blocksize)[: w.numel()]
    assert bool((err <= scale * half_gap * (1 + 1e-6)).all())


# --- the tensor type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128,), (4096, 64), (1000, 33)])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nbytes_counts_codes_and_float32_absmax_and_bits_per_param_follows(shape, blocksize):
    q = quantize_nf4(sample(shape, torch.float32), blocksize)
    n = math.prod(shape)
    assert q.nbytes == (n + 1) // 2 + 4 * math.ceil(n / blocksize)
    assert q.bits_per_param == pytest.approx(8 * q.nbytes / n)
    if n % (2 * blocksize) == 0:
        assert q.bits_per_param == 4 + 32 / blocksize  # 4.5 for blocks of 64 (QLoRA §3)


def test_dequantize_dtype_override_is_cast_of_float32_result():
    w = sample((33, 65), torch.float32)
    q = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), dequantize_nf4(q).to(torch.bfloat16))
    assert q.dequantize(torch.float16).dtype == torch.float16


def test_to_same_device_copies_and_keeps_bytes():
    q = quantize_nf4(sample((100,), torch.float32), 32, double_quant=True)
    moved = q.to("cpu")
    assert moved is not q and torch.equal(moved.packed, q.packed)
    assert torch.equal(dequantize_nf4(moved), dequantize_nf4(q))


def test_nf4tensor_is_frozen_and_refuses_wrong_sizes_and_dtype():
    q = quantize_nf4(sample((100,), torch.float32), 32)
    with pytest.raises(AttributeError):
        q.blocksize = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="packed must hold"):
        NF4Tensor(q.packed[:-1], q.absmax, q.shape, q.dtype, 32)
    with pytest.raises(ValueError, match="absmax"):
        NF4Tensor(q.packed, q.absmax[:-1], q.shape, q.dtype, 32)
    with pytest.raises(TypeError, match="dtype"):
        NF4Tensor(q.packed, q.absmax, q.shape, torch.int8, 32)
    with pytest.raises(TypeError, match="packed must be a 1-D uint8"):
        NF4Tensor(q.packed.view(2, -1), q.absmax, q.shape, q.dtype, 32)
    with pytest.raises(TypeError, match="packed must be a 1-D uint8"):
        NF4Tensor(q.packed.to(torch.int16), q.absmax, q.shape, q.dtype, 32)
    with pytest.raises(TypeError, match="absmax must be a float32 tensor or a DoubleQuantState"):
        NF4Tensor(q.packed, q.absmax.tolist(), q.shape, q.dtype, 32)
    with pytest.raises(ValueError, match=r"packed \(meta\) and absmax \(cpu\) must be on the same device"):
        NF4Tensor(q.packed.to("meta"), q.absmax, q.shape, q.dtype, 32)
    assert "NF4Tensor(shape=(100,)" in repr(q)


def test_nf4tensor_refuses_double_quantized_constants_of_another_block_count():
    q = quantize_nf4(sample((100,), torch.float32), 32, double_quant=True)
    other = quantize_nf4(sample((200,), torch.float32), 32, double_quant=True)
    with pytest.raises(ValueError, match="absmax must hold 4 codes, got 7"):
        NF4Tensor(q.packed, other.absmax, q.shape, q.dtype, 32)


# --- interchange with bitsandbytes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (33, 64), (3, 5, 7)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_to_bnb_is_what_bitsandbytes_builds(dtype, shape, double_quant):
    w = sample(shape, dtype, seed=1)
    packed, state = to_bnb(quantize_nf4(w, 32, double_quant=double_quant))
    bpacked, bstate = bnbF.quantize_4bit(w, blocksize=32, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(packed, bpacked) and packed.shape == bpacked.shape
    assert torch.equal(state.absmax, bstate.absmax)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (
        bstate.shape,
        bstate.dtype,
        bstate.blocksize,
        bstate.quant_type,
    )
    assert torch.equal(state.code, bstate.code)
    assert state.nested == bstate.nested
    if double_quant:
        assert torch.equal(state.offset, bstate.offset)
        assert torch.equal(state.state2.absmax, bstate.state2.absmax)
        assert torch.equal(state.state2.code, bstate.state2.code)
        assert state.state2.blocksize == bstate.state2.blocksize
    assert torch.equal(bnb_dequantize_4bit(packed, state), bnb_dequantize_4bit(bpacked, bstate))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (64, 64), (3, 5, 7), (2, 4096)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_reads_bitsandbytes(dtype, shape, double_quant):
    w = sample(shape, dtype, seed=2)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = from_bnb(packed, state)
    assert q.shape == w.shape and q.dtype == dtype and q.blocksize == 64 and q.double_quant == double_quant
    assert torch.equal(dequantize_nf4(q).reshape(-1), bnb_dequantize_4bit_eager(packed, state).reshape(-1))
    ours = quantize_nf4(w, 64, double_quant=double_quant)
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(ours))
    back_packed, back_state = to_bnb(q)
    assert torch.equal(back_packed, packed) and torch.equal(back_state.absmax, state.absmax)


def test_double_quant_bits_per_param_counts_real_buffers():
    n = 4096 * 64
    q = quantize_nf4(sample((4096, 64), torch.float32), 64, double_quant=True)
    blocks = n // 64
    expected_bytes = n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4  # codes, 8-bit absmax, absmax2, offset
    assert q.nbytes == expected_bytes
    assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert q.bits_per_param == pytest.approx(4.127, abs=5e-4)  # QLoRA §3


def test_from_bnb_refuses_fp4_and_non_states():
    packed, state = bnbF.quantize_4bit(torch.randn(64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type"):
        from_bnb(packed, state)
    with pytest.raises(TypeError, match="QuantState"):
        from_bnb(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
        from_bnb(packed.tolist(), state)
    with pytest.raises(TypeError, match="NF4Tensor"):
        to_bnb(packed)


def test_from_bnb_refuses_states_whose_tables_are_not_nf4_and_the_dynamic_map():
    packed, state = bnbF.quantize_4bit(torch.randn(512), blocksize=64, quant_type="nf4", compress_statistics=True)
    state.code = state.code.flip(0)
    with pytest.raises(ValueError, match="state.code is not the NF4 table"):
        from_bnb(packed, state)
    packed, state = bnbF.quantize_4bit(torch.randn(512), blocksize=64, quant_type="nf4", compress_statistics=True)
    state.state2.code = torch.linspace(-1, 1, 256)
    with pytest.raises(ValueError, match="state.state2.code is not bitsandbytes' signed dynamic map"):
        from_bnb(packed, state)


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_quantize_nf4_refuses_non_float_dtypes_naming_w(dtype):
    with pytest.raises(TypeError, match="w must be float32, float16 or bfloat16"):
        quantize_nf4(torch.zeros(64, dtype=dtype))


def test_quantize_nf4_refuses_a_non_tensor_naming_w():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_nf4([0.1] * 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 70])  # a full block, the trailing partial block
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_nf4_refuses_non_finite_values_in_full_and_partial_blocks(bad, where, dtype):
    w = torch.randn(100).to(dtype)
    w[where] = bad
    with pytest.raises(ValueError, match="w must be finite"):
        quantize_nf4(w, 64)


def test_quantize_nf4_refuses_an_empty_tensor():
    with pytest.raises(ValueError, match="w must not be empty"):
        quantize_nf4(torch.zeros(0, 64))


@pytest.mark.parametrize("bad", [64.0, "64", True, None])
def test_quantize_nf4_refuses_a_non_int_blocksize(bad):
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize_nf4(torch.randn(64), bad)


@pytest.mark.parametrize("bad", [0, -64, 16, 48, 8192])
def test_quantize_nf4_refuses_other_blocksizes_naming_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\)"):
        quantize_nf4(torch.randn(64), bad)


def test_quantize_nf4_refuses_a_non_bool_double_quant():
    with pytest.raises(TypeError, match="double_quant"):
        quantize_nf4(torch.randn(64), 64, double_quant="yes")


@pytest.mark.parametrize("bad", [torch.randn(4), None, (torch.zeros(2, dtype=torch.uint8), torch.ones(1))])
def test_dequantize_nf4_refuses_anything_but_an_nf4tensor(bad):
    with pytest.raises(TypeError, match="q must be an NF4Tensor"):
        dequantize_nf4(bad)


def test_dequantize_nf4_refuses_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(quantize_nf4(torch.randn(64)), torch.int8)


# --- dequantizing into a caller's buffer (out=) ---------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (65,), (33, 65), (7, 320), (64, 128)])
def test_dequantize_into_out_equals_the_fresh_result_bit_for_bit_and_returns_out(shape, dtype, double_quant):
    q = quantize_nf4(sample(shape, torch.float32), 64, double_quant=double_quant)
    for target in (torch.float32, dtype):
        fresh = dequantize_nf4(q, target)
        out = torch.full(shape, float("nan"), dtype=target)  # NaN: a value left unwritten would show
        got = dequantize_nf4(q, target, out=out)
        assert got is out
        assert torch.equal(out.view(-1).view(torch.uint8), fresh.view(-1).view(torch.uint8))  # the same bytes
    assert q.dequantize(out=torch.empty(shape)).dtype == torch.float32


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(2, 4096), (5000,), (33, 65)])
def test_dequantize_in_many_small_cpu_steps_equals_one_step_and_bitsandbytes(monkeypatch, shape, blocksize):
    import peftlab.codebooks as codebooks

    w = sample(shape, torch.float32, seed=3)
    q = quantize_nf4(w, blocksize, double_quant=True)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    monkeypatch.setattr(codebooks, "_CPU_STEP_BYTES", 1 << 30)
    one_step = dequantize_nf4(q)
    monkeypatch.setattr(codebooks, "_CPU_STEP_BYTES", 1)  # rounded up to one block per step
    many_steps = dequantize_nf4(q, out=torch.empty(shape))
    assert torch.equal(many_steps, one_step)
    assert torch.equal(many_steps.reshape(-1), bnb_dequantize_4bit_eager(packed, state).reshape(-1))


def test_dequantize_out_of_the_wrong_shape_raises_value_error_naming_out_and_the_shape():
    q = quantize_nf4(torch.randn(8, 64))
    for bad in (torch.empty(64, 8), torch.empty(512), torch.empty(8, 65)):
        with pytest.raises(ValueError, match=r"out must have shape \(8, 64\)"):
            dequantize_nf4(q, out=bad)


def test_dequantize_out_of_the_wrong_dtype_raises_type_error_naming_out_and_the_dtype():
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(TypeError, match="out must have dtype torch.float32"):
        dequantize_nf4(q, out=torch.empty(8, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out must have dtype torch.float16"):
        dequantize_nf4(q, torch.float16, out=torch.empty(8, 64))


def test_dequantize_out_on_another_device_raises_value_error_naming_out_and_the_device():
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="out must be on cpu"):
        dequantize_nf4(q, out=torch.empty(8, 64, device="meta"))


def test_dequantize_out_that_is_not_a_writable_contiguous_tensor_raises_naming_out():
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        dequantize_nf4(q, out=[0.0] * 512)
    with pytest.raises(ValueError, match="out must be contiguous"):
        dequantize_nf4(q, out=torch.empty(64, 8).t())
    with pytest.raises(ValueError, match="out must not require grad"):
        dequantize_nf4(q, out=torch.empty(8, 64, requires_grad=True))


# --- CUDA: the same bytes on the GPU, and bitsandbytes' CUDA kernels ----------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_cuda_equals_cpu_and_bitsandbytes_cuda(dtype, blocksize):
    w = sample((1024, 768), dtype, seed=3)
    q_cpu = quantize_nf4(w, blocksize)
    q_gpu = quantize_nf4(w.cuda(), blocksize)
    assert q_gpu.device.type == "cuda"
    assert torch.equal(q_gpu.packed.cpu(), q_cpu.packed) and torch.equal(q_gpu.absmax.cpu(), q_cpu.absmax)
    assert torch.equal(q_cpu.to("cuda").packed, q_gpu.packed)
    assert torch.equal(dequantize_nf4(q_gpu).cpu(), dequantize_nf4(q_cpu))
    packed, state = bnbF.quantize_4bit(w.cuda(), blocksize=blocksize, quant_type="nf4")
    assert torch.equal(state.absmax.cpu(), q_cpu.absmax)
    # bitsandbytes' CUDA quantizer compares with hard-coded float thresholds, which may sit one ulp
    # from our float32 midpoints: allow a rare disagreement, and only to the neighbouring level.
    theirs = unpack_nibbles(packed.cpu(), w.numel()).int()
    ours = unpack_nibbles(q_cpu.packed, w.numel()).int()
    differ = theirs != ours
    assert int(differ.sum()) <= 1e-6 * ours.numel()
    assert bool(((theirs - ours)[differ].abs() == 1).all())
    # bitsandbytes' CUDA dequantize of our bytes equals ours exactly.
    gpu_packed, gpu_state = to_bnb(q_gpu)
    assert torch.equal(bnb_dequantize_4bit(gpu_packed, gpu_state).cpu(), dequantize_nf4(q_cpu))


@pytest.mark.cuda
def test_cuda_double_quant_to_bnb_dequantizes_in_bitsandbytes_like_ours():
    w = sample((256, 512), torch.bfloat16, seed=4).cuda()
    q = quantize_nf4(w, 64, double_quant=True)
    packed, state = to_bnb(q)
    assert torch.equal(bnb_dequantize_4bit(packed, state), dequantize_nf4(q))


def test_trailing_block_divides_and_full_blocks_multiply_by_the_reciprocal_like_bnb():
    # Values whose bucket differs between x / absmax and x * (1 / absmax) (found by search, checked
    # below): bitsandbytes divides in the trailing partial block and multiplies in full blocks.
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    a = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) + 0.5
    x = mids[3] * a
    split = (x / a <= mids[3]) != (x * (1.0 / a) <= mids[3])
    i = int(split.nonzero()[0])
    pair = torch.tensor([a[i].item(), x[i].item()])
    for w in (pair, torch.cat([torch.randn(64), pair]), torch.cat([pair, torch.zeros(62)])):
        q = quantize_nf4(w, 64)  # the pair sits in a trailing block, then in a full block
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
