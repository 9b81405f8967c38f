"""Metrics of a job, read from its metrics.jsonl: the newest values, the history, throughput, and a live stream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

import exp.serve.control as control
from exp.rundir import read_summary
from exp.serve.bodies import ID
from exp.serve.state import ServiceDep

router = APIRouter(tags=["metrics"])


@router.get("/api/training/jobs/{job_id}/metrics")
def job_metrics(job_id: ID, svc: ServiceDep) -> JSONResponse:
    """The newest value of every metric, each with its step."""
    job = svc.job_or_404(job_id)
    return JSONResponse({"job_id": job_id, "metrics": svc.cache.latest(Path(job["run_dir"]))})


@router.get("/api/training/jobs/{job_id}/metrics/history")
def metrics_history(
    job_id: ID,
    svc: ServiceDep,
    key: Annotated[list[str] | None, Query(max_length=32)] = None,
    min_step: Annotated[int | None, Query(ge=0)] = None,
    max_step: Annotated[int | None, Query(ge=0)] = None,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict:
    """metrics.jsonl lines, filtered by metric key(s) and step range, paged (offset, limit)."""
    rows = svc.cache.rows(Path(svc.job_or_404(job_id)["run_dir"]))
    picked = []
    for row in rows:
        if (min_step is not None and row["step"] < min_step) or (max_step is not None and row["step"] > max_step):
            continue
        if key:
            values = {k: row[k] for k in key if k in row}
            if not values:
                continue
            row = {"step": row["step"], **values}
        picked.append(row)
    page = picked[offset : offset + limit]
    following = offset + limit if offset + limit < len(picked) else None
    return {"job_id": job_id, "total": len(picked), "offset": offset, "next_offset": following, "rows": page}


@router.get("/api/training/jobs/{job_id}/throughput")
def throughput(job_id: ID, svc: ServiceDep) -> dict:
    """Tokens/s and step time: the newest interval's, the mean over the run, and summary.json's steady state."""
    job = svc.job_or_404(job_id)
    rows = [r for r in svc.cache.rows(Path(job["run_dir"])) if "perf/tokens_per_s" in r]
    summary = read_summary(job["run_dir"]) or {}
    values = [r["perf/tokens_per_s"] for r in rows]
    return {
        "job_id": job_id,
        "tokens_per_s": values[-1] if values else None,
        "mean_tokens_per_s": sum(values) / len(values) if values else None,
        "step_ms": rows[-1].get("perf/step_ms") if rows else None,
        "samples_per_s": rows[-1].get("perf/samples_per_s") if rows else None,
        "summary_tokens_per_s": summary.get("tokens_per_s"),
        "history": [{"step": r["step"], "tokens_per_s": r["perf/tokens_per_s"]} for r in rows[-200:]],
    }


@router.get("/api/training/jobs/{job_id}/metrics/stream")
async def metrics_stream(
    request: Request, job_id: ID, svc: ServiceDep, after_step: Annotated[int, Query(ge=-1)] = -1
) -> StreamingResponse:
    """Server-sent events: one `metrics` event per metrics.jsonl line after `after_step`, then an `end` event with
    the final status."""
    job = svc.job_or_404(job_id)
    run_dir = Path(job["run_dir"])

    async def events():
        sent, last_beat = 0, time.monotonic()
        rows = svc.cache.rows(run_dir)
        while sent < len(rows) and rows[sent]["step"] <= after_step:
            sent += 1
        while not await request.is_disconnected():
            rows = svc.cache.rows(run_dir)
            if len(rows) < sent:  # rewritten by a resume
                sent = 0
            for row in rows[sent:]:
                yield f"event: metrics\ndata: {json.dumps(row)}\n\n"
            sent = len(rows)
            status = svc.status_of(svc.registry.job(job_id) or job)["status"]
            if status in control.TERMINAL and len(svc.cache.rows(run_dir)) == sent:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if time.monotonic() - last_beat > 15:
                yield ": keep-alive\n\n"
                last_beat = time.monotonic()
            await asyncio.sleep(svc.settings.poll_s)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
