"""The task-shift detector (`server.shifts`) on synthetic features: a tight burst becomes one
reported cluster while scattered prompts stay below the reporting size; memory stays bounded;
prompt texts are kept only when asked."""

from __future__ import annotations

import torch

from loraswitch.server.shifts import ShiftDetector

D = 64


def _task(center: torch.Tensor, n: int, noise: float, g: torch.Generator) -> list[torch.Tensor]:
    return [center + noise * torch.randn(D, generator=g) for _ in range(n)]


def test_a_burst_is_one_cluster_and_scatter_is_not_reported():
    g = torch.Generator().manual_seed(0)
    new_task = torch.randn(D, generator=g)
    burst = _task(new_task, 40, 0.08, g)  # cosine to the task direction about 0.85
    scatter = [torch.randn(D, generator=g) for _ in range(60)]  # nearly orthogonal to everything
    det = ShiftDetector(min_size=10, keep_prompts=True)
    ids = []
    for i in range(100):  # interleaved, as traffic is
        if i % 5 < 2 and burst:
            ids.append(("burst", det.record_unrouted(burst.pop(), "new task prompt")))
        elif scatter:
            ids.append(("other", det.record_unrouted(scatter.pop(), "odd prompt")))
    report = det.report()
    assert len(report["data"]) == 1, report
    shift = report["data"][0]
    burst_ids = [c for kind, c in ids if kind == "burst"]
    assert burst_ids.count(int(shift["id"][1:])) >= 0.9 * len(burst_ids)
    assert shift["size"] < len(burst_ids) + 5  # scattered prompts did not join it
    assert shift["examples"] == ["new task prompt"] * 5 and shift["prompts_kept"] == shift["size"]
    assert report["unrouted"] == len(ids) and det.shift_count() == 1
    assert det.prompts(shift["id"]) == ["new task prompt"] * shift["size"]


def test_memory_is_bounded_and_prompts_are_not_kept_by_default():
    g = torch.Generator().manual_seed(1)
    det = ShiftDetector(min_size=5, max_clusters=8, max_prompts=3)
    center = torch.randn(D, generator=g)
    for x in _task(center, 20, 0.05, g):
        det.record_unrouted(x, "secret")
    for _ in range(200):
        det.record_unrouted(torch.randn(D, generator=g), "secret")
    assert len(det.clusters) <= 8 and det.forgotten > 0
    report = det.report()
    sizes = [c["size"] for c in report["data"]]
    assert len(sizes) == 1 and 20 <= sizes[0] <= 22, sizes  # the real cluster survives the churn
    assert report["data"][0]["examples"] == [] and det.prompts(report["data"][0]["id"]) == []
    assert "secret" not in repr(report)
    kept = ShiftDetector(min_size=1, keep_prompts=True, max_prompts=3)
    for i in range(10):
        kept.record_unrouted(center, f"p{i}")
    assert kept.prompts("c1") == ["p7", "p8", "p9"]


def test_a_diffuse_task_still_comes_out_as_one_cluster():
    """Prompts of one task that are each less alike than the joining threshold (pairwise cosine
    about 0.37): the first ones seed several clusters, whose mean directions converge on the
    task's and merge, so the report shows one cluster holding nearly all of them."""
    g = torch.Generator().manual_seed(2)
    det = ShiftDetector(similarity=0.45, min_size=10)
    points = _task(torch.randn(D, generator=g), 80, 1.3, g)
    pairwise = torch.nn.functional.normalize(torch.stack(points), dim=1)
    assert (pairwise @ pairwise.T).triu(1).sum() / (80 * 79 / 2) < 0.45
    for x in points:
        det.record_unrouted(x)
    sizes = [c["size"] for c in det.report()["data"]]
    assert len(sizes) == 1 and sizes[0] >= 0.9 * 80, sizes
