"""CLI sub-commands: `anomalens runs list|compare` and `anomalens ui` (the MLflow UI of the runs root)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import AnomalensError, ConfigError

DEFAULT_ROOT = "runs"  # ProjectConfig.root's default


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("runs", help="list and compare the runs in a runs root")
    runs = p.add_subparsers(dest="runs_command", required=True)
    q = runs.add_parser("list", help="a table of runs: model, dataset, category, key metrics, date")
    q.add_argument("--root", help=f"runs root (default: --project.root or '{DEFAULT_ROOT}')")
    q.add_argument("--project", help="only runs of this project, e.g. mvtec-bottle (globs allowed: 'mvtec-*')")
    q.set_defaults(func=cmd_runs_list)

    q = runs.add_parser("compare", help="parameters and metrics that differ, and an HTML page with the images")
    q.add_argument("runs", nargs="+", metavar="RUN", help="run folders (paths, or names under the root); two or more")
    q.add_argument("--root", help=f"runs root for run names (default: '{DEFAULT_ROOT}')")
    q.add_argument("--out", help="HTML file to write (default: <root>/compare/<runs>.html)")
    q.add_argument("--link-images", action="store_true",
                   help="link the images relatively instead of embedding them (smaller page, not portable)")
    q.set_defaults(func=cmd_runs_compare)

    p = subparsers.add_parser("ui", help="serve the MLflow UI of the runs root on 127.0.0.1")
    p.add_argument("--root", help=f"runs root holding mlflow.db (default: '{DEFAULT_ROOT}')")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.set_defaults(func=cmd_ui)


def _root(args: argparse.Namespace, overrides: dict[str, Any]) -> Path:
    unknown = [k for k in overrides if k != "project.root"]
    if unknown:
        raise ConfigError(f"This command takes no config overrides but --project.root. Got --{unknown[0]}.")
    return Path(args.root or overrides.get("project.root") or DEFAULT_ROOT)


def _console():
    from rich.console import Console

    # Piped or redirected output has no width to fit: rich would assume 80 columns and cut every cell.
    return Console() if sys.stdout.isatty() else Console(width=240)


# --------------------------------------------------------------------------- runs list
def cmd_runs_list(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from rich.table import Table

    from .runs import KEY_METRICS, date, find_runs, fmt

    root = _root(args, overrides)
    runs = find_runs(root, args.project)
    if not runs:
        where = f" of project {args.project!r}" if args.project else ""
        print(f"No runs{where} under '{root}'.")
        return 0
    table = Table(title=f"Runs in {root}", header_style="bold")
    for name in ["run", "model", "dataset", "category", *[label for _, label in KEY_METRICS], "finished"]:
        table.add_column(name, justify="right" if name not in ("run", "model", "dataset", "category") else "left")
    for r in runs:
        cells = [fmt(r.metrics.get(key)) for key, _ in KEY_METRICS]
        table.add_row(str(r.path.relative_to(root)), r.model, r.dataset, r.category, *cells, date(r.finished))
    _console().print(table)
    return 0


# --------------------------------------------------------------------------- runs compare
def cmd_runs_compare(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from rich.table import Table

    from .runs import best_index, compare_html, differing, fmt, resolve_run

    if len(args.runs) < 2:
        raise ConfigError("runs compare needs two or more runs, e.g. `anomalens runs compare RUN_A RUN_B`.")
    root = _root(args, overrides)
    runs = [resolve_run(name, root) for name in args.runs]
    params, metrics = differing(runs)
    console = _console()
    for title, rows, highlight in (("Parameters that differ", params, False), ("Metrics that differ", metrics, True)):
        if not rows:
            console.print(f"{title}: none.")
            continue
        table = Table(title=title, header_style="bold")
        table.add_column("")
        for r in runs:
            table.add_column(r.label, justify="right" if highlight else "left")
        for key, values in rows:
            best = best_index(key, values) if highlight else None
            table.add_row(key, *[f"[bold green]{fmt(v)}[/]" if i == best else fmt(v) for i, v in enumerate(values)])
        console.print(table)
    out = Path(args.out) if args.out else root / "compare" / ("__".join(r.label.replace("/", "-") for r in runs)
                                                               + ".html")
    page = compare_html(runs, out, embed_images=not args.link_images)
    print(f"Comparison page: {page}")
    return 0


# --------------------------------------------------------------------------- ui
def ui_command(root: Path, host: str, port: int) -> list[str]:
    """The `mlflow server` command line (UI + REST API) that serves the local store of `root`."""
    from .mlflow import ARTIFACTS_NAME, default_store

    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", default_store(root),
            "--default-artifact-root", (root.resolve() / ARTIFACTS_NAME).as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """True once something answers on host:port; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def cmd_ui(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .mlflow import DB_NAME, import_mlflow

    import_mlflow()  # a missing extra fails here with the pip command, not inside a subprocess
    root = _root(args, overrides)
    if not (root / DB_NAME).is_file():
        raise AnomalensError(f"No MLflow store at '{root / DB_NAME}': train with --logging.logger mlflow first, "
                             "or pass --root with the runs root you trained into.")
    # Telemetry off; no job runner (it serves GenAI evaluation jobs and starts a pool of worker processes).
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Its own process group: mlflow starts a web server child, and stopping must take both down.
    # The server's chatter goes to stderr: stdout carries only the address, for scripts to read.
    process = subprocess.Popen(ui_command(root, args.host, args.port), env=env, start_new_session=True, stdout=2)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's SIGTERM stops the server too
    try:
        if not wait_for_port(args.host, args.port, process):
            code = process.poll()
            raise AnomalensError(f"The MLflow UI did not start on {args.host}:{args.port}"
                                 + (f" (exit code {code}); is the port in use? Try --port." if code is not None
                                    else "; gave up after 120 s."))
        address = f"http://{args.host}:{args.port}"
        print(f"MLflow UI for {root.resolve()}: {address}  (Ctrl+C to stop)", flush=True)
        # MLflow 3 opens an experiment on its overview tab: give each project's runs table directly.
        for name, experiment_id in _experiments(root):
            print(f"  {name}: {address}/#/experiments/{experiment_id}/runs", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(process)
        signal.signal(signal.SIGTERM, previous)


def _experiments(root: Path) -> list[tuple[str, str]]:
    """(name, id) of the experiments in the local store of `root` that hold runs, by name."""
    from mlflow.tracking import MlflowClient

    from .mlflow import default_store

    client = MlflowClient(tracking_uri=default_store(root))
    found = [(e.name, e.experiment_id) for e in client.search_experiments()]
    return sorted((name, key) for name, key in found if client.search_runs([key], max_results=1))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process started with start_new_session=True and everything it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
