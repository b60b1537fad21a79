"""A sweep file in W&B's sweep-config format, checked against train/main.py's options before anything trains.

    method: bayes                       # grid, random or bayes
    metric: {name: val/f1_macro, goal: maximize}
    parameters:
      lr: {distribution: log_uniform_values, min: 0.001, max: 0.1}
      batch_size: {values: [64, 128]}
      arch: {value: mobilenet_v2}
    early_terminate: {type: hyperband, min_iter: 3, eta: 3}
    run_cap: 20                         # optional: without it, random and bayes run until stopped (as W&B's do)

Parameters are named as train/main.py's options (`batch_size` or `batch-size`). Each is a `value`, a list of
`values`, or a `distribution` with min/max (and q, or mu/sigma). Every mistake is one UsageError naming the
file and the parameter.
"""

import dataclasses
import math

from train.config import Config, load_yaml_mapping
from train.errors import UsageError, did_you_mean

METHODS = ("grid", "random", "bayes")
# The keys the project logs per epoch (tracking.epoch_values), and the epoch record's name for each.
METRICS = {"val/f1_macro": "val_f1_macro", "val/acc": "val_acc", "val/loss": "val_loss"}
GOALS = ("maximize", "minimize")
# W&B's distributions this project samples, and the keys each takes.
DISTRIBUTIONS = {
    "constant": {"value"},
    "categorical": {"values"},
    "uniform": {"min", "max"},
    "int_uniform": {"min", "max"},
    "q_uniform": {"min", "max", "q"},
    "log_uniform_values": {"min", "max"},
    "q_log_uniform_values": {"min", "max", "q"},
    "inv_log_uniform_values": {"min", "max"},
    "normal": {"mu", "sigma"},
    "q_normal": {"mu", "sigma", "q"},
    "log_normal": {"mu", "sigma"},
}
# Options a sweep may not vary: they say where a run goes and how it is tracked, which the sweep decides.
NOT_SWEPT = {"output_dir", "resume", "eval_only", "checkpoint", "run_name", "wandb_group", "config", "sweep_dir",
             "trial_number"}


def sweepable() -> list:
    """The train/main.py options a sweep may vary: Config's fields (dataclasses.fields leaves out the ClassVar
    `given`, which __dataclass_fields__ holds), less NOT_SWEPT."""
    return [f.name for f in dataclasses.fields(Config) if f.name not in NOT_SWEPT]


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str  # a Config field
    distribution: str
    values: tuple = ()  # constant and categorical
    min: float = 0.0
    max: float = 0.0
    q: float = 0.0
    mu: float = 0.0
    sigma: float = 1.0

    @property
    def kind(self) -> type:
        return Config.__dataclass_fields__[self.name].type

    @property
    def searched(self) -> bool:
        """Whether trials differ in it: not one fixed value (`value: V`, or `values` with one)."""
        return not (self.distribution in ("constant", "categorical") and len(self.values) == 1)

    def grid(self) -> list:
        """The values a grid takes: categorical and constant as listed, int_uniform every integer, q_uniform every
        step from min to max (both included, unlike W&B, which leaves max out)."""
        if self.distribution in ("constant", "categorical"):
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.min), int(self.max) + 1))
        steps = int(math.floor((self.max - self.min) / self.q + 1e-9))
        return [self.kind(round(self.min + i * self.q, 12)) for i in range(steps + 1)]


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str
    method: str
    metric: str  # the logged key, e.g. val/f1_macro
    goal: str
    parameters: tuple  # of Parameter, in file order
    min_iter: int = 0  # hyperband, in epochs; 0: no early termination
    eta: int = 3
    run_cap: int = 0  # 0: no cap (a grid ends when exhausted; random and bayes run until stopped)

    @property
    def record_key(self) -> str:
        return METRICS[self.metric]

    def best(self, values: list):
        """The best of a trial's per-epoch metric values, by the goal."""
        return max(values) if self.goal == "maximize" else min(values)

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.parameters)

    @property
    def searched(self) -> tuple:
        """The names of the parameters the trials differ in, in file order (the fixed ones left out)."""
        return tuple(p.name for p in self.parameters if p.searched)


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file; every problem is one UsageError naming the file."""
    return parse_sweep(load_yaml_mapping(path, "sweep file", "method, metric, parameters, ...", empty_ok=False),
                       path)


def parse_sweep(raw: dict, path: str = "<sweep>") -> Sweep:
    def fail(message: str):
        raise UsageError(f"sweep file {path}: {message}")

    known = {"method", "metric", "parameters", "early_terminate", "run_cap", "name", "description", "program",
             "command", "project", "entity"}
    for key in raw:
        if key not in known:
            fail(f"unknown key '{key}' ({_hint(key, known)})")
    method = raw.get("method")
    if method not in METHODS:
        fail(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    metric = raw.get("metric") or {"name": "val/f1_macro", "goal": "maximize"}
    if not isinstance(metric, dict) or metric.get("name", "val/f1_macro") not in METRICS:
        fail(f"metric name must be one of {', '.join(METRICS)}, got {metric!r}")
    name = metric.get("name", "val/f1_macro")
    goal = metric.get("goal", "minimize" if name == "val/loss" else "maximize")
    if goal not in GOALS:
        fail(f"metric goal must be maximize or minimize, got {goal!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        fail("parameters must be a mapping of train/main.py options, e.g. lr: {min: 0.001, max: 0.1}")
    params = tuple(_parameter(str(key), spec, fail) for key, spec in parameters.items())
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        fail(f"a parameter is given twice (as batch_size and batch-size?): {', '.join(names)}")
    run_cap = raw.get("run_cap", 0)
    if not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 0:
        fail(f"run_cap must be a whole number >= 0, got {run_cap!r}")
    if method == "grid":
        continuous = [p.name for p in params if p.distribution not in ("constant", "categorical", "int_uniform",
                                                                     "q_uniform")]
        if continuous:
            fail(f"a grid needs values, int_uniform or q_uniform, not a continuous distribution: "
                 f"{', '.join(continuous)}")
    min_iter, eta = _early_terminate(raw.get("early_terminate"), fail)
    return Sweep(str(path), method, name, goal, params, min_iter, eta, run_cap)


# The numeric checks of a ranged distribution, in order: (which numbers it needs, whether they hold, what to say).
RANGE_CHECKS = (
    (("min",), lambda p: p.min < p.max, lambda p: f"min must be below max, got min {p.min:g}, max {p.max:g}"),
    (("min", "log"), lambda p: p.min > 0, lambda p: f"{p.distribution} needs min > 0, got {p.min:g}"),
    (("q",), lambda p: p.q > 0, lambda p: f"q must be > 0, got {p.q:g}"),
    (("sigma",), lambda p: p.sigma > 0, lambda p: f"sigma must be > 0, got {p.sigma:g}"),
)
INT_DISTRIBUTIONS = ("int_uniform", "q_uniform", "q_log_uniform_values", "q_normal")  # whole numbers out


def _parameter(key: str, spec, fail) -> Parameter:
    """One parameter of a sweep file, checked: a sweepable option, a known distribution with the keys it takes,
    values of the option's type, numbers in range."""
    name = key.replace("-", "_")
    options = sweepable()
    if name not in options:
        reason = "is set by the sweep itself" if name in NOT_SWEPT else f"is not a train/main.py option " \
                                                                        f"({_hint(name, options)})"
        fail(f"parameter '{key}' {reason}")
    kind = Config.__dataclass_fields__[name].type
    distribution = _distribution(key, spec, fail)
    if distribution in ("constant", "categorical"):
        values = [spec["value"]] if distribution == "constant" else spec["values"]
        if not isinstance(values, list) or not values:
            fail(f"parameter '{key}': values must be a non-empty list")
        for value in values:
            _check_type(key, value, kind, fail)
        return Parameter(name, distribution, tuple(kind(v) if kind is float else v for v in values))
    return _ranged(key, name, distribution, spec, kind, fail)


def _distribution(key: str, spec, fail) -> str:
    """The distribution a parameter's mapping names or implies, once its keys are the ones it takes."""
    if not isinstance(spec, dict):
        fail(f"parameter '{key}' must be a mapping: {{value: V}}, {{values: [...]}} or {{distribution: ..., "
             f"min: ..., max: ...}}")
    distribution = spec.get("distribution") or _implied(spec)
    if distribution not in DISTRIBUTIONS:
        fail(f"parameter '{key}': unknown distribution {distribution!r} (supported: {', '.join(DISTRIBUTIONS)})")
    extra = set(spec) - DISTRIBUTIONS[distribution] - {"distribution"}
    if extra or not (DISTRIBUTIONS[distribution] <= set(spec) or distribution in ("normal", "log_normal",
                                                                                  "q_normal")):
        fail(f"parameter '{key}': {distribution} takes {', '.join(sorted(DISTRIBUTIONS[distribution]))}, "
             f"got {', '.join(sorted(spec))}")
    return distribution


def _ranged(key: str, name: str, distribution: str, spec: dict, kind: type, fail) -> Parameter:
    """A distribution over numbers (min/max, q, mu/sigma), checked against RANGE_CHECKS and the option's type."""
    if kind not in (int, float):
        fail(f"parameter '{key}' is a {kind.__name__} option: give it values, not a {distribution} distribution")
    numbers = {k: spec[k] for k in ("min", "max", "q", "mu", "sigma") if k in spec}
    for k, v in numbers.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            fail(f"parameter '{key}': {k} must be a number, got {v!r}")
    p = Parameter(name, distribution, **{k: float(v) for k, v in numbers.items()})
    for needs, holds, say in RANGE_CHECKS:
        applies = all(n in numbers or n in distribution for n in needs)
        if applies and not holds(p):
            fail(f"parameter '{key}': {say(p)}")
    if kind is int and distribution not in INT_DISTRIBUTIONS:
        fail(f"parameter '{key}' is a whole-number option: use int_uniform or a q_ distribution, not {distribution}")
    if kind is int and any(not float(v).is_integer() for k, v in numbers.items() if k in ("min", "max", "q")):
        fail(f"parameter '{key}' is a whole-number option: min, max and q must be whole numbers")
    return p


def _implied(spec: dict) -> str:
    """W&B's defaults: value -> constant, values -> categorical, integer min/max -> int_uniform, else uniform."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"
    return "uniform" if "min" in spec else None


def _check_type(key, value, kind, fail) -> None:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool)) or \
        (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        fail(f"parameter '{key}': {value!r} is not of type {kind.__name__}")
    if kind is str:
        choices = Config.__dataclass_fields__[key.replace("-", "_")].metadata.get("choices")
        if choices and value not in choices:
            fail(f"parameter '{key}': {value!r} is not one of {', '.join(choices)}")


def _early_terminate(spec, fail) -> tuple:
    if spec is None:
        return 0, 3
    if not isinstance(spec, dict) or spec.get("type") != "hyperband":
        fail(f"early_terminate must be {{type: hyperband, min_iter: N, eta: M}}, got {spec!r}")
    extra = set(spec) - {"type", "min_iter", "eta"}
    if extra:
        fail(f"early_terminate: unsupported key(s) {', '.join(sorted(extra))} (this project takes min_iter and eta)")
    min_iter, eta = spec.get("min_iter"), spec.get("eta", 3)
    for name, value, low in (("min_iter", min_iter, 1), ("eta", eta, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            fail(f"early_terminate: {name} must be a whole number >= {low} (epochs for min_iter), got {value!r}")
    return min_iter, eta


def _hint(name: str, known) -> str:
    return did_you_mean(name, known).lstrip("; ") or f"known: {', '.join(sorted(known))}"
