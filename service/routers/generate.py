"""``POST /generate``: wait for the images (JSON with base64 images, or raw bytes on ``Accept: image/png``).

The body (here and on ``POST /jobs``) is a JSON :class:`GenerateRequest`, or its fields as a multipart form with
``init_image`` and ``mask`` as file parts (:func:`diffsteer.service.deps.planned`); both are in the OpenAPI
document (:data:`GENERATION_BODY`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from diffsteer.service.deps import get_engine, planned, require_api_key
from diffsteer.service.engine import Engine, Plan
from diffsteer.service.errors import ServiceError
from diffsteer.service.routers.common import CLIENT_CLOSED, QUEUED_REQUEST_ERRORS, ClientGone, negotiate, run_plan
from diffsteer.service.schemas import GenerateResponse

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])

GENERATE_FORM = "GenerateForm"  # the multipart form's schema in the OpenAPI document (service/openapi.py builds it)
GENERATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
            "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{GENERATE_FORM}"}},
        },
    }
}

ERRORS = {
    **QUEUED_REQUEST_ERRORS,
    406: {"description": "Raw image bytes asked for more than one image"},
    504: {"description": "The generation did not finish within the request timeout"},
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
            "description": "JSON, or the image itself when Accept asks for image/*",
        },
    },
    summary="Generate images and wait for them",
    openapi_extra=GENERATION_BODY,
)
async def generate(request: Request, plan: Plan = Depends(planned), engine: Engine = Depends(get_engine)) -> Response:
    raw = negotiate(request.headers.get("accept"), plan.output_format)
    if raw is not None:
        if plan.params.num_images != 1:
            raise ServiceError(
                406,
                f"raw image bytes (Accept: image/{raw}) hold one image, but num_images is "
                f"{plan.params.num_images}; ask for application/json",
                field="num_images",
            )
        plan.output_format = raw
    try:
        outcome = await run_plan(request, engine, plan)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    if raw is not None:
        r = outcome.result
        headers = {
            "X-Diffsteer-Seed": str(r.seeds[0]),
            "X-Diffsteer-NFE": str(r.nfe[0]),
            "X-Diffsteer-Policy": _ascii(r.params.policy.spec()),
            "X-Diffsteer-Model": _ascii(r.model),
        }
        return Response(outcome.encoded[0], media_type=f"image/{raw}", headers=headers)
    return JSONResponse(outcome.response())


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")
