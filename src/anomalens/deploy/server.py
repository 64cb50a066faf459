"""HTTP serving: a FastAPI app over an Inferencer, with bounded uploads and bounded concurrency.

    POST /predict         multipart field `file` (one image)      -> one result
    POST /predict/batch   multipart field `files` (repeated)       -> {"results": [...]}
    GET  /health          liveness and load
    GET  /metadata        model, input size, thresholds, runtime

Options, as query parameters or form fields: `mask=png|rle|none` (default png) and
`heatmap=true|false` (default false).  A result carries the raw `score`, the normalised
`norm_score` (0.5 = threshold), `label` ("defect" / "good"), the raw image `threshold`,
`defect_area` (share of mask pixels) and the predicted mask at the model's input resolution.

Uploads are decoded by the same pixel conversion as `data.io.read_image` and scored by
`Inferencer.predict`, so a file gets exactly the decisions `anomalens predict` gives it.  Bad
input is always a 4xx with a JSON body ``{"error": "<one line>"}``, never a 500.

Heavy imports (numpy, Pillow, FastAPI) happen inside functions so that the CLI stays fast to start.  No
`from __future__ import annotations` here: FastAPI must see the real `Request` class in route signatures.
"""
import asyncio
import base64
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Interval, missing_dependency, validate_params

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from fastapi import FastAPI

MASK_FORMATS = ("png", "rle", "none")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

SETTINGS_CONSTRAINTS = {
    "max_upload_mb": Interval(float, 0.0, None, closed="neither"),
    "max_concurrency": Interval(int, 1, 256),
    "max_batch_files": Interval(int, 1, 1024),
    "max_image_pixels": Interval(int, 1, None),
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the server; every one of them protects memory or CPU from a single client."""

    max_upload_mb: float = 20.0  # largest request body (for /predict/batch: all files together)
    max_concurrency: int = 2  # inferences running at once; further requests wait their turn
    max_batch_files: int = 32  # files in one /predict/batch request
    max_image_pixels: int = 50_000_000  # width x height, checked from the header before decoding

    def __post_init__(self) -> None:
        validate_params("ServeSettings", asdict(self), SETTINGS_CONSTRAINTS)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class RequestError(Exception):
    """A client error: answered with `status` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- encoding helpers
def decode_image(data: bytes, name: str = "upload", max_pixels: int = ServeSettings.max_image_pixels) -> "np.ndarray":
    """Bytes of an image file -> uint8 RGB (H, W, 3), by the same conversion as `data.io.read_image`.

    Raises RequestError: 422 empty/corrupt/truncated, 415 not an image format, 413 too many pixels.
    """
    from io import BytesIO

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..data.io import _PIL_ERRORS, _to_channels

    if not data:
        raise RequestError(422, f"File '{name}' is empty.")
    try:
        with Image.open(BytesIO(data)) as img:
            # The header alone gives the size: refuse a decompression bomb before decoding a pixel.
            width, height = img.size
            if width * height > max_pixels:
                raise RequestError(413, f"Image '{name}' is {width}x{height} pixels; the limit is {max_pixels} "
                                        "pixels (ServeSettings.max_image_pixels).")
            img.load()
            arr = _to_channels(img)
    except Image.DecompressionBombError:
        raise RequestError(413, f"Image '{name}' declares more pixels than Pillow's decompression-bomb "
                                "limit allows.") from None
    except UnidentifiedImageError:
        raise RequestError(415, f"File '{name}' is not an image format Pillow can read "
                                "(send PNG, JPEG, BMP, TIFF or WebP).") from None
    except _PIL_ERRORS as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise RequestError(422, f"File '{name}' is a corrupt or truncated image: {reason}.") from None
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    return np.array(arr[..., :3], dtype=np.uint8, order="C")


def encode_png(array: "np.ndarray") -> str:
    """(H, W) bool/uint8 or (H, W, 3) uint8 -> base64 text of a PNG (bool masks become 0/255 grey)."""
    from io import BytesIO

    import numpy as np
    from PIL import Image

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def rle_encode(mask: "np.ndarray") -> dict[str, Any]:
    """Bool (H, W) -> COCO-style uncompressed RLE: column-major run lengths, starting with a run of 0s."""
    import numpy as np

    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat[0]:
        counts = np.concatenate([[0], counts])  # the first run always counts background
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts.astype(int).tolist()}


def rle_decode(rle: Mapping[str, Any]) -> "np.ndarray":
    """Inverse of `rle_encode`."""
    import numpy as np

    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    return flat.reshape((width, height)).T.copy()


def _json_value(value: Any) -> Any:
    """Tensors, numpy values, paths and non-finite floats -> plain JSON values (NaN -> null)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# Metadata a client has no use for and a server should not reveal: file-system paths, the training config.
_PRIVATE_METADATA = ("path", "source", "config")


def model_metadata(inferencer: Any) -> dict[str, Any]:
    """What a client needs to know about the served model (`inferencer.metadata` minus paths), as JSON values."""
    meta = dict(inferencer.metadata)
    if "model_params" not in meta:  # artifacts written before the resolved parameters were stored
        meta["model_params"] = {k: v for k, v in (meta.get("config") or {}).get("model", {}).items() if k != "name"}
    meta = {k: v for k, v in meta.items() if k not in _PRIVATE_METADATA}
    meta.update(device=str(getattr(inferencer, "device", "cpu")))
    return _json_value(meta)


# --------------------------------------------------------------------------- request options
def _parse_options(values: Mapping[str, str]) -> dict[str, Any]:
    mask = values.get("mask", "png").strip().lower()
    if mask not in MASK_FORMATS:
        raise RequestError(422, f"The 'mask' option must be one of {', '.join(MASK_FORMATS)}. Got {mask!r} instead.")
    heat = values.get("heatmap", "false").strip().lower()
    if heat not in _TRUE | _FALSE:
        raise RequestError(422, f"The 'heatmap' option must be true or false. Got {heat!r} instead.")
    return {"mask": mask, "heatmap": heat in _TRUE}


async def _read_upload(request: Any, file_field: str, max_files: int) -> tuple[list[tuple[str, bytes]], dict]:
    """Parse the multipart body: (filename, bytes) of each `file_field` part, and the options."""
    from starlette.datastructures import UploadFile

    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise RequestError(415, f"Send multipart/form-data with the image in a '{file_field}' field. "
                                f"Got content type {media_type or 'none'!r} instead.")
    allowed = (file_field, "mask", "heatmap")
    options = dict(request.query_params)
    files: list[tuple[str, bytes]] = []
    # One file over the limit gets through Starlette's own check, so that the answer below words the error.
    async with request.form(max_files=max_files + 1, max_fields=8) as form:
        for key, value in form.multi_items():
            if key not in allowed:
                raise RequestError(422, f"Unknown field {key!r}. Accepted: {', '.join(allowed)}.")
            if key != file_field:
                if not isinstance(value, str):
                    raise RequestError(422, f"The {key!r} field must be text, not a file.")
                if options.get(key, value) != value:
                    raise RequestError(422, f"The {key!r} option is given twice with different values.")
                options[key] = value
            elif not isinstance(value, UploadFile):
                raise RequestError(422, f"The {file_field!r} field must be a file upload, not text.")
            else:
                files.append((value.filename or f"{file_field}[{len(files)}]", await value.read()))
    unknown = sorted(set(options) - set(allowed[1:]))
    if unknown:
        raise RequestError(422, f"Unknown query parameter {unknown[0]!r}. Accepted: mask, heatmap.")
    if not files:
        raise RequestError(422, f"Missing the {file_field!r} field: upload the image as multipart form field "
                                f"'{file_field}'.")
    if len(files) > max_files:
        hint = " Use /predict/batch for several images." if max_files == 1 else ""
        raise RequestError(413 if max_files > 1 else 422,
                           f"Too many files: at most {max_files} per request.{hint}")
    return files, _parse_options(options)


# --------------------------------------------------------------------------- inference
class _Gate:
    """Bounds concurrent inferences with an asyncio semaphore, made per event loop (tests run several)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.running = 0
        self.waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, func: Any, *args: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.limit)
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            # Decoding, the forward pass and PNG encoding are CPU work: keep them off the event loop.
            # (A thread cannot be cancelled; anyio waits for it, so the slot is held until it ends.)
            return await run_in_threadpool(func, *args)
        finally:
            self.running -= 1
            self._semaphore.release()


def _predict_files(inferencer: Any, files: list[tuple[str, bytes]], options: dict, threshold: float | None,
                   max_pixels: int) -> list[dict[str, Any]]:
    """Decode, score and describe every file (one forward pass for the lot); runs in a worker thread."""
    import torch

    tensors = [inferencer.to_tensor(decode_image(data, name, max_pixels)) for name, data in files]
    out = inferencer.predict(torch.cat(tensors))
    results = []
    for i, (name, _) in enumerate(files):
        mask = out.pred_mask[i, 0].cpu().numpy().astype(bool)
        result: dict[str, Any] = {
            "filename": name,
            "score": float(out.score[i]),
            "norm_score": float(out.norm_score[i]),
            "label": "defect" if bool(out.pred_label[i]) else "good",
            "threshold": threshold,
            "defect_area": float(mask.mean()),
        }
        if options["mask"] == "png":
            result["mask"] = {"format": "png", "size": list(mask.shape), "data": encode_png(mask)}
        elif options["mask"] == "rle":
            result["mask"] = {"format": "rle", **rle_encode(mask)}
        if options["heatmap"]:
            from ..visualization import heatmap

            colours = heatmap(out.norm_map[i, 0].cpu())
            result["heatmap"] = {"format": "png", "size": list(colours.shape[:2]), "data": encode_png(colours)}
        results.append(result)
    return results


# --------------------------------------------------------------------------- the app
class BodyLimit:
    """ASGI middleware: answer 413 for a body over `max_bytes`, from Content-Length up front or while reading.

    The body is read here (up to the limit) and replayed to the app, so the limit holds however the
    client sends it, chunked included, and no route ever sees an oversized body.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> RequestError:
        return RequestError(413, f"Request body exceeds the {self.max_bytes / 2**20:g} MB upload limit "
                                 "(serve --max-upload-mb).")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(scope, receive, send, RequestError(400, "Invalid Content-Length header."))
            if int(declared) > self.max_bytes:
                return await _send_error(scope, receive, send, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(scope, receive, send, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _error_response(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def _send_error(scope: dict, receive: Any, send: Any, error: RequestError) -> None:
    await _error_response(error.status, error.message)(scope, receive, send)


def _validation_message(exc: Any) -> str:
    errors = exc.errors()
    if not errors:
        return "Invalid request."
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg', 'invalid value')}." if where else f"{first.get('msg', 'Invalid request')}."


def create_app(inferencer: Any, settings: ServeSettings | None = None) -> "FastAPI":
    """A FastAPI app serving `inferencer` (anything with `to_tensor`, `predict` and metadata) under `settings`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from starlette.exceptions import HTTPException
    except ImportError:
        raise missing_dependency("fastapi", "serve") from None

    from .. import __version__
    from ..errors import DataError

    settings = settings or ServeSettings()
    metadata = model_metadata(inferencer)
    threshold = metadata.get("image_threshold")
    gate = _Gate(settings.max_concurrency)

    app = FastAPI(title="anomalens", version=__version__,
                  description="Visual anomaly detection: score an image, get its label, mask and heat map.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Any:
        return _error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Any:
        return _error_response(exc.status_code, str(exc.detail).splitlines()[0] if exc.detail else "Error.")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _error_response(422, _validation_message(exc))

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> Any:
        return _error_response(422, str(exc))

    async def _predict(request: Request, field: str, max_files: int) -> list[dict[str, Any]]:
        files, options = await _read_upload(request, field, max_files)
        return await gate.run(_predict_files, inferencer, files, options, threshold, settings.max_image_pixels)

    upload_doc = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "mask": {"type": "string", "enum": list(MASK_FORMATS), "default": "png"},
                       "heatmap": {"type": "boolean", "default": False}}}}}}}

    @app.post("/predict", openapi_extra=upload_doc, summary="Score one image (multipart field 'file').")
    async def predict(request: Request) -> dict[str, Any]:
        return (await _predict(request, "file", 1))[0]

    batch_doc = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                       "mask": {"type": "string", "enum": list(MASK_FORMATS), "default": "png"},
                       "heatmap": {"type": "boolean", "default": False}}}}}}}

    @app.post("/predict/batch", openapi_extra=batch_doc,
              summary="Score several images in one forward pass (repeated multipart field 'files').")
    async def predict_batch(request: Request) -> dict[str, Any]:
        return {"results": await _predict(request, "files", settings.max_batch_files)}

    @app.get("/health", summary="Liveness and current load.")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": metadata.get("model"), "runtime": metadata.get("runtime"),
                "running": gate.running, "waiting": gate.waiting, "max_concurrency": settings.max_concurrency}

    @app.get("/metadata", summary="The served model: input size, thresholds, runtime and server limits.")
    async def get_metadata() -> dict[str, Any]:
        return {**metadata, "limits": asdict(settings)}

    return app


def load_inferencer(model: str | Path, device: str = "auto", runtime: str | None = None) -> Any:
    """`Inferencer.load` for a run folder, checkpoint or exported artifact."""
    from .inferencer import Inferencer

    kwargs = {"runtime": runtime} if runtime else {}
    return Inferencer.load(model, device=device, **kwargs)


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          device: str = "auto", runtime: str | None = None, log_level: str = "info") -> None:
    """Load `model` and serve it with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise missing_dependency("uvicorn", "serve") from None

    inferencer = load_inferencer(model, device, runtime)
    app = create_app(inferencer, settings)
    meta = model_metadata(inferencer)
    print(f"Serving {meta.get('model')} ({meta.get('runtime')} on {meta.get('device')}) at http://{host}:{port}; "
          "API docs at /docs", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
