"""``POST /calibrate``: predict (synchronous), full (asynchronous job), compress (safetensors download)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from kvcalib.api.convert import document_input, job_out, params_of, predict_out
from kvcalib.api.deps import ServiceDep, WriteAccess
from kvcalib.api.schemas import CalibrateRequest, ErrorOut, JobOut, PredictOut
from kvcalib.service import ServiceInputError

router = APIRouter(tags=["calibration"])

ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
          429: {"model": ErrorOut, "description": "predict/compress: every synchronous-work slot is busy "
                                                  "(Retry-After)."},
          503: {"model": ErrorOut, "description": "A dependency is down, or predict/compress ran past "
                                                  "KVCALIB_SYNC_TIMEOUT (Retry-After)."}}


@router.post(
    "/calibrate", dependencies=[WriteAccess], response_model=None,
    summary="Calibrate a document: predict, full (async) or compress",
    responses={
        200: {"model": PredictOut | JobOut,  # registers both schemas (PredictOut is referenced nowhere else)
              "description": "predict: the predicted budget (with features); full: the job, already finished; "
                             "compress: the compressed KV cache (safetensors, "
                             "`kvcalib.calib.cache.export.load_compressed`)",
              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        202: {"model": JobOut, "description": "full: the calibration job was queued; poll its URL (Location)."},
        **ERRORS,
    },
)
def calibrate(body: CalibrateRequest, request: Request, service: ServiceDep) -> Response:
    doc = document_input(body)
    p = params_of(service, body)
    if body.mode == "full":
        if body.ratio is not None:
            raise ServiceInputError("`ratio` applies to mode=compress only")
        view, done = service.submit(doc, p)
        job = job_out(request, view)
        return JSONResponse(job.model_dump(mode="json"), status_code=200 if done else 202,
                            headers={"Location": job.url})
    metrics = request.app.state.metrics
    if body.mode == "predict":
        view = service.predicted_budget(doc, p, persist=True, prefer_profile=False)
        metrics.observe_budget("/calibrate", view.source, view.ratio, view.predictor_version)
        return JSONResponse(predict_out(view).model_dump(mode="json"))
    out = service.compress(doc, p, body.ratio)
    meta = out.info
    metrics.observe_budget("/calibrate", meta.budget_source, meta.ratio, meta.predictor_version)
    headers = {"Content-Disposition": f'attachment; filename="kvcache-{meta.document_hash[:12]}.safetensors"',
               "X-Kvcalib-Ratio": f"{meta.ratio:.6f}", "X-Kvcalib-Budget-Source": meta.budget_source,
               "X-Kvcalib-Document-Hash": meta.document_hash, "X-Kvcalib-Context-Tokens": str(out.context_tokens)}
    return Response(content=out.data, media_type="application/octet-stream", headers=headers)
