"""The `serve` sub-command: `anomalens serve --model RUN_OR_ARTIFACT [--host 127.0.0.1 --port 8000]`."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from .server import ServeSettings


def cmd_serve(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .server import serve

    if overrides:
        raise ConfigError(f"serve takes no config overrides. Got {', '.join(overrides)}.")
    settings = ServeSettings(max_upload_mb=args.max_upload_mb, max_concurrency=args.max_concurrency,
                             max_batch_files=args.max_batch_files, max_image_pixels=args.max_image_pixels)
    serve(args.model, host=args.host, port=args.port, settings=settings, device=args.device, runtime=args.runtime,
          log_level=args.log_level)
    return 0


def add_commands(subparsers: Any) -> None:
    defaults = ServeSettings()
    p = subparsers.add_parser("serve", help="serve a trained run or exported model over HTTP (needs anomalens[serve])",
                              description="POST /predict, POST /predict/batch, GET /health, GET /metadata.")
    p.add_argument("--model", required=True, help="run folder, checkpoint or exported artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb,
                   help="largest request body in MB; larger ones get 413 (default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency,
                   help="inferences running at once; others wait (default: %(default)s)")
    p.add_argument("--max-batch-files", type=int, default=defaults.max_batch_files,
                   help="files per /predict/batch request (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                   help="width x height limit, checked before decoding (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--runtime", default=None, help="torch, onnx or openvino (default: from the artifact)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
