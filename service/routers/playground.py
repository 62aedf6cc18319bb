"""The web playground at ``/``: static files in ``service/static`` (plain HTML, CSS and JS modules; no build step).

The page and its assets need no API key (they hold no data); every call the page makes goes to the API routes
with the key typed into it, kept in the tab's ``sessionStorage`` only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS_PATH = "/playground"

router = APIRouter(tags=["playground"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def assets() -> StaticFiles:
    return StaticFiles(directory=STATIC)
