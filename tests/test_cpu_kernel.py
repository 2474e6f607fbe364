"""The compiled CPU kernel (`kernels.cpu`, punica's BGMV in C): what `add_lora` runs for
decode-sized mixed batches on the whole stack. It must give the masked path's result for every
routing it takes, and step aside cleanly (the masked path runs) where it cannot."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from loraswitch import kernels
from loraswitch.kernels import Routing, add_lora, concat_stack, cpu
from tests.test_kernels import _reference

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine")


def _stack(ranks, d_in=40, d_out=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    A, B = torch.zeros(len(ranks), r_max, d_in), torch.zeros(len(ranks), d_out, r_max)
    for i, r in enumerate(ranks):
        if r:
            A[i, :r], B[i, :, :r] = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    return A, B


@pytest.fixture
def no_masked(monkeypatch):
    def refuse(*args):
        raise AssertionError("the masked path ran where the kernel should have")

    monkeypatch.setattr(kernels, "_add_masked", refuse)


@needs_compiler
@pytest.mark.parametrize("k", [1, 2])
def test_kernel_runs_mixed_routing_and_matches_the_reference(no_masked, monkeypatch, k):
    """Ranks the kernel specialises (4, 8, 16, 32) and any other (5, 3), slots routed nowhere
    (-1), zero weights, one and two choices per token: exactly the reference sum."""
    assert cpu.available(), cpu.failure()
    monkeypatch.setattr(kernels, "BGMV_MAX_TOKEN_RANKS", 10**6)  # 19 tokens x rank 32: past the default
    ranks = [0, 8, 5, 16, 4, 0, 32, 3]
    A, B = _stack(ranks)
    g = torch.Generator().manual_seed(1)
    T = 19
    x, y = torch.randn(T, 40, generator=g), torch.randn(T, 24, generator=g)
    ids = torch.randint(-1, len(ranks) - 1, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)
    w[3, 0] = 0.0
    stack = concat_stack(A, B, ranks)
    with torch.no_grad():
        got = add_lora(y.clone(), x, A, B, ranks, Routing(ids, w), {}, stack)
    torch.testing.assert_close(got, _reference(y, x, A, B, ids, w), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_choice_columns_are_built_once_per_routing_and_layout():
    ranks = [0, 8, 5, 16]
    A, B = _stack(ranks)
    stack = concat_stack(A, B, ranks)
    routing = Routing(torch.tensor([[0], [2], [-1]]), torch.tensor([[1.0], [0.5], [1.0]]))
    # a slot past the layout (reserved in the stacks, no columns in this layer): rank 0
    assert Routing(torch.tensor([[5]]), torch.ones(1, 1)).choice_columns(stack, 7)[2].tolist() == [[0]]
    entry, start, rank, weight = routing.choice_columns(stack, 4)
    assert routing.choice_columns(stack, 4)[0] is entry
    assert entry[:, 0].tolist() == [1, 3, 0] and start[:, 0].tolist()[:2] == [stack.starts[1], stack.starts[3]]
    assert rank[:, 0].tolist() == [8, 16, 0] and weight[:, 0].tolist() == [1.0, 0.5, 1.0]


def test_prefills_wide_routings_and_other_dtypes_keep_the_masked_path(monkeypatch):
    """Above BGMV_MAX_TOKEN_RANKS tokens x rank, above BGMV_MAX_CHOICES choices per token, or in bfloat16 the
    kernel steps aside and the whole-stack GEMMs give the same result."""
    ranks = [0, 8, 4, 8]
    A, B = _stack(ranks)
    g = torch.Generator().manual_seed(2)
    ran = []
    monkeypatch.setattr(cpu, "bgmv_", lambda *a: ran.append(1) or False)
    for T, k, dtype in ((kernels.BGMV_MAX_TOKEN_RANKS // 8 + 1, 1, torch.float32), (6, kernels.BGMV_MAX_CHOICES + 1, torch.float32),
                        (6, 1, torch.bfloat16)):
        x, y = torch.randn(T, 40, generator=g), torch.randn(T, 24, generator=g)
        ids, w = torch.randint(0, 3, (T, k), generator=g), torch.rand(T, k, generator=g)
        stack = concat_stack(A.to(dtype), B.to(dtype), ranks)
        with torch.no_grad():
            got = add_lora(y.clone().to(dtype), x.to(dtype), A.to(dtype), B.to(dtype), ranks, Routing(ids, w), {}, stack)
        tol = 1e-4 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(got.float(), _reference(y, x, A, B, ids, w), rtol=tol, atol=tol)
    assert not ran


@pytest.mark.parametrize("how", ["disabled", "broken_compiler"])
def test_without_the_kernel_the_masked_path_answers(monkeypatch, tmp_path, caplog, how):
    """LORASWITCH_CPU_KERNEL=0, or a compiler that fails: `available()` is False with the reason,
    logged once, and `add_lora` still gives the reference result."""
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_failed", None)
    monkeypatch.setenv("LORASWITCH_KERNEL_CACHE", str(tmp_path))  # no cached build to reuse
    if how == "disabled":
        monkeypatch.setenv("LORASWITCH_CPU_KERNEL", "0")
    else:
        monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger="loraswitch.kernels"):
        assert not cpu.available()
    assert ("LORASWITCH_CPU_KERNEL=0" in cpu.failure()) if how == "disabled" else ("failed" in cpu.failure())
    ranks = [0, 8, 4]
    A, B = _stack(ranks)
    x, y = torch.randn(5, 40), torch.randn(5, 24)
    ids, w = torch.tensor([[0], [1], [-1], [1], [0]]), torch.rand(5, 1)
    with torch.no_grad():
        got = add_lora(y.clone(), x, A, B, ranks, Routing(ids, w), {}, concat_stack(A, B, ranks))
    torch.testing.assert_close(got, _reference(y, x, A, B, ids, w), rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob("*.so"))
