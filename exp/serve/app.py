"""The job service's app: the routers (exp/serve/routes/), the guard, the errors as one-line 4xx answers, and the
dashboard's static files.

Every answer is read from the run directories, sweep manifests and the registry; bad input gets a 4xx with one
line in `detail`, never a 5xx.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

import exp.serve.control as control
from exp.errors import ConfigError
from exp.serve.guard import Guard, Refused
from exp.serve.routes import checkpoints, configs, evaluations, jobs, metrics, sweeps
from exp.serve.state import Service, Settings

STATIC = Path(__file__).parent / "static"
ANSWERS = {ConfigError: 422, control.Conflict: 409, Refused: 404}  # each as its one line in `detail`


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings)
    app = FastAPI(
        title="exp job service",
        version="1",
        description="Compose, launch, watch, steer and resume exp runs and sweeps.",
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN: blank offline; /openapi.json stays
        redoc_url=None,
    )
    app.state.service = service
    app.state.settings, app.state.registry, app.state.launcher = settings, service.registry, service.launcher
    app.add_middleware(Guard, token=settings.token, max_body_bytes=settings.max_body_bytes, hosts=tuple(settings.hosts))
    for error, status in ANSWERS.items():
        app.add_exception_handler(error, _answer(status))
    for module in (configs, jobs, metrics, checkpoints, sweeps, evaluations):
        app.include_router(module.router)
    app.add_api_route("/", _dashboard, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _answer(status: int):
    async def handler(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": e.line() if isinstance(e, ConfigError) else str(e)}, status)

    return handler


def _dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html")


__all__ = ["Settings", "create_app"]
