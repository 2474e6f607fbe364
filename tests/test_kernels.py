"""`kernels.add_lora`: every strategy computes the same `y + sum_e w[t,e] B_e A_e x_t`, so the
layer may pick any of them (uniform, stacked, gather, grouped, and the fixed-shape gathered path
of the compiled step) without changing a single logit."""

from __future__ import annotations

import pytest
import torch

from loraswitch import kernels
from loraswitch.kernels import Routing, SlotRouting, add_lora, concat_stack


def _stacks(n_slots=6, r=4, d_in=16, d_out=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = [0] + [r, r - 1, 0, r, 2, r][:n_slots]
    A = torch.zeros(n_slots + 1, r, d_in)
    B = torch.zeros(n_slots + 1, d_out, r)
    for i, rk in enumerate(ranks):
        if rk:
            A[i, :rk] = torch.randn(rk, d_in, generator=g)
            B[i, :, :rk] = torch.randn(d_out, rk, generator=g)
    return A, B, ranks


def _reference(y, x, A, B, ids, w):
    out = y.clone()
    for t in range(x.shape[0]):
        for s, wt in zip(ids[t].tolist(), w[t].tolist()):
            if s >= 0:
                out[t] += wt * (B[s + 1] @ (A[s + 1] @ x[t]))
    return out


@pytest.mark.parametrize("case", ["uniform", "none", "mixed", "top2", "many_pairs"])
def test_every_strategy_and_the_gathered_path_agree(case):
    A, B, ranks = _stacks()
    g = torch.Generator().manual_seed(1)
    T = 200 if case == "many_pairs" else 7
    x, y = torch.randn(T, 16, generator=g), torch.randn(T, 12, generator=g)
    if case == "uniform":
        ids, w = torch.full((T, 1), 0), torch.ones(T, 1)
    elif case == "none":
        ids, w = torch.full((T, 1), -1), torch.ones(T, 1)
    elif case in ("mixed", "many_pairs"):
        ids, w = torch.randint(-1, 6, (T, 1), generator=g), torch.ones(T, 1)
    else:
        ids, w = torch.randint(-1, 6, (T, 2), generator=g), torch.rand(T, 2, generator=g)
    want = _reference(y, x, A, B, ids, w)
    stack = concat_stack(A, B, ranks)  # the whole stack, as the layer keeps it
    assert stack[0].shape[1] == sum(ranks)  # true ranks only: no padding, no "no adapter" entry
    with torch.no_grad():
        got = add_lora(y.clone(), x, A, B, ranks, Routing(ids, w), {})
        with_stack = add_lora(y.clone(), x, A, B, ranks, Routing(ids, w), {}, stack)
        gathered = add_lora(y.clone(), x, A, B, ranks, SlotRouting(ids, w))
        masked = add_lora(y.clone(), x, A, B, ranks, SlotRouting(ids, w), stack=stack)
    for out in (got, with_stack, gathered, masked):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    wg = w.clone().requires_grad_(True)  # the masked path keeps autograd too
    add_lora(y.clone(), x, A, B, ranks, SlotRouting(ids, wg), stack=stack).sum().backward()
    assert wg.grad is not None
    # with autograd recording nothing is updated in place, and the weights get a gradient
    wg = w.clone().requires_grad_(True)
    out = add_lora(y.clone(), x, A, B, ranks, SlotRouting(ids, wg))
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert wg.grad is not None and wg.grad.shape == w.shape


def test_grouped_path_agrees_when_stacking_is_too_wide(monkeypatch):
    """Above STACK_MAX_COLS the per-adapter grouped matmuls run; same result."""
    monkeypatch.setattr(kernels, "STACK_MAX_COLS", 1)
    A, B, ranks = _stacks()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(150, 16, generator=g), torch.randn(150, 12, generator=g)
    ids = torch.randint(-1, 6, (150, 1), generator=g)
    w = torch.ones(150, 1)
    with torch.no_grad():
        got = add_lora(y.clone(), x, A, B, ranks, Routing(ids, w), {})
    torch.testing.assert_close(got, _reference(y, x, A, B, ids, w), rtol=1e-4, atol=1e-4)


def test_stacked_per_set_path_when_the_whole_stack_is_too_wide(monkeypatch):
    """Few distinct adapters among many loaded: the per-set stacked path (whole stack too wide),
    cached per adapter set; same result for two different sets in a row."""
    monkeypatch.setattr(kernels, "STACK_MAX_COLS", 12)  # 3 adapters of rank 4, not the 7 entries
    A, B, ranks = _stacks()
    g = torch.Generator().manual_seed(3)
    cache: dict = {}
    for allowed in ([0, 1, -1], [3, 4, 5]):
        x, y = torch.randn(9, 16, generator=g), torch.randn(9, 12, generator=g)
        ids = torch.tensor(allowed)[torch.randint(0, 3, (9, 1), generator=g)]
        w = torch.rand(9, 1, generator=g)
        with torch.no_grad():
            got = add_lora(y.clone(), x, A, B, ranks, Routing(ids, w), cache)
        torch.testing.assert_close(got, _reference(y, x, A, B, ids, w), rtol=1e-4, atol=1e-4)
    assert len(cache) == 2 and ("all",) not in cache


def test_routing_moves_to_the_models_device_and_stays_put_when_there():
    """Policies build routing on the CPU; `Engine.routed` moves it to the weights' device (a GPU
    stack indexed with CPU tensors fails). Same device: the same object, with its cached pairs."""
    r = Routing(torch.tensor([[0], [1]]), torch.tensor([[1.0], [0.5]]))
    r.pairs()
    assert r.to(torch.device("cpu")) is r
    moved = r.to(torch.device("meta"))
    assert moved.ids.device.type == moved.weights.device.type == "meta"
    assert moved.ids.shape == r.ids.shape and "pairs" not in moved._cache


def test_column_mask_is_built_once_per_routing_and_layout():
    """The whole-stack path's [T, C] column weights are computed once per routing and column
    layout and shared by every layer with that layout (one op per step, not one per layer)."""
    A, B, ranks = _stacks()
    stack, again = concat_stack(A, B, ranks), concat_stack(A.clone(), B.clone(), ranks)
    assert stack.starts == again.starts and stack.starts[2] - stack.starts[1] == ranks[1]
    routing = Routing(torch.tensor([[0], [4], [-1]]), torch.tensor([[1.0], [0.5], [1.0]]))
    cols = routing.column_mask(stack, A.shape[0])
    assert routing.column_mask(again, A.shape[0]) is cols
    assert cols.shape == (3, sum(ranks))
    assert cols[1, stack.starts[5] : stack.starts[6]].tolist() == [0.5] * ranks[5] and cols[2].abs().sum() == 0


def test_finite_check_flags_only_broken_rows():
    """The one-pass row-sum check must not let a NaN or inf through, nor fail a row whose huge
    but finite logits overflow the sum."""
    from loraswitch.generate import _finite_rows

    logits = torch.zeros(3, 8)
    logits[0, 1] = 3e38
    logits[0, 2] = 3e38  # the row sum overflows; every logit is finite
    logits[1, 3] = float("nan")
    logits[2, 0] = float("-inf")
    safe, broken = _finite_rows(logits)
    assert broken == {1, 2} and torch.isfinite(safe).all()
    assert _finite_rows(torch.zeros(2, 4))[1] == set()


def test_single_token_fixed_shape_routing_gathers_its_own_factors(monkeypatch):
    """A batch-1 fixed-shape step reads its one adapter's factors (gathered), not the whole
    stack's (masked), even while the whole stack fits; same result."""
    A, B, ranks = _stacks()
    stack = concat_stack(A, B, ranks)
    x, y = torch.randn(1, 16), torch.randn(1, 12)
    ids, w = torch.tensor([[3]]), torch.ones(1, 1)

    def refuse(*args):
        raise AssertionError("the masked path ran for one token")

    monkeypatch.setattr(kernels, "_add_masked", refuse)
    with torch.no_grad():
        got = add_lora(y.clone(), x, A, B, ranks, SlotRouting(ids, w), stack=stack)
    torch.testing.assert_close(got, _reference(y, x, A, B, ids, w), rtol=1e-4, atol=1e-4)
