"""Comet tracker, with comet_ml's own Experiment / OfflineExperiment classes.

Mode `auto` (default) is online when Comet finds an API key (COMET_API_KEY or ~/.comet.config),
offline otherwise.  Offline runs write an archive into <run>/comet/ and print the exact
`comet upload` command.  An online run that cannot reach Comet at start is re-created offline
before anything is logged; one that loses the network later is kept whole (what was sent before
too) by Comet's own fallback streamer, as an archive in the same folder, uploaded with
`comet upload --force-reupload`.  An archive that could not be written (a full disk) is one
warning, never an upload command.  Comet's automatic probes (error tracking, cloud metadata,
host and IP details, framework monkey-patching, stdout capture) are switched off: we log what
we choose.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, missing_dependency
from .base import Tracker, check_reachable, project_name, read_table, run_name, settings

if TYPE_CHECKING:
    from ..config import Config
    from ..engine import Engine

# Comet reads these when comet_ml is first imported: error tracking (Sentry) would otherwise phone
# home even from offline runs, and auto-logging would monkey-patch torch.
_ENV = {"COMET_ERROR_TRACKING_ENABLE": "false", "COMET_DISABLE_AUTO_LOGGING": "1"}

# Everything Comet would gather on its own is off; the base Tracker logs the same facts everywhere.
_QUIET = dict(log_code=False, log_graph=False, auto_param_logging=False, auto_metric_logging=False,
              parse_args=False, auto_output_logging=None, log_env_details=False, log_env_gpu=False,
              log_env_cpu=False, log_env_host=False, log_env_network=False, log_env_disk=False,
              log_git_metadata=False, log_git_patch=False, auto_log_co2=False, display_summary_level=0)


def import_comet() -> Any:
    os.environ.update(_ENV)
    try:
        import comet_ml
    except ImportError:
        raise missing_dependency("comet_ml", "comet") from None
    _stop_error_tracking(comet_ml)
    return comet_ml


def _stop_error_tracking(comet_ml: Any) -> None:
    """comet_ml imported before us (by the user) may have started its Sentry reporter: stop it,
    leaving any Sentry client of the user's own alone."""
    try:
        import sentry_sdk
        from sentry_sdk.integrations.logging import BreadcrumbHandler, EventHandler
    except ImportError:
        return
    client = sentry_sdk.get_client()
    comet_dsn = comet_ml.get_config().get_string(None, "comet.internal.sentry_dsn")
    if comet_dsn and client.is_active() and client.dsn == comet_dsn:
        client.close(timeout=0)
        sentry_sdk.get_global_scope().set_client(None)
    comet_logger = logging.getLogger("comet_ml")
    for handler in list(comet_logger.handlers):
        if isinstance(handler, (EventHandler, BreadcrumbHandler)):
            comet_logger.removeHandler(handler)


class CometTracker(Tracker):
    name = "comet"

    def __init__(self, config: Config):
        super().__init__(config)
        self.comet = import_comet()
        self.settings = settings(config, "comet")
        self.api_key = self.comet.config.get_api_key(None, self.comet.config.get_config())
        mode = self.settings["mode"]
        if mode == "online" and not self.api_key:
            raise ConfigError("logging.comet.mode is 'online' but no Comet API key was found: set COMET_API_KEY "
                              "(or run `comet login`), or set logging.comet.mode to 'offline'.")
        self.online = mode == "online" or (mode == "auto" and bool(self.api_key))
        self.experiment: Any = None
        self.folder: Path | None = None
        self._archives: list[Path] | None = None

    # -- backend ------------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        self._archives = None
        self.folder = engine.run_dir / "comet"
        self.folder.mkdir(parents=True, exist_ok=True)
        project = os.environ.get("COMET_PROJECT_NAME") if not self.config.logging.project else None
        kwargs = dict(project_name=project or project_name(self.config),
                      workspace=self.settings["workspace"] or os.environ.get("COMET_WORKSPACE"),
                      offline_directory=str(self.folder), **_QUIET)
        experiment = None
        if self.online:
            try:
                # Comet retries an unreachable server for about a minute; a 3-second probe decides at once.
                check_reachable(self.comet.config.get_backend_address(), "the Comet server")
                experiment = self.comet.Experiment(api_key=self.api_key, **kwargs)
                if not experiment.alive:
                    experiment.end()
                    raise ConnectionError("Comet did not accept the experiment (see its messages above)")
            except Exception as exc:  # noqa: BLE001 - network down or key rejected: same remedy, offline
                experiment = None
                self.online = False
                reason = f"{type(exc).__name__}: {exc}".replace(self.api_key or "\0", "<api key>")  # never print it
                warnings.warn(f"Comet is unavailable ({reason}); this run is logged to an offline archive in "
                              f"{self.folder} instead. Upload it with the command printed at the end.", stacklevel=2)
        if experiment is None:
            experiment = self.comet.OfflineExperiment(**kwargs)
        self.experiment = experiment
        experiment.set_name(run_name(engine))

    def log_params(self, params: dict[str, Any]) -> None:
        self.experiment.log_parameters({k: _plain(v) for k, v in params.items()}, nested_support=False)

    def log_tags(self, tags: dict[str, str]) -> None:
        self.experiment.add_tags([tags["model"], tags["dataset"], tags["category"]])
        self.experiment.log_others(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self.experiment.log_metrics(metrics, step=step)

    def log_packages(self, packages: list[str]) -> None:
        self.experiment.set_pip_packages()  # Comet's own installed_packages record (read locally)

    def log_code(self, snapshot: Path) -> None:
        import zipfile

        with zipfile.ZipFile(snapshot) as zf:
            for name in zf.namelist():
                self.experiment.log_code(code=zf.read(name).decode("utf-8", "replace"), code_name=name)

    def log_graph(self, model: Any, example: Any) -> None:
        self.experiment.set_model_graph(str(model))

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        from PIL import Image

        # A PIL image, not the array: Comet probes an array as a file path first.
        self.experiment.log_image(Image.fromarray(image), name=name, step=step, image_format="png")

    def log_table(self, path: Path) -> None:
        headers, rows = read_table(path)
        self.experiment.log_table(path.name, rows, headers=headers)

    def log_file(self, path: Path) -> None:
        self.experiment.log_asset(str(path), file_name=path.name)

    def finish(self, failed: bool = False) -> None:
        if failed:
            self.experiment.log_other("status", "failed")
        if self.online:  # hand every queued message to Comet's fallback copy before end() tears it down
            self.experiment.flush()
        self.experiment.end()
        # Comet only logs a failure to write its archive (a full disk): check it, so that a broken
        # archive is one warning (the run's local record is complete) instead of an upload command.
        candidates = self._candidates()
        self._archives = [path for path in candidates if _valid_archive(path)]
        broken = [path for path in candidates if path not in self._archives]
        if broken:
            raise OSError(f"Comet's offline archive {broken[0]} is incomplete (is the disk full?); "
                          "this Comet experiment is lost, the run's local record is complete.")
        if not self.online and not self._archives:
            raise OSError(f"Comet wrote no offline archive in {self.folder} (is the disk full?); "
                          "this Comet experiment is lost, the run's local record is complete.")
        kept = self.comet.get_config().get_bool(None, "comet.fallback_streamer.keep_offline_zip")
        if self.online and self._archives and not kept:  # Comet's fallback: the connection was lost mid-run
            warnings.warn(f"Comet lost its connection during the run; everything logged is kept in the offline "
                          f"archive {self._archives[0]}. Upload it with the command printed at the end.",
                          stacklevel=2)

    def report(self) -> None:
        if self.online:
            url = getattr(self.experiment, "url", None)
            print(f"Comet experiment: {url}" if url else "Comet experiment logged online.")
        # An archive of an online experiment (Comet's fallback) completes one that exists on the server.
        command = "comet upload --force-reupload" if self.online else "comet upload"
        for archive in self.archives():
            print(f"Comet offline archive: {archive}\nUpload it with: {command} {archive}")

    def archives(self) -> list[Path]:
        """Complete offline archives of this run (an online run has one only if it fell back)."""
        if self._archives is None:  # checked once the experiment has ended
            return [path for path in self._candidates() if _valid_archive(path)]
        return self._archives

    def _candidates(self) -> list[Path]:
        found = set(self.folder.glob("*.zip")) if self.folder else set()
        # Comet writes the archive to a temporary folder when ours cannot be opened: report it there.
        elsewhere = getattr(self.experiment, "offline_directory", None)
        key = getattr(self.experiment, "id", None)
        if elsewhere and key and self.folder and Path(elsewhere).resolve() != self.folder.resolve():
            found.update(Path(elsewhere).glob(f"{key}*.zip"))
        return sorted(found)


def _valid_archive(path: Path) -> bool:
    """A complete Comet offline archive: a readable zip holding experiment.json and messages.json."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return {"experiment.json", "messages.json"} <= set(zf.namelist()) and zf.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
