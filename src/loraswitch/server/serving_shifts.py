"""GET /v1/routing/shifts (clusters of prompts no adapter took: `server.shifts`) and
GET /v1/routing/shifts/{id}/prompts (a cluster's kept prompts, what `loraswitch shifts export`
writes as an examples file), plus the detector's two Prometheus series."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge

from loraswitch.server.errors import APIError
from loraswitch.server.shifts import ShiftDetector
from loraswitch.server.state import ServerState, state

router = APIRouter()


def install(st: ServerState) -> ShiftDetector:
    """The app's detector, listening to the switch's unrouted prompts and counted in /metrics."""
    s = st.settings
    detector = ShiftDetector(similarity=s.shift_similarity, min_size=s.shift_min_size, keep_prompts=s.keep_prompts)
    registry = st.metrics.registry
    unrouted = Counter("loraswitch_unrouted_prompts", "Prompts no adapter took (auto abstained), seen by the "
                       "task-shift detector.", registry=registry)
    Gauge("loraswitch_routing_shifts", "Clusters of unrouted prompts large enough to report as a task shift.",
          registry=registry).set_function(detector.shift_count)
    detector.on_record = unrouted.inc
    st.switch.on_unrouted = detector.record_unrouted
    st.shifts = detector
    return detector


@router.get("/v1/routing/shifts")
async def list_shifts(st: ServerState = Depends(state)):
    return JSONResponse(st.shifts.report())


@router.get("/v1/routing/shifts/{cluster_id}/prompts")
async def shift_prompts(cluster_id: str, st: ServerState = Depends(state)):
    try:
        prompts = st.shifts.prompts(cluster_id)
    except KeyError:
        raise APIError(404, f"no cluster {cluster_id!r} (GET /v1/routing/shifts lists them; small clusters may have "
                       "been forgotten)", "not_found_error", "cluster_id", "cluster_not_found") from None
    if not st.shifts.keep_prompts:
        raise APIError(409, "this server keeps no prompt texts (start it with --keep-prompts to export clusters)",
                       "conflict_error", None, "prompts_not_kept")
    return JSONResponse({"id": cluster_id, "object": "list", "data": prompts})
