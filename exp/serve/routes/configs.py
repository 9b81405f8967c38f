"""Stored configs (named sets of overrides, validated as train.py validates them) and the service's own routes."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

import exp.serve.configs as configs
from exp.serve.bodies import ID, ConfigIn
from exp.serve.state import ServiceDep

router = APIRouter()


@router.get("/api/health", tags=["service"])
def health() -> dict:
    """Liveness; the only route that needs no token."""
    return {"ok": True}


@router.get("/api/options", tags=["service"])
def options() -> dict:
    """The options of every config group in conf/, and the launchers."""
    return {"groups": configs.group_options(), "launchers": ["local", "slurm"]}


@router.post("/api/training/configs", status_code=201, tags=["configs"])
def create_config(body: ConfigIn, svc: ServiceDep) -> dict:
    """Store a named set of overrides once it composes and validates as train.py would (422 with the CLI's line
    otherwise)."""
    configs.compose(body.overrides, svc.runs_dir / "serve" / "_validate", svc.settings.allow_targets, node=False)
    return svc.registry.add_config(body.name, body.overrides)


@router.get("/api/training/configs", tags=["configs"])
def list_configs(svc: ServiceDep) -> list[dict]:
    return svc.registry.configs()


@router.get("/api/training/configs/{config_id}", tags=["configs"])
def get_config(config_id: ID, svc: ServiceDep) -> dict:
    found = svc.registry.config(config_id)
    if found is None:
        raise HTTPException(404, f"no config {config_id}")
    return found


@router.delete("/api/training/configs/{config_id}", tags=["configs"])
def delete_config(config_id: ID, svc: ServiceDep) -> dict:
    if not svc.registry.delete_config(config_id):
        raise HTTPException(404, f"no config {config_id}")
    return {"deleted": config_id}
