"""The job service: an HTTP API and a dashboard over run directories, sweep manifests and exp's launchers.

    python -m exp.serve [--host H] [--port P] [--runs-dir runs]

Needs the `serve` extra (FastAPI, uvicorn); importing this package without it fails with one line saying so.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # one clear line instead of a traceback into FastAPI's absence
    raise ImportError(f"exp.serve needs FastAPI and uvicorn ({e.name} is missing): pip install -e '.[serve]'") from None

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    """Settings and create_app, imported on first use: `python -m exp.serve --help` needs no torch."""
    if name in __all__:
        from exp.serve import app

        return getattr(app, name)
    raise AttributeError(name)
