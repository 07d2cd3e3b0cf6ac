"""Tests of peftlab.pages and peftlab.paged against torch.optim.AdamW (and bitsandbytes' PagedAdamW on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from peftlab.measure import count_saved_bytes
from peftlab.paged import PagedAdamW
from peftlab.pages import DEFAULT_PAGE_BYTES, PagedTensor, PagePool, PoolMemoryError

SHAPES = [(37,), (64, 33), (5, 7, 3), (1000,), (0,)]


def _params(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).to(p.device) for p in params]


SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _run_pair(dtype, page_bytes, capacity, perturb, device="cpu", steps=25, round_ref=False, **hyper):
    """Run torch's AdamW and ours side by side on the same gradients; perturb the pool between steps.

    For 16-bit ``dtype`` torch's AdamW runs on a float32 copy (float32 states, as bitsandbytes keeps
    them); with ``round_ref`` the copy is rounded to ``dtype`` after each step, as the parameter is.
    """
    init = _params(dtype, device)
    ref_dtype = torch.float32 if dtype in SIXTEEN_BIT else dtype
    ref = [p.to(ref_dtype, copy=True).requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    pool = PagePool(capacity, device=device, page_bytes=page_bytes)
    opt_ref = torch.optim.AdamW(ref, foreach=False, **hyper)  # the single-tensor path (CUDA defaults to foreach)
    opt = PagedAdamW(ours, pool=pool, **hyper)
    for step in range(steps):
        for a, b, g in zip(ref, ours, _grads(init, step)):
            a.grad, b.grad = g.to(ref_dtype), g.clone()
        opt_ref.step()
        opt.step()
        if round_ref:
            with torch.no_grad():
                for a in ref:
                    a.copy_(a.to(dtype))
        perturb(pool, step)
    return ref, ours, opt_ref, opt, pool


def _no_paging(pool, step):
    pass


def _spike(pool, step):
    with pool.reserve(pool.capacity_bytes * 3 // 4, label=f"spike {step}"):
        pass


def _evict_all(pool, step):
    if step % 3 == 0:
        pool.evict_all()


def _assert_same(ref, ours, opt_ref, opt):
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a)
        st_ref, st = opt_ref.state[a], opt.state[b]
        torch.testing.assert_close(st["exp_avg"].to_tensor(), st_ref["exp_avg"])
        torch.testing.assert_close(st["exp_avg_sq"].to_tensor(), st_ref["exp_avg_sq"])
        assert st["step"].item() == st_ref["step"].item()


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each ``|x|`` (as float32)."""
    xa = x.detach().abs().to(dtype)
    return (torch.nextafter(xa, torch.full_like(xa, math.inf)) - xa).float()


# -- PagedAdamW takes torch.optim.AdamW's steps --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("page_bytes", [64, 200, DEFAULT_PAGE_BYTES])
@pytest.mark.parametrize("perturb", [_no_paging, _spike, _evict_all])
def test_matches_torch_adamw(dtype, page_bytes, perturb):
    capacity = 4 * page_bytes if page_bytes < DEFAULT_PAGE_BYTES else 40 * 1024
    ref, ours, opt_ref, opt, pool = _run_pair(dtype, page_bytes, capacity, perturb, lr=1e-2)
    _assert_same(ref, ours, opt_ref, opt)
    if perturb is not _no_paging:
        assert pool.stats.page_outs > 0 and pool.stats.page_ins > 0
    # the parameters moved: equality is not trivial
    assert not torch.equal(ours[1].detach(), _params(dtype)[1])


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("page_bytes", [64, 200, DEFAULT_PAGE_BYTES])
@pytest.mark.parametrize("perturb", [_no_paging, _spike, _evict_all])
def test_16bit_params_take_torch_adamw_steps_on_a_float32_copy_rounded_each_step(dtype, page_bytes, perturb):
    capacity = 4 * page_bytes if page_bytes < DEFAULT_PAGE_BYTES else 40 * 1024
    ref, ours, opt_ref, opt, _ = _run_pair(dtype, page_bytes, capacity, perturb, round_ref=True, lr=1e-2)
    for a, b in zip(ref, ours):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a.detach().to(dtype), rtol=0, atol=0)
        st_ref, st = opt_ref.state[a], opt.state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].dtype == torch.float32  # as bitsandbytes' 32-bit optimizers keep them
            torch.testing.assert_close(st[key].to_tensor(), st_ref[key], rtol=0, atol=0)
    assert not torch.equal(ours[1].detach(), _params(dtype)[1])


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_16bit_params_stay_within_one_rounding_per_step_of_torch_adamw_on_a_float32_copy(dtype):
    steps, lr = 200, 1e-2
    ref, ours, _, opt, _ = _run_pair(dtype, 256, 4096, _spike, steps=steps, lr=lr)
    for a, b in zip(ref, ours):
        # each step rounds once: at most half a spacing of the largest value on the way
        bound = steps * 0.5 * _ulp(a.detach().abs() + 2 * lr * steps, dtype)
        assert ((b.float() - a.detach()).abs() <= bound).all()
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("scale", [1e-6, 1e-4, 1e-2, 1.0])
def test_float16_params_stay_finite_with_ordinary_gradients(scale):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, dtype=torch.float16) * 0.02)
    opt = PagedAdamW([p], lr=1e-4)
    for _ in range(300):
        p.grad = (torch.randn(4096) * scale).half()
        opt.step()
        assert torch.isfinite(p).all()
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("which", ["AdamW", "PagedAdamW"])
def test_16bit_params_match_bitsandbytes_32bit_adamw_on_cpu(dtype, which):
    # bitsandbytes 0.50.2 on a CPU: float32 states, update in float32 rounded back to the
    # parameter's dtype (backends/cpu/ops.py); its paged optimizer falls back to unpaged.
    import bitsandbytes as bnb
    init = [p.to(dtype) for p in _params(torch.float32)] + [torch.randn(150_000, generator=torch.Generator().manual_seed(7)).to(dtype)]
    theirs = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    hyper = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    cls = getattr(bnb.optim, which)
    opt_bnb = cls(theirs, **hyper) if which == "PagedAdamW" else cls(theirs, optim_bits=32, **hyper)
    opt = PagedAdamW(ours, pool=PagePool(2**16, page_bytes=4096), **hyper)
    for step in range(100):
        for a, b, g in zip(theirs, ours, _grads(init, step)):
            a.grad, b.grad = (g * 1e-2).to(dtype), (g * 1e-2).to(dtype)
        opt_bnb.step()
        opt.step()
        with opt.pool.reserve(2**15):
            pass
    for a, b in zip(theirs, ours):
        st_bnb, st = opt_bnb.state[a], opt.state[b]
        assert st_bnb["state1"].dtype == st["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(st["exp_avg"].to_tensor(), st_bnb["state1"], rtol=1e-5, atol=1e-8)  # gradients ~1e-2
        torch.testing.assert_close(st["exp_avg_sq"].to_tensor(), st_bnb["state2"], rtol=1e-5, atol=1e-12)
        # the same float32 update in another order of operations: now and then one rounding apart
        diff = (b.float() - a.float()).abs()
        assert (diff <= 2 * torch.maximum(_ulp(a, dtype), _ulp(b, dtype))).all()
        assert (b != a).sum() <= max(1, b.numel() // 1000)
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_16bit_state_dict_round_trips_with_torch_adamw_in_float32(dtype):
    ref, ours, opt_ref, opt, _ = _run_pair(dtype, 128, 1024, _spike, steps=5, round_ref=True)
    sd = opt.state_dict()
    assert all(s[k].dtype == torch.float32 for s in sd["state"].values() for k in ("exp_avg", "exp_avg_sq"))
    fresh = PagedAdamW(ours, pool=PagePool(1024, page_bytes=128))
    fresh.load_state_dict(opt_ref.state_dict())  # torch's loader would cast to the params' dtype
    for s_fresh, s_ref in zip(fresh.state.values(), opt_ref.state.values()):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s_fresh[k].to_tensor(), s_ref[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=3e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.0),
        dict(lr=1e-1, betas=(0.0, 0.0), eps=1e-3, weight_decay=0.3),
        dict(),  # the defaults must be torch's
    ],
)
def test_matches_torch_adamw_hyperparameters(hyper):
    ref, ours, opt_ref, opt, _ = _run_pair(torch.float32, 128, 1024, _spike, **hyper)
    _assert_same(ref, ours, opt_ref, opt)


def test_param_groups_match_adamw_and_a_param_without_grad_gets_no_state():
    init = _params(torch.float32)
    ref = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "weight_decay": 0.5}]  # noqa: E731
    opt_ref, opt = torch.optim.AdamW(groups(ref)), PagedAdamW(groups(ours), pool=PagePool(512, page_bytes=128))
    for step in range(10):
        for i, (a, b, g) in enumerate(zip(ref, ours, _grads(init, step))):
            if i != 3:  # parameter 3 never gets a gradient
                a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a)
    assert ours[3] not in opt.state and torch.equal(ours[3].detach(), init[3])


def test_training_a_model_with_paged_states_matches_adamw():
    torch.manual_seed(0)
    model_ref = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    model.load_state_dict(model_ref.state_dict())
    pool = PagePool(2048, page_bytes=512)  # four pages: the states (about 5 KiB each) never fit together
    opt_ref, opt = torch.optim.AdamW(model_ref.parameters(), lr=1e-2), PagedAdamW(model.parameters(), lr=1e-2, pool=pool)
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for _ in range(25):
        for m, o in ((model_ref, opt_ref), (model, opt)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
    for a, b in zip(model_ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a)
    assert pool.stats.page_outs > 0


def test_step_returns_the_closures_loss_and_updates():
    p = torch.nn.Parameter(torch.ones(3))
    opt = PagedAdamW([p], pool=PagePool(1024))

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert (p < 1).all()


def test_state_dict_round_trips_with_torch_adamw():
    ref, ours, opt_ref, opt, _ = _run_pair(torch.float32, 128, 1024, _spike, steps=5)
    sd = opt.state_dict()
    assert all(isinstance(v, torch.Tensor) for s in sd["state"].values() for v in s.values())
    # ours -> torch and torch -> ours, then both continue identically
    fresh_ref = torch.optim.AdamW(ref)
    fresh_ref.load_state_dict(sd)
    pool = PagePool(1024, page_bytes=128)
    fresh = PagedAdamW(ours, pool=pool)
    fresh.load_state_dict(opt_ref.state_dict())
    for step in range(5, 10):
        for a, b, g in zip(ref, ours, _grads(ref, step)):
            a.grad, b.grad = g.clone(), g.clone()
        fresh_ref.step()
        fresh.step()
    _assert_same(ref, ours, fresh_ref, fresh)
    # loading again frees the old pages: the accounting holds only the new states
    fresh.load_state_dict(fresh.state_dict())
    total = sum(2 * p.numel() * 4 for p in ours)
    assert pool.stats.resident_bytes + pool.stats.host_bytes == total


# -- the pool ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("numel,page_bytes", [(10, 8), (1000, 256), (1000, 4000), (7, 3), (0, 64)])
def test_pages_split_exactly_and_round_trip(dtype, numel, page_bytes):
    pool = PagePool(10**6, page_bytes=page_bytes)
    x = torch.randn(numel).to(dtype)
    paged = pool.from_tensor(x)
    itemsize = x.element_size()
    page_numel = max(page_bytes // itemsize, 1)
    assert [p.numel for p in paged.pages] == [min(page_numel, numel - s) for s in range(0, numel, page_numel)]
    assert paged.nbytes == numel * itemsize == pool.stats.resident_bytes
    pool.evict_all()
    assert pool.stats.resident_bytes == 0 and pool.stats.host_bytes == numel * itemsize
    assert torch.equal(paged.to_tensor(), x)


def test_reserve_evicts_least_recently_used_first():
    pool = PagePool(3 * 400, page_bytes=400)
    a, b, c = (pool.zeros((100,)) for _ in range(3))  # one 400-byte page each; pool full
    pool.make_resident(a.pages)  # a is now the most recently used; b the least
    with pool.reserve(400):
        assert [t.pages[0].data is None for t in (a, b, c)] == [False, True, False]
        with pool.reserve(400):
            assert [t.pages[0].data is None for t in (a, b, c)] == [False, True, True]
        s = pool.stats
        assert (s.reserved_bytes, s.resident_bytes, s.host_bytes, s.device_bytes) == (400, 400, 800, 800)
    # pages are not paged back when the spike ends, only when used
    assert pool.stats.host_bytes == 800 and pool.stats.reserved_bytes == 0


def test_reserve_evicts_only_what_the_spike_needs():
    pool = PagePool(10 * 100, page_bytes=100)
    pool.zeros((250,))  # 10 pages of 100 bytes fill the pool
    with pool.reserve(301):
        assert pool.stats.page_outs == 4 and pool.stats.paged_out_bytes == 400
    assert pool.stats.peak_device_bytes == 1000


def test_stats_count_the_bytes_moved_and_the_timeline_records_each_event_in_order():
    pool = PagePool(1000, page_bytes=100)
    t = pool.zeros((200,))  # 800 bytes, 8 pages
    pool.mark("step 0")
    with pool.reserve(500, label="long sequence"):
        pass
    pool.make_resident(t.pages)
    s = pool.stats
    assert (s.paged_out_bytes, s.paged_in_bytes, s.page_outs, s.page_ins) == (300, 300, 3, 3)
    assert s.peak_device_bytes == 1000 and s.device_bytes == 800 and s.host_bytes == 0
    kinds = [e.kind for e in s.timeline]
    assert kinds == ["alloc", "mark", "page_out", "page_out", "page_out", "reserve", "release"] + ["page_in"] * 3
    spike = s.timeline[kinds.index("reserve")]
    assert (spike.label, spike.device_bytes, spike.host_bytes, spike.reserved_bytes) == ("long sequence", 1000, 300, 500)
    assert all(e.seconds >= 0 for e in s.timeline) and s.paging_seconds >= 0
    assert [e.seconds for e in s.timeline] == sorted(e.seconds for e in s.timeline)


def test_reservation_released_on_exception():
    pool = PagePool(1000)
    with pytest.raises(RuntimeError, match="boom"):
        with pool.reserve(600):
            raise RuntimeError("boom")
    assert pool.stats.reserved_bytes == 0
    with pool.reserve(1000):  # the whole budget is available again
        pass


def test_refused_spike_changes_nothing():
    init = _params(torch.float32)
    ours = [p.clone().requires_grad_() for p in init]
    pool = PagePool(4096, page_bytes=256)
    opt = PagedAdamW(ours, pool=pool)
    for a, g in zip(ours, _grads(init, 0)):
        a.grad = g
    opt.step()
    with pool.reserve(2000):  # some pages now on host, some on device
        pass

    def snapshot():
        params = [p.detach().clone() for p in ours]
        states = [(s["exp_avg"].to_tensor(), s["exp_avg_sq"].to_tensor(), s["step"].item()) for s in opt.state.values()]
        residency = [pg.data is None for s in opt.state.values() for pg in s["exp_avg"].pages + s["exp_avg_sq"].pages]
        return params, states, residency

    before, stats = snapshot(), pool.stats
    assert any(before[2]) and not all(before[2])
    with pool.reserve(1000):
        mid, mid_stats = snapshot(), pool.stats
        with pytest.raises(PoolMemoryError) as err:
            with pool.reserve(4096 - 1000 + 1, label="long sequence"):
                pass  # pragma: no cover
        assert isinstance(err.value, MemoryError)
        msg = str(err.value)
        assert "3,097 bytes requested" in msg and "4,096" in msg and "1,000" in msg and "long sequence" in msg
        assert (err.value.requested, err.value.capacity, err.value.reserved) == (3097, 4096, 1000)
        after = snapshot()
        assert pool.stats == mid_stats  # no page moved, nothing recorded
    for x, y in zip(before[0] + mid[0], after[0] + after[0]):
        assert torch.equal(x, y)
    for (m0, v0, s0), (m1, v1, s1) in zip(before[1], after[1]):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and s0 == s1
    assert mid[2] == after[2]
    assert stats.reserved_bytes == pool.stats.reserved_bytes == 0


def test_refused_spike_moves_no_page():
    pool = PagePool(1000, page_bytes=100)
    t = pool.zeros((250,))
    with pytest.raises(PoolMemoryError, match="1,001 bytes requested"):
        with pool.reserve(1001):
            pass  # pragma: no cover
    s = pool.stats
    assert s.page_outs == 0 and s.resident_bytes == 1000 and all(p.data is not None for p in t.pages)
    assert [e.kind for e in s.timeline] == ["alloc"]


def test_step_refused_when_pages_cannot_fit_changes_nothing():
    p = torch.nn.Parameter(torch.randn(100))
    pool = PagePool(1000, page_bytes=400)
    opt = PagedAdamW([p], pool=pool)
    p.grad = torch.randn(100)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].to_tensor(), opt.state[p]["step"].item())
    with pool.reserve(300):  # 700 bytes left < one 400-byte page of each state
        with pytest.raises(PoolMemoryError, match="one page of each AdamW state"):
            opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"].to_tensor(), before[1])
    assert opt.state[p]["step"].item() == before[2]


def test_a_state_page_in_use_is_not_evicted_to_page_in_its_partner():
    # Two parameters of one 400-byte page each, in a pool of three pages: after the first step the pool holds
    # [v1, m2, v2] (LRU first) and m1 is on the host. Paging m1 back in for p1's update must evict m2, not v1,
    # the least recently used but in use for the same update: each update then pages one state in and one out.
    params = [torch.nn.Parameter(torch.randn(100)) for _ in range(2)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    pool = PagePool(3 * 400, page_bytes=400)
    opt, opt_ref = PagedAdamW(params, lr=1e-2, pool=pool), torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(4):
        for a, b, g in zip(params, ref, _grads(params, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        assert (pool.stats.page_outs, pool.stats.page_ins) == (1 + 2 * step, 2 * step)
    m1, v1 = (opt.state[params[0]][k].pages[0] for k in ("exp_avg", "exp_avg_sq"))
    assert m1.data is None and v1.data is not None  # p2's update evicted m1 again, and kept v1
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b)


def test_pool_of_exactly_two_pages_thrashes_but_is_correct():
    ref, ours, opt_ref, opt, pool = _run_pair(torch.float32, 64, 128, _no_paging, steps=10)
    _assert_same(ref, ours, opt_ref, opt)
    assert pool.stats.peak_device_bytes <= 128 and pool.stats.page_ins > 0


def test_default_pool_of_cpu_params_is_on_the_cpu_and_never_pages():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = PagedAdamW([p])
    p.grad = torch.randn(1000)
    opt.step()
    assert opt.pool.device == torch.device("cpu")
    assert opt.pool.stats.page_outs == 0


def test_pool_zeros_returns_a_paged_tensor():
    assert isinstance(PagePool(100).zeros((3,)), PagedTensor)


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(capacity_bytes=0), ValueError, "capacity_bytes"),
        (dict(capacity_bytes=-5), ValueError, "capacity_bytes"),
        (dict(capacity_bytes=1.5), TypeError, "capacity_bytes"),
        (dict(capacity_bytes=True), TypeError, "capacity_bytes"),
        (dict(capacity_bytes=100, page_bytes=0), ValueError, "page_bytes"),
        (dict(capacity_bytes=100, page_bytes="2MiB"), TypeError, "page_bytes"),
        (dict(capacity_bytes=100, device="meta"), ValueError, "device"),
        (dict(capacity_bytes=100, device="not a device"), ValueError, "device"),
        (dict(capacity_bytes=100, timeline_len=0), ValueError, "timeline_len"),
    ],
)
def test_pool_refuses_bad_capacity_page_bytes_and_device_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PagePool(**kwargs)


def test_pool_refuses_cuda_where_torch_sees_no_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device is 'cuda' but torch.cuda.is_available"):
        PagePool(100, device="cuda")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=math.nan), ValueError, "lr"),
        (dict(lr=math.inf), ValueError, "lr"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9, math.nan)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9,)), TypeError, "betas"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(pool="big"), TypeError, "pool"),
    ],
)
def test_optimizer_refuses_bad_hyperparameters_and_pool_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_optimizer_refuses_bad_group_lr_complex_non_contiguous_and_sparse_params():
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -1.0}], pool=PagePool(100))
    with pytest.raises(TypeError, match="floating-point"):
        PagedAdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], pool=PagePool(100))
    p = torch.nn.Parameter(torch.zeros(4, 4).t())
    opt = PagedAdamW([p], pool=PagePool(1000))
    p.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    e = torch.nn.Embedding(10, 3, sparse=True)
    opt = PagedAdamW(e.parameters(), pool=PagePool(1000))
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("nbytes,exc", [(-1, ValueError), (1.0, TypeError), (None, TypeError)])
def test_reserve_refuses_non_int_and_negative_nbytes(nbytes, exc):
    pool = PagePool(100)
    with pytest.raises(exc, match="nbytes"):
        with pool.reserve(nbytes):
            pass  # pragma: no cover


# -- CUDA plumbing, testable on a CPU ------------------------------------------------------------------
def test_pool_is_on_the_cpu_unless_told_even_with_cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is present, but not asked for
    pool = PagePool(1024)
    assert pool.device == torch.device("cpu") and not pool.non_blocking
    opt = PagedAdamW([torch.nn.Parameter(torch.randn(10))], pool=pool)  # CPU parameters fit a default pool
    assert opt.pool is pool


def test_cpu_pool_times_its_copies_by_the_clock():
    pool = PagePool(256, page_bytes=128)
    t = pool.from_tensor(torch.arange(64, dtype=torch.float32))  # two pages: the pool is full
    pool.evict_all()
    pool.make_resident(t.pages)
    s = pool.stats
    assert s.page_outs == 2 and s.page_ins == 2 and s.paging_seconds > 0


class _FakeEvent:
    """Stands in for torch.cuda.Event: records where it was recorded and whether it was waited for."""

    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.ms = None
        self.done = False

    def record(self, stream=None):
        self.ms = 1.5 * len([e for e in _FakeEvent.log if e[0] == "record"])  # 0, 1.5, 3.0, ... ms
        _FakeEvent.log.append(("record", stream))

    def query(self):
        return self.done

    def synchronize(self):
        _FakeEvent.log.append(("synchronize", None))
        self.done = True

    def elapsed_time(self, end):
        assert end.done or end.query(), "elapsed_time read before the end event completed"
        return end.ms - self.ms


def test_cuda_copy_timer_uses_events_on_the_current_stream_and_waits_only_when_read(monkeypatch):
    from peftlab.pages import _CudaCopyTimer

    _FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    timer = _CudaCopyTimer(torch.device("cuda", 0))
    for _ in range(2):  # two copies: events at 0, 1.5 and 3.0, 4.5 ms
        timer.stop(timer.start())
    assert [kind for kind, _ in _FakeEvent.log] == ["record"] * 4  # launching copies never waits
    assert {stream for _, stream in _FakeEvent.log} == {"stream of cuda:0"}
    assert timer.seconds() == pytest.approx(3e-3)  # (1.5 - 0) + (4.5 - 3.0) ms
    assert [kind for kind, _ in _FakeEvent.log].count("synchronize") == 2
    assert timer.seconds() == pytest.approx(3e-3)  # read once: not counted twice


# -- CUDA: real device and pinned host buffers ---------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("perturb", [_no_paging, _spike, _evict_all])
def test_cuda_matches_torch_adamw(dtype, perturb):
    # bfloat16: against torch's AdamW on a float32 copy rounded to bfloat16 after each step
    ref, ours, opt_ref, opt, pool = _run_pair(
        dtype, 256, 1024, perturb, device="cuda", round_ref=dtype != torch.float32, lr=1e-2
    )
    torch.cuda.synchronize()
    if dtype == torch.float32:
        _assert_same(ref, ours, opt_ref, opt)
    else:
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b, a.detach().to(dtype), rtol=0, atol=0)
    host = [pg.host for s in opt.state.values() for pg in s["exp_avg"].pages if pg.host is not None]
    if perturb is not _no_paging:
        assert host and all(h.is_pinned() for h in host)


@pytest.mark.cuda
def test_cuda_eviction_frees_device_memory():
    pool = PagePool(64 * 2**20, device="cuda", page_bytes=2**20)
    t = pool.from_tensor(torch.arange(8 * 2**18, dtype=torch.float32, device="cuda"))  # 8 MiB, 8 pages
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    pool.evict_all()
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() == 8 * 2**20
    assert torch.equal(t.to_tensor(), torch.arange(8 * 2**18, dtype=torch.float32, device="cuda"))
    pool.make_resident(t.pages)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before == 0
    assert torch.equal(t.to_tensor(), torch.arange(8 * 2**18, dtype=torch.float32, device="cuda"))


@pytest.mark.cuda
def test_cuda_matches_bitsandbytes_paged_adamw():
    from _reference import bnb  # tests/_reference.py

    torch.manual_seed(0)
    init = [torch.randn(512, 512, device="cuda"), torch.randn(300, device="cuda")]  # ≥ 1e5: bnb pages the first
    theirs = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    opt_bnb = bnb.optim.PagedAdamW(theirs, lr=1e-3)
    opt = PagedAdamW(ours, lr=1e-3, pool=PagePool(2**20, device="cuda", page_bytes=2**18))
    for step in range(20):
        for a, b, g in zip(theirs, ours, _grads(init, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt_bnb.step()
        opt.step()
        with opt.pool.reserve(2**19):
            pass
    torch.cuda.synchronize()
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# -- counting a step's activations ---------------------------------------------------------------------
@pytest.mark.parametrize("batch,d,hidden", [(5, 8, 16), (3, 32, 7)])
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_count_saved_bytes_counts_activations_once(batch, d, hidden, input_requires_grad):
    lin = torch.nn.Linear(d, hidden)
    x = torch.randn(batch, d, requires_grad=input_requires_grad)
    with count_saved_bytes(lin.parameters()) as saved:
        y = torch.nn.functional.gelu(lin(x))
        z = y * y  # saves y twice (both operands): one storage
    # x (for the weight gradient), the GELU input, and y: 4 bytes each; the weight is excluded
    assert saved.nbytes == 4 * (batch * d + 2 * batch * hidden)
    with count_saved_bytes() as everything:
        torch.nn.functional.gelu(lin(x))
    weight_saved = input_requires_grad  # the weight is needed only for the input's gradient
    assert everything.nbytes == 4 * (batch * d + batch * hidden + weight_saved * d * hidden)
    del z


def test_count_saved_bytes_with_checkpointing_counts_block_inputs():
    from torch.utils.checkpoint import checkpoint

    blocks = [torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)) for _ in range(3)]
    params = [p for b in blocks for p in b.parameters()]
    x = torch.randn(10, 16, requires_grad=True)
    with count_saved_bytes(params) as plain:
        h = x
        for b in blocks:
            h = b(h)
    with count_saved_bytes(params) as ckpt:
        h = x
        for b in blocks:
            h = checkpoint(b, h, use_reentrant=False)
    assert plain.nbytes == 3 * 4 * 10 * (16 + 64 + 64)
    assert ckpt.nbytes == 3 * 4 * 10 * 16  # only each block's input is kept


def test_page_in_and_out_are_real_copies():
    pool = PagePool(1000, page_bytes=400)
    t = pool.from_tensor(torch.arange(100, dtype=torch.float32))
    page = t.pages[0]
    pool.evict_all()
    host = page.host
    pool.make_resident([page])
    assert page.data.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    page.data.add_(1)  # an update on the device copy ...
    assert torch.equal(host, torch.arange(100, dtype=torch.float32))  # ... leaves the host copy stale until paged out
    pool.evict_all()
    assert torch.equal(t.to_tensor(), torch.arange(100, dtype=torch.float32) + 1)


def test_params_on_another_device_are_refused():
    with pytest.raises(ValueError, match="pool's device"):
        PagedAdamW([torch.nn.Parameter(torch.empty(3, device="meta"))], pool=PagePool(100))


def test_learning_rate_schedulers_drive_it_like_adamw():
    ref, ours, opt_ref, opt, _ = _run_pair(torch.float32, 128, 1024, _no_paging, steps=1)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=2, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(1, 8):
        for a, b, g in zip(ref, ours, _grads(ref, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
        sched_ref.step()
        sched.step()
        with opt.pool.reserve(900):
            pass
    assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"] < 1e-3
    _assert_same(ref, ours, opt_ref, opt)


def test_a_page_larger_than_the_pool_is_refused():
    pool = PagePool(100, page_bytes=400)
    with pytest.raises(PoolMemoryError, match="a new page: 400 bytes requested"):
        pool.zeros((100,))
    assert pool.stats.device_bytes == 0 and pool.stats.timeline == ()
    opt = PagedAdamW([torch.nn.Parameter(torch.zeros(100))], pool=pool)
    opt.param_groups[0]["params"][0].grad = torch.ones(100)
    with pytest.raises(PoolMemoryError, match="one page of each AdamW state: 800 bytes"):
        opt.step()


@pytest.mark.cuda
def test_cuda_paging_on_a_side_stream_keeps_the_values_and_times_the_copies():
    pool = PagePool(8 * 2**20, device="cuda", page_bytes=2**20)
    values = torch.randn(4 * 2**18, device="cuda")  # 4 MiB, 4 pages, allocated on the default stream
    t = pool.from_tensor(values)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pool.evict_all()  # copies out on the side stream; the freed blocks must wait for them
    scratch = [torch.full((2**18,), float("nan"), device="cuda") for _ in range(8)]  # reuse freed blocks
    torch.cuda.current_stream().wait_stream(side)
    pool.make_resident(t.pages)
    torch.cuda.synchronize()
    assert torch.equal(t.to_tensor(), values)
    stats = pool.stats
    assert stats.page_outs == stats.page_ins == 4 and stats.paging_seconds > 0
    del scratch


@pytest.mark.cuda
def test_cuda_bitsandbytes_and_ours_agree_when_both_page_every_state_every_step():
    # The paged chapter's like-with-like case: every state pushed to the host before each step, in both.
    from _reference import bnb  # tests/_reference.py

    torch.manual_seed(0)
    init = [torch.randn(512, 512, device="cuda"), torch.randn(300, device="cuda")]
    ref = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    opt_ref = torch.optim.AdamW(ref, lr=1e-3)
    opt_bnb = bnb.optim.PagedAdamW(theirs, lr=1e-3)
    opt = PagedAdamW(ours, lr=1e-3, pool=PagePool(2**22, device="cuda", page_bytes=2**18))
    for step in range(10):
        for a, b, c, g in zip(ref, theirs, ours, _grads(init, step)):
            a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
        if step:
            opt.pool.evict_all()
            for state in opt_bnb.state.values():
                for key in ("state1", "state2"):
                    if getattr(state.get(key), "is_paged", False):
                        bnb.functional.prefetch_tensor(state[key], to_cpu=True)
        opt_ref.step()
        opt_bnb.step()
        opt.step()
    torch.cuda.synchronize()
    assert opt.pool.stats.page_ins > 0
    for a, b, c in zip(ref, theirs, ours):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
