"""MLflow tracker, through MlflowClient (no global active run, so nothing leaks between runs).

Default store: `sqlite:///<project.root>/mlflow.db` with artifacts in <project.root>/mlartifacts;
`logging.mlflow.tracking_uri` or MLFLOW_TRACKING_URI point elsewhere (a server, another store).
`anomalens ui` serves the default store.  Telemetry is off.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import missing_dependency
from .base import Tracker, check_reachable, project_name, read_table, run_name, settings

if TYPE_CHECKING:
    from ..config import Config
    from ..engine import Engine

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
_BATCH = 100  # MLflow's limit on params / tags per log_batch call
_MAX_VALUE = 6000  # and on the length of a param value


def import_mlflow() -> Any:
    # We never send usage data on the user's behalf; set before the import, which reads it.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        import mlflow
    except ImportError:
        raise missing_dependency("mlflow", "mlflow") from None
    return mlflow


def default_store(root: str | Path) -> str:
    """The local store `anomalens ui` serves: sqlite:///<root>/mlflow.db (absolute)."""
    return f"sqlite:///{Path(root).resolve() / DB_NAME}"


def tracking_uri(config: Config) -> str:
    """`logging.mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else the local default store."""
    return (settings(config, "mlflow")["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
            or default_store(config.project.root))


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, config: Config):
        super().__init__(config)
        self.mlflow = import_mlflow()
        self.uri = tracking_uri(config)
        self.client: Any = None
        self.run_id: str | None = None

    # -- backend ------------------------------------------------------------------------------------
    def start(self, engine: Engine) -> None:
        from mlflow.tracking import MlflowClient

        check_reachable(self.uri, "the MLflow tracking server")
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") if not self.config.logging.project else None
        name = name or project_name(self.config)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                # Keep artifacts beside the database, not in ./mlruns of whatever folder we run from.
                database = Path(self.uri[len("sqlite:///"):]).resolve()
                location = (database.parent / ARTIFACTS_NAME / name).as_uri()
            # The kind makes MLflow 3's UI open on the training-runs view rather than the GenAI overview.
            experiment_id = self.client.create_experiment(name, artifact_location=location,
                                                          tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name(engine))
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_VALUE]) for k, v in tags.items()]
        if "git/commit" in tags:  # MLflow's own tag: the UI shows it as the run's source version
            items.append(RunTag("mlflow.source.git.commit", tags["git/commit"]))
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_packages(self, packages: list[str]) -> None:
        self.client.log_text(self.run_id, "\n".join(packages) + "\n", "environment/requirements.txt")

    def log_code(self, snapshot: Path) -> None:
        self.client.log_artifact(self.run_id, str(snapshot), "code")

    def log_graph(self, model: Any, example: Any) -> None:
        n_params = sum(p.numel() for p in model.parameters())
        n_buffers = sum(b.numel() for b in model.buffers())
        text = f"{model}\n\nparameters: {n_params:,}\nbuffers (fitted state): {n_buffers:,}\n"
        self.client.log_text(self.run_id, text, "model/graph.txt")

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        # key + step: the UI's image panel can then step through, and match names across runs.
        self.client.log_image(self.run_id, image, key=name, step=step)

    def log_table(self, path: Path) -> None:
        headers, rows = read_table(path)
        self.client.log_artifact(self.run_id, str(path))
        self.client.log_table(self.run_id, {h: [r[i] for r in rows] for i, h in enumerate(headers)},
                              f"{path.stem}.json")  # scores.csv -> scores.json

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def report(self) -> None:
        print(f"MLflow run {self.run_id} in {self.uri}")
