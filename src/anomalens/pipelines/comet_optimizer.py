"""The Comet Optimizer backend (`backend: comet`): our search space as a Comet optimizer config, and
the loop that runs each trial Comet hands out.

Comet's config format (https://www.comet.com/docs/v2/guides/optimizer/configure-optimizer/):

    {"algorithm": "bayes" | "grid" | "random",
     "name": "<study name>",
     "trials": 1,                                   # repeats of each parameter set
     "spec": {"metric": "image_AUROC", "objective": "maximize" | "minimize", "maxCombo": 30,
              "gridSize": 5, "seed": 42, "retryLimit": 20, "retryAssignLimit": 0, "minSampleSize": 100,
              "randomize": false},
     "parameters": {"model.n_features": {"type": "integer", "min": 50, "max": 300, "scalingType": "uniform"},
                    "trainer.optimizer.lr": {"type": "float", "min": 1e-5, "max": 1e-2,
                                             "scalingType": "loguniform"},
                    "model.k": {"type": "discrete", "values": [1, 3, 9]},
                    "model.layers": {"type": "categorical", "values": ["[blocks.1, blocks.2]", "..."]}}}

Translation: sampler tpe -> bayes, random -> random, grid -> grid; n_trials -> spec.maxCombo (0 = the
whole grid); a stepped range or numeric choices -> discrete values; other choices -> categorical
values, each the YAML label of the choice (Comet takes strings), decoded back on the way in.
Extra spec keys (seed, retryLimit, ...) and `trials` go under `comet:` in the HPO file.

The Optimizer itself lives on Comet's server: it needs an API key (COMET_API_KEY or `comet login`).
Each trial is one Comet experiment (created by the Optimizer, which reads the objective back from
it when it ends); the trial's own run is logged to the other configured trackers as usual.
Several workers share one optimizer through its id; a study resumes from the id saved in
<output>/comet_optimizer.json (or COMET_OPTIMIZER_ID, Comet's own way to join an optimizer).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BOOL, STR, AnomalensError, ConfigError, Interval, OneOf, param_error
from .hpo import HpoSpec, Param, TrialRecord, _label, run_trial, run_workers, split_trials, worker_id

ALGORITHMS = {"tpe": "bayes", "random": "random", "grid": "grid"}
CONFIG_KEYS = ("algorithm", "spec", "parameters", "name", "trials")
SPEC_RULES = {
    "metric": STR,
    "objective": OneOf("maximize", "minimize"),
    "maxCombo": Interval(int, 0),
    "gridSize": Interval(int, 1),
    "seed": Interval(int, 0),
    "retryLimit": Interval(int, 0),
    "retryAssignLimit": Interval(int, 0),
    "minSampleSize": Interval(int, 1),
    "randomize": BOOL,
}
# What the HPO file may put under `comet:` (metric, objective and maxCombo come from objective / n_trials).
EXTRA_KEYS = ("gridSize", "seed", "retryLimit", "retryAssignLimit", "minSampleSize", "randomize", "trials")
PARAM_RULES = {
    "integer": ("type", "min", "max", "scalingType", "mu", "sigma"),
    "float": ("type", "min", "max", "scalingType", "mu", "sigma"),
    "double": ("type", "min", "max", "scalingType", "mu", "sigma"),
    "discrete": ("type", "values"),
    "categorical": ("type", "values"),
}
SCALING = ("linear", "uniform", "loguniform", "normal", "lognormal")
OWNER = "the Comet optimizer config"


# --------------------------------------------------------------------------- translation
def comet_parameter(param: Param) -> dict[str, Any]:
    """One searched key in Comet's parameter format."""
    if param.type == "categorical":
        if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in param.choices):
            return {"type": "discrete", "values": list(param.choices)}
        return {"type": "categorical", "values": [_label(c) for c in param.choices]}
    if param.step is not None:
        return {"type": "discrete", "values": param.grid(0)}
    kind = "integer" if param.type == "int" else "float"
    return {"type": kind, "min": param.decode(param.low), "max": param.decode(param.high),
            "scalingType": "loguniform" if param.log else "uniform"}


def build_config(spec: HpoSpec) -> dict[str, Any]:
    """The Comet optimizer config of an HPO spec (not yet validated: see validate_config)."""
    extra = dict(spec.comet)
    for key in extra:
        if key not in EXTRA_KEYS:
            raise ConfigError(f"Unknown key {key!r} in 'comet'. Allowed: {', '.join(EXTRA_KEYS)} (the metric, "
                              "objective and maxCombo come from objective and n_trials).")
    if set(spec.sampler) - {"name"}:
        raise ConfigError(f"The sampler settings {spec.sampler!r} are Optuna's; with backend: comet give only its "
                          "name (tpe = bayes, random, grid) and put Comet's spec keys under 'comet'.")
    trials = extra.pop("trials", 1)
    algorithm = ALGORITHMS[spec.sampler["name"]]
    cspec: dict[str, Any] = {"metric": spec.metric, "objective": spec.direction, "maxCombo": spec.n_trials or 0,
                             "seed": spec.seed}
    if algorithm == "grid":
        cspec["gridSize"] = spec.grid_size
    cspec.update(extra)
    return {"algorithm": algorithm, "name": spec.study_name, "trials": trials, "spec": cspec,
            "parameters": {key: comet_parameter(p) for key, p in spec.space.items()}}


def validate_config(config: Any) -> dict[str, Any]:
    """Check a Comet optimizer config before it reaches the server; every mistake is one ConfigError."""
    if not isinstance(config, dict):
        raise ConfigError(f"A Comet optimizer config must be a mapping. Got {config!r} instead.")
    for key in config:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"Unknown key {key!r} in {OWNER}. Allowed: {', '.join(CONFIG_KEYS)}.")
    if config.get("algorithm") not in ("bayes", "grid", "random"):
        raise param_error(OWNER, "algorithm", "one of 'bayes', 'grid', 'random'", config.get("algorithm"))
    if config.get("name") is not None and not isinstance(config["name"], str):
        raise param_error(OWNER, "name", "a str", config["name"])
    trials = config.get("trials", 1)
    if not Interval(int, 1).check(trials):
        raise param_error(OWNER, "trials", Interval(int, 1).describe(), trials)
    spec = config.get("spec")
    if not isinstance(spec, dict):
        raise param_error(OWNER, "spec", "a mapping", spec)
    for key, value in spec.items():
        if key not in SPEC_RULES:
            raise ConfigError(f"Unknown key 'spec.{key}' in {OWNER}. Allowed: {', '.join(SPEC_RULES)}.")
        if not SPEC_RULES[key].check(value):
            raise param_error(OWNER, f"spec.{key}", SPEC_RULES[key].describe(), value)
    if "metric" not in spec:
        raise ConfigError(f"The 'spec' of {OWNER} needs a 'metric' (the name the trials log their objective as).")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise param_error(OWNER, "parameters", "a non-empty mapping of parameter names to ranges", parameters)
    for name, p in parameters.items():
        _validate_parameter(str(name), p)
    return config


def _validate_parameter(name: str, p: Any) -> None:
    owner = f"the Comet optimizer parameter {name!r}"
    if not isinstance(p, dict):
        raise ConfigError(f"The Comet optimizer parameter {name!r} must be a mapping with a 'type'. Got {p!r} instead.")
    kind = p.get("type")
    if kind not in PARAM_RULES:
        raise param_error(owner, "type", "one of " + ", ".join(repr(t) for t in PARAM_RULES), kind)
    for key in p:
        if key not in PARAM_RULES[kind]:
            raise ConfigError(f"Unknown key {key!r} in {owner} (type {kind}). Allowed: {', '.join(PARAM_RULES[kind])}.")
    if kind in ("discrete", "categorical"):
        values = p.get("values")
        item = Interval(float) if kind == "discrete" else STR
        if not isinstance(values, list) or not values or not all(item.check(v) for v in values):
            raise param_error(owner, "values", f"a non-empty list, each {item.describe()}", values)
        return
    number = Interval(int) if kind == "integer" else Interval(float)
    for key in ("min", "max"):
        if not number.check(p.get(key)):
            raise param_error(owner, key, number.describe(), p.get(key))
    if not p["min"] < p["max"]:
        raise param_error(owner, "max", f"greater than min ({p['min']})", p["max"])
    scaling = p.get("scalingType", "uniform")
    if scaling not in SCALING:
        raise param_error(owner, "scalingType", "one of " + ", ".join(repr(s) for s in SCALING), scaling)
    if scaling in ("loguniform", "lognormal") and p["min"] <= 0:
        raise param_error(owner, "min", f"> 0 (scalingType {scaling})", p["min"])
    if scaling in ("normal", "lognormal"):
        for key in ("mu", "sigma"):
            if not Interval(float).check(p.get(key)):
                raise ConfigError(f"{owner[0].upper()}{owner[1:]} needs '{key}' (a number) with scalingType {scaling}.")


def decode(spec: HpoSpec, experiment: Any) -> dict[str, Any]:
    """The trial's config values from the parameters Comet assigned to `experiment`."""
    return {key: param.decode(experiment.get_parameter(key)) for key, param in spec.space.items()}


# --------------------------------------------------------------------------- the optimizer
Factory = Callable[[Any], Any]


def make_optimizer(config_or_id: Any, factory: Factory | None = None) -> Any:
    """comet_ml.Optimizer(config or id), or `factory(...)` (tests: a fake); needs a Comet API key."""
    if factory is not None:
        return factory(config_or_id)
    from ..loggers.comet import import_comet

    comet_ml = import_comet()
    if not comet_ml.config.get_api_key(None, comet_ml.config.get_config()):
        raise ConfigError("backend: comet needs a Comet API key (the Optimizer runs on Comet's server): set "
                          "COMET_API_KEY or run `comet login`, or use backend: optuna.")
    return comet_ml.Optimizer(config_or_id, verbose=0)


def experiment_kwargs(spec: HpoSpec) -> dict[str, Any]:
    """How the Optimizer creates each trial's experiment: our project, Comet's own probes off."""
    from ..loggers.base import project_name, settings
    from ..loggers.comet import _QUIET

    config = spec.base_config()
    project = os.environ.get("COMET_PROJECT_NAME") if not config.logging.project else None
    return {"project_name": project or project_name(config),
            "workspace": settings(config, "comet")["workspace"] or os.environ.get("COMET_WORKSPACE"), **_QUIET}


def drive(spec: HpoSpec, optimizer: Any, n_trials: int | None = None, worker: int = 0,
          progress: bool | None = None, factory: Factory | None = None) -> int:
    """Run the trials the optimizer hands out (at most n_trials here); returns how many ran.

    `optimizer` is an Optimizer, or its id (a worker joining it).  Each trial logs its metrics to its
    experiment and ends it, which reports the objective back; a failed trial logs no objective (Comet
    then leaves it out of the search) and the loop goes on.
    """
    if optimizer is None or isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, factory)
    log = spec.output / "trials.jsonl"
    who = worker_id(worker)
    ran = 0
    for experiment in optimizer.get_experiments(**experiment_kwargs(spec)):
        count = (getattr(experiment, "optimizer", None) or {}).get("count")
        number = count if isinstance(count, int) else len(read_records(log))
        started = time.time()
        record = TrialRecord(number, "running", None, {}, worker=who)
        run_dirs: list[str] = []
        try:
            record.params = decode(spec, experiment)
            # The Optimizer's experiment is this trial's Comet run: no second one from the comet tracker.
            result = run_trial(spec, record.params, number, drop_loggers=("comet",), progress=progress,
                               run_dirs=run_dirs)
            experiment.log_metrics(result.metrics)
            experiment.log_other("run_dir", result.run_dir)
            record.state, record.value, record.metrics = "complete", result.value, result.metrics
        except Exception as exc:
            record.state, record.error = "fail", f"{type(exc).__name__}: {exc}"[:2000]
            if not isinstance(exc, AnomalensError):
                traceback.print_exc()
            experiment.log_other("status", "failed")
            experiment.log_other("error", record.error)
        except BaseException:
            record.state, record.error = "fail", "interrupted"
            raise
        finally:
            record.run_dir = run_dirs[-1] if run_dirs else ""
            record.duration_s = time.time() - started
            experiment.end()
            with open(log, "a") as fh:
                fh.write(record.to_json() + "\n")
            outcome = f"{spec.metric} = {record.value:.4f}" if record.state == "complete" else record.error
            print(f"[hpo {who}] trial {number} {record.state}: {outcome}", flush=True)
        ran += 1
        if n_trials is not None and ran >= n_trials:
            break
    return ran


def read_records(log: Path) -> list[TrialRecord]:
    if not log.is_file():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(TrialRecord.from_json(line))
        except (ValueError, TypeError):  # a line cut short by a killed worker
            continue
    return records


def run_comet(spec: HpoSpec, workers: int = 1, resume: bool = False,
              factory: Factory | None = None) -> list[TrialRecord]:
    config = validate_config(build_config(spec))
    log = spec.output / "trials.jsonl"
    id_file = spec.output / "comet_optimizer.json"
    done = read_records(log)
    if done and not resume:
        raise ConfigError(f"The study {spec.study_name!r} already has {len(done)} trials in {spec.output}. Pass "
                          "--resume to continue its Comet optimizer, or choose another --study-name (or --output).")
    saved = json.loads(id_file.read_text()).get("id") if resume and id_file.is_file() else None
    optimizer = make_optimizer(saved or config, factory)
    get_id = getattr(optimizer, "get_id", None)
    opt_id = get_id() if callable(get_id) else None
    if opt_id:
        id_file.write_text(json.dumps({"id": opt_id, "config": config}, indent=2))
    counts = split_trials(spec.n_trials, workers)
    if len(counts) == 1 or factory is not None:  # an injected optimizer lives in this process only
        drive(spec, optimizer, spec.n_trials)
    elif not opt_id:
        raise AnomalensError("The Comet Optimizer returned no id: workers cannot join it. Run with --workers 1.")
    else:
        run_workers(spec, counts, extra=["--optimizer-id", str(opt_id)])
    return read_records(log)


__all__ = ["build_config", "validate_config", "comet_parameter", "decode", "drive", "run_comet", "make_optimizer"]
