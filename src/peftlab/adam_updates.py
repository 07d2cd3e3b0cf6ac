"""AdamW's update rules on paged states, page by page: torch's single-tensor step, and
bitsandbytes' 32-bit and 8-bit blockwise steps.

Explained in the chapters *Paged optimizers* (book/chapters/paged.md, the 32-bit step)
and *LoRA variants* (book/chapters/variants.md, the 8-bit states). The optimizer that
keeps the states and chooses the rule is :class:`peftlab.paged.PagedAdamW`.

Adam is elementwise, so each rule runs on slices of the parameter and its gradient, one
page of each state at a time: it makes the pages resident
(:meth:`peftlab.pages.PagePool.make_resident`) and updates them in place. Each rule does
the same operations in the same order as its original, so the bits are the same as on the
whole tensor (tests/test_paged.py, tests/test_paged8bit.py).
"""

from __future__ import annotations

import math

import torch

from peftlab.double_quant import cached_dynamic_map, dequantize_8bit, quantize_8bit
from peftlab.pages import PagedTensor

__all__ = [
    "optimizer_update_32bit",
    "optimizer_update_8bit_blockwise",
    "single_tensor_adamw",
]


def single_tensor_adamw(
    p: torch.Tensor,
    exp_avg: PagedTensor,
    exp_avg_sq: PagedTensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
    step: float,
) -> None:
    """torch.optim.AdamW's single-tensor step (``_single_tensor_adamw``), page by page, on
    ``p`` from ``p.grad``.

    ``exp_avg`` and ``exp_avg_sq`` (m and v) are shaped like ``p``, paged alike, in
    ``p``'s dtype or wider (float32 for a 16-bit ``p``: then the update is computed in
    float32 and rounded to ``p``'s dtype once); ``wd`` is the decoupled weight decay and
    ``step`` the step number t, counted from 1.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    # 16-bit parameters: the update in float32 (the states' dtype), rounded once
    wide = exp_avg.dtype != p.dtype
    if wd != 0 and not wide:
        p.mul_(1 - lr * wd)
    p_flat, g_flat = p.view(-1), p.grad.reshape(-1)
    start = 0
    for m_page, v_page in zip(exp_avg.pages, exp_avg_sq.pages):
        exp_avg.pool.make_resident((m_page, v_page))
        m, v = m_page.data, v_page.data
        stop = start + m_page.numel
        # one page: skip making slices (Python time per param)
        whole = stop - start == p_flat.numel()
        g = g_flat if whole else g_flat[start:stop]
        target = p_flat if whole else p_flat[start:stop]
        if wide:
            g = g.to(m.dtype)
            target_wide = target.to(m.dtype)
            if wd != 0:
                target_wide.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        if wide:
            target.copy_(target_wide.addcdiv_(m, denom, value=-step_size))
        else:
            target.addcdiv_(m, denom, value=-step_size)
        start = stop


def optimizer_update_32bit(
    p: torch.Tensor,
    exp_avg: PagedTensor,
    exp_avg_sq: PagedTensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
    step: float,
) -> None:
    """bitsandbytes' CPU 32-bit Adam step (``_optimizer_update_32bit_cpu``, its
    operations in its order), page by page: the step ``AdamW8bit`` takes for
    parameters below ``min_8bit_size``.

    ``exp_avg`` and ``exp_avg_sq`` are float32, shaped like ``p`` and paged alike; the
    other arguments are as for :func:`single_tensor_adamw`.
    """
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    step_size = -lr * correction2 / correction1
    p_flat, g_flat = p.view(-1), p.grad.reshape(-1)
    start = 0
    for m_page, v_page in zip(exp_avg.pages, exp_avg_sq.pages):
        exp_avg.pool.make_resident((m_page, v_page))
        m, v = m_page.data, v_page.data
        stop = start + m_page.numel
        target = p_flat[start:stop]
        g = g_flat[start:stop].float()
        p32 = target.float()  # the parameter itself when float32, as in bitsandbytes
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if wd > 0.0:
            p32.mul_(1.0 - lr * wd)
        update = m / (v.sqrt() + eps * correction2)
        p32.add_(update, alpha=step_size)
        if p32 is not target:
            target.copy_(p32)
        start = stop


def optimizer_update_8bit_blockwise(
    p: torch.Tensor,
    m_codes: PagedTensor,
    m_absmax: PagedTensor,
    v_codes: PagedTensor,
    v_absmax: PagedTensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
    step: float,
    blocksize: int,
) -> None:
    """bitsandbytes' CPU 8-bit blockwise Adam step
    (``_optimizer_update_8bit_blockwise_cpu``), page by page and, within a page, in
    chunks of whole blocks whose float32 temporaries take at most ``page_bytes``.

    ``m_codes`` and ``v_codes`` are the uint8 codes of m (signed dynamic map) and v
    (unsigned), shaped like ``p``; ``m_absmax`` and ``v_absmax`` their float32 absmax, one
    per block of ``blocksize`` elements. The layout this relies on: a page of codes holds
    whole blocks, a page of absmax whole pages' worth of blocks (so a page of codes finds
    all its absmax in one page), and m's and v's are paged alike. The other arguments are
    as for :func:`single_tensor_adamw`.
    """
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    signed = cached_dynamic_map(str(p.device), True)
    unsigned = cached_dynamic_map(str(p.device), False)
    chunk = m_codes.pool.page_numel(4, blocksize)
    p_flat, g_flat = p.view(-1), p.grad.reshape(-1)
    blocks_per_absmax_page = m_absmax.pages[0].numel if m_absmax.pages else 1
    start = 0
    for mc, vc in zip(m_codes.pages, v_codes.pages):
        # the layout puts this page's blocks in one absmax page
        first = start // blocksize
        index, offset = divmod(first, blocks_per_absmax_page)
        ma, va = m_absmax.pages[index], v_absmax.pages[index]
        m_codes.pool.make_resident((mc, vc, ma, va))
        for lo in range(0, mc.numel, chunk):
            hi = min(lo + chunk, mc.numel)
            b_lo = offset + lo // blocksize
            b_hi = offset + -(-hi // blocksize)
            codes = (mc.data[lo:hi], vc.data[lo:hi])
            absmax = (ma.data[b_lo:b_hi], va.data[b_lo:b_hi])
            m = dequantize_8bit(codes[0], absmax[0], signed, blocksize)
            v = dequantize_8bit(codes[1], absmax[1], unsigned, blocksize)
            target = p_flat[start + lo : start + hi]
            g = g_flat[start + lo : start + hi].float()
            p32 = target.float()  # the parameter itself when float32
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (v.sqrt() / correction2).add_(eps)
            if wd > 0.0:
                p32.mul_(1.0 - lr * wd)
            p32.addcdiv_(m, denom, value=-lr / correction1)
            if p32 is not target:
                target.copy_(p32)
            # requantize with each block's new absmax
            for new, code, c_out, a_out in (
                (m, signed, codes[0], absmax[0]),
                (v, unsigned, codes[1], absmax[1]),
            ):
                new_codes, new_absmax = quantize_8bit(new, code, blocksize)
                c_out.copy_(new_codes)
                a_out.copy_(new_absmax)
        start += mc.numel
