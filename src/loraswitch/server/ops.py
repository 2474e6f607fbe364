"""Operations: GET /healthz, GET /metrics (Prometheus) and the routing trace page /ui."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from loraswitch.server.metrics import CONTENT_TYPE
from loraswitch.server.state import ServerState, state

STATIC_DIR = Path(__file__).resolve().parent / "static"
router = APIRouter()


@router.get("/healthz")
async def healthz(st: ServerState = Depends(state)):
    sched = st.scheduler
    ok = sched.alive
    body = {"status": "ok" if ok else "worker stopped", "model": st.switch.base.name, "adapters": st.engine.names,
            "queue_depth": sched.queue_depth, "running": sched.answering,
            "scheduler": {**sched.stats, "max_batch": sched.max_batch, "max_queue": sched.max_queue,
                          "recent": list(sched.recent)[-8:]}}
    if st.engine.max_resident is not None:  # --adapters-per-replica: which adapters are in the layers now
        body["resident"] = {"limit": st.engine.max_resident, "adapters": st.engine.resident,
                            "page_ins": st.engine.page_ins}
    if st.switch.upstream is not None:
        body["upstream"] = st.switch.upstream.describe()
    decoder = st.engine.decoder
    if st.engine.compile and decoder is not None:  # --compile: which step shapes run compiled, which not
        body["compiled_step"] = {"graphs": sorted(map(_shape, decoder.graphs)), "frozen": decoder.frozen,
                                 "uncompiled": sorted(map(_shape, decoder.uncompiled)), "failed": decoder.failed}
    return JSONResponse(body, status_code=200 if ok else 503)


def _shape(graph: tuple[int, int, int]) -> str:
    """A compiled step's shape as /healthz names it: rows (1 or 2+) x cache positions x choices."""
    rows, length, k = graph
    return f"{'1' if rows == 1 else '2+'}x{length}x{k}"


@router.get("/metrics")
async def prometheus_metrics(st: ServerState = Depends(state)):
    return Response(st.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def root():
    return RedirectResponse("/ui")


@router.get("/ui", include_in_schema=False)
async def ui():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
