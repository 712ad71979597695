"""The search loop's pure parts: the space file, the study, and what a trial trains.

`ltm-tui search` (ltm_tui/cli/search.py) asks Optuna for a trial, turns its parameters into the
settings of one ordinary job (`trial_settings`), queues it through the job service, feeds the
job's `eval_loss` events to the pruner and tells the study the run's score. Nothing here loads
torch (optuna does not either: tests/test_import_hygiene.py), and nothing here talks to the service.

The space file (YAML, docs/search.md):

    objective: overall          # or a measure: reasoning_depth, perplexity, ...
    direction: maximize         # default: minimize for perplexity and forgetting, else maximize
    study: lr-sweep             # default: the file's name without .yaml
    eval_every: 10              # steps between the pruner's evaluations (default 10)
    pruner: {kind: median, startup_trials: 2, warmup_steps: 10, max_eval_loss: 6.0}
    corpora: subsets            # optional: each trial trains on a subset of the files
    params:
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      lora_r: {choices: [4, 8, 16]}
      steps: {low: 20, high: 80, step: 20}
      block_size: 64            # a single value pins the setting for every trial
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import optuna

from backend.core.errors import CorpusError, SpaceError

# Search parameter -> (settings section, key, value type, which bases take it).
PARAMS: dict[str, tuple[str, str, type, frozenset[str]]] = {
    "lr": ("train", "lr", float, frozenset({"micro", "hf"})),
    "epochs": ("train", "epochs", float, frozenset({"micro", "hf"})),
    "min_train_tokens": ("train", "min_train_tokens", int, frozenset({"micro", "hf"})),  # token budget
    "steps": ("train", "max_steps", int, frozenset({"micro", "hf"})),
    "block_size": ("train", "block_size", int, frozenset({"micro", "hf"})),
    "micro_batch": ("train", "micro_batch", int, frozenset({"micro", "hf"})),
    "grad_accum": ("train", "grad_accum", int, frozenset({"micro", "hf"})),
    "warmup_frac": ("train", "warmup_frac", float, frozenset({"micro", "hf"})),
    "weight_decay": ("train", "weight_decay", float, frozenset({"micro", "hf"})),
    "min_lr_ratio": ("train", "min_lr_ratio", float, frozenset({"micro", "hf"})),
    "schedule": ("train", "schedule", str, frozenset({"micro", "hf"})),
    "lora_r": ("lora", "r", int, frozenset({"hf"})),
    "lora_alpha": ("lora", "alpha", int, frozenset({"hf"})),
    "lora_dropout": ("lora", "dropout", float, frozenset({"hf"})),
    "preset": ("base", "preset", str, frozenset({"micro"})),
}
CHOICE_ONLY = {"schedule": ("cosine", "linear"), "preset": ("tiny", "small", "base", "large")}
POSITIVE = {"lr", "epochs", "steps", "block_size", "micro_batch", "grad_accum", "lora_r", "lora_alpha"}
TOP_KEYS = ("objective", "direction", "study", "eval_every", "pruner", "corpora", "params")
PRUNER_KEYS = ("kind", "startup_trials", "warmup_steps", "max_eval_loss")
SUBSET_PREFIX = "use:"  # a file's in/out parameter when corpora: subsets
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None  # a categorical parameter
    low: float | None = None  # or a range
    high: float | None = None
    log: bool = False
    step: float | None = None
    fixed: Any = None  # or one value for every trial (not searched)

    @property
    def searched(self) -> bool:
        return self.fixed is None

    def grid(self) -> list | None:
        """The finite values a grid takes, or None where the range has no step."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        vals = [self.low + i * self.step for i in range(n)]
        return [int(round(v)) for v in vals] if PARAMS[self.name][2] is int else [round(v, 12) for v in vals]

    def to_dict(self) -> dict:
        if self.fixed is not None:
            return {"fixed": self.fixed}
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Space:
    path: str
    study: str
    objective: str = "overall"
    direction: str = "maximize"
    eval_every: int = 10
    pruner: dict = field(default_factory=dict)
    subsets: bool = False
    params: tuple[Param, ...] = ()

    def to_dict(self) -> dict:
        """What defines the study: a resumed search must have the same (the study's name aside)."""
        return {
            "objective": self.objective, "direction": self.direction, "eval_every": self.eval_every,
            "pruner": self.pruner, "corpora": "subsets" if self.subsets else "all",
            "params": {p.name: p.to_dict() for p in self.params},
        }


# --- the space file --------------------------------------------------------------------------


def load_space(path: str | Path) -> Space:
    """Read and check a space file; every problem is one SpaceError naming file:field."""
    import yaml

    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"{shown}: no such file; --space takes a YAML file (docs/search.md)") from None
    except OSError as exc:
        raise SpaceError(f"{shown}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SpaceError(f"{shown}: not a text file (not UTF-8); --space takes a YAML file (docs/search.md)") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpaceError(f"{shown}: nested too deeply to read; a space is a flat mapping (docs/search.md)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise SpaceError(f"{shown}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return parse_space(data, shown, default_study=Path(path).stem)


def parse_space(data: Any, shown: str, default_study: str = "search") -> Space:
    def fail(where: str, why: str) -> SpaceError:
        return SpaceError(f"{shown}:{where}: {why}")

    if not isinstance(data, dict):
        raise fail("top", "the file must be a mapping with params: (docs/search.md)")
    unknown = sorted(set(map(str, data)) - set(TOP_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key; use {', '.join(TOP_KEYS)}")
    objective = data.get("objective", "overall")
    if not isinstance(objective, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", objective):
        raise fail("objective", f"{objective!r} is not a measure name (overall, reasoning_depth, perplexity, ...)")
    from backend.scoring.measures import LOWER_IS_BETTER

    direction = data.get("direction", "minimize" if objective in LOWER_IS_BETTER else "maximize")
    if direction not in ("maximize", "minimize"):
        raise fail("direction", f"{direction!r}: use maximize or minimize")
    study = str(data.get("study", default_study))
    if not STUDY_NAME.fullmatch(study):
        raise fail("study", f"{study!r}: use letters, digits, _ . - (at most 64)")
    eval_every = data.get("eval_every", 10)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise fail("eval_every", f"{eval_every!r}: give a whole number of steps, at least 1")
    corpora = data.get("corpora", "all")
    if corpora not in ("all", "subsets"):
        raise fail("corpora", f"{corpora!r}: use subsets (each trial picks files) or all (the default)")
    pruner = _parse_pruner(data.get("pruner", {}), fail)
    params_node = data.get("params")
    if not isinstance(params_node, dict) or not params_node:
        raise fail("params", "give at least one parameter, e.g. lr: {low: 1.0e-4, high: 3.0e-3, log: true}")
    params = tuple(_parse_param(str(name), node, fail) for name, node in params_node.items())
    if not any(p.searched for p in params) and corpora != "subsets":
        raise fail("params", "every parameter is pinned to one value: nothing to search")
    return Space(shown, study, objective, direction, eval_every, pruner, corpora == "subsets", params)


def _parse_pruner(node: Any, fail) -> dict:
    if node in (None, "none", False):
        return {"kind": "none"}
    if isinstance(node, str):
        node = {"kind": node}
    if not isinstance(node, dict):
        raise fail("pruner", "a mapping, e.g. {kind: median, warmup_steps: 10}, or none")
    unknown = sorted(set(map(str, node)) - set(PRUNER_KEYS))
    if unknown:
        raise fail(f"pruner.{unknown[0]}", f"unknown key; use {', '.join(PRUNER_KEYS)}")
    kind = node.get("kind", "median")
    if kind not in ("median", "none"):
        raise fail("pruner.kind", f"{kind!r}: use median or none (max_eval_loss works with either)")
    out = {"kind": kind, "startup_trials": node.get("startup_trials", 2), "warmup_steps": node.get("warmup_steps", 0)}
    for key in ("startup_trials", "warmup_steps"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise fail(f"pruner.{key}", f"{v!r}: give a whole number, 0 or more")
    if "max_eval_loss" in node:
        v = node["max_eval_loss"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise fail("pruner.max_eval_loss", f"{v!r}: give a positive loss; a trial above it is pruned")
        out["max_eval_loss"] = float(v)
    return out


def _parse_param(name: str, node: Any, fail) -> Param:
    where = f"params.{name}"
    if name not in PARAMS:
        raise fail(where, f"unknown parameter; use {', '.join(PARAMS)}")
    kind = PARAMS[name][2]

    def value(v: Any, at: str) -> Any:
        ok = (
            isinstance(v, str) if kind is str
            else not isinstance(v, bool) and (isinstance(v, int) if kind is int else isinstance(v, (int, float)))
        )
        if not ok:
            want = {str: "a name", int: "a whole number", float: "a number"}[kind]
            raise fail(at, f"{v!r} is not {want}")
        if name in CHOICE_ONLY and v not in CHOICE_ONLY[name]:
            raise fail(at, f"{v!r}: use one of {', '.join(CHOICE_ONLY[name])}")
        if name in POSITIVE and v <= 0:
            raise fail(at, f"{v!r} must be above 0")
        if kind is not str and v < 0:
            raise fail(at, f"{v!r} must not be negative")
        return float(v) if kind is float else v

    if not isinstance(node, dict):
        return Param(name, fixed=value(node, where))
    unknown = sorted(set(map(str, node)) - {"choices", "low", "high", "log", "step"})
    if unknown:
        raise fail(f"{where}.{unknown[0]}", "unknown key; use choices, or low/high with log or step")
    if "choices" in node:
        if set(node) != {"choices"}:
            raise fail(where, "give either choices or low/high, not both")
        choices = node["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(f"{where}.choices", "a non-empty list, e.g. [4, 8, 16]")
        vals = tuple(value(v, f"{where}.choices") for v in choices)
        if len(set(vals)) != len(vals):
            raise fail(f"{where}.choices", "a value is listed twice")
        return Param(name, choices=vals)
    if name in CHOICE_ONLY:
        raise fail(where, f"takes choices: [{', '.join(CHOICE_ONLY[name])}]")
    for key in ("low", "high"):
        if key not in node:
            raise fail(where, f"a range needs low and high (or give choices: [...]); {key} is missing")
    low, high = value(node["low"], f"{where}.low"), value(node["high"], f"{where}.high")
    if not low < high:
        raise fail(where, f"low {low} must be below high {high}")
    log = node.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{where}.log", "true or false")
    step = node.get("step")
    if step is not None:
        step = value(step, f"{where}.step")
        if step <= 0:
            raise fail(f"{where}.step", "must be above 0")
        if log:
            raise fail(where, "log and step exclude each other (Optuna); drop one")
    if log and low <= 0:
        raise fail(f"{where}.low", "a log range must start above 0")
    return Param(name, low=low, high=high, log=log, step=step)


def check_base(space: Space, micro: bool) -> None:
    """Parameters the chosen base cannot take end the search before it starts, in one line."""
    kind = "micro" if micro else "hf"
    for p in space.params:
        if kind not in PARAMS[p.name][3]:
            why = ("LoRA settings apply to Hugging Face bases; micro trains all its weights"
                   if PARAMS[p.name][0] == "lora" else "micro presets apply to --base micro only")
            raise SpaceError(f"{space.path}:params.{p.name}: {why}; remove it or change --base")


def check_objective(space: Space, scenes: str) -> None:
    """The objective must be a score the battery gives, else every trial would train in vain."""
    from backend.scoring.measures import AUXILIARY
    from backend.scoring.scenes import load_batteries

    metrics = {b.metric for b in load_batteries(scenes)}
    known = {"overall", "forgetting"} | metrics | set(AUXILIARY)
    if space.objective not in known and not (space.objective.startswith("depth@") and "reasoning_depth" in metrics):
        raise SpaceError(
            f"{space.path}:objective: {space.objective!r} is not a score of the battery in {scenes};"
            f" use overall or one of {', '.join(sorted(metrics | {'forgetting'}))}"
        )


def grid_space(space: Space, files: list[str]) -> dict[str, list]:
    """The grid sampler's search space; one SpaceError for the first range without a step."""
    grid: dict[str, list] = {}
    for p in space.params:
        if not p.searched:
            continue
        values = p.grid()
        if values is None:
            raise SpaceError(
                f"{space.path}:params.{p.name}: a grid needs finite values: add step: or give "
                "choices: [...] (or use --sampler tpe)"
            )
        grid[p.name] = values
    if space.subsets:
        for key in subset_keys(files):
            grid[key] = [True, False]
    return grid


def grid_size(grid: dict[str, list]) -> int:
    return math.prod(len(v) for v in grid.values()) if grid else 0


def subset_keys(files: list[str]) -> list[str]:
    """One in/out parameter per file, named after it (numbered where two names collide)."""
    names = [Path(f).name for f in files]
    return [f"{SUBSET_PREFIX}{n}" if names.count(n) == 1 else f"{SUBSET_PREFIX}{i}:{n}" for i, n in enumerate(names)]


# --- a trial ---------------------------------------------------------------------------------


def suggest(trial, space: Space, files: list[str]) -> dict[str, Any]:
    """Ask the trial for every searched parameter (and the file subset); returns them by name."""
    out: dict[str, Any] = {}
    for p in space.params:
        if not p.searched:
            continue
        kind = PARAMS[p.name][2]
        if p.choices is not None:
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif kind is int:
            out[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    if space.subsets:
        for key in subset_keys(files):
            out[key] = trial.suggest_categorical(key, [True, False])
    return out


def chosen_files(params: dict[str, Any], files: list[str], subsets: bool) -> list[str]:
    if not subsets:
        return list(files)
    return [f for f, key in zip(files, subset_keys(files)) if params.get(key)]


def trial_settings(base: dict, space: Space, params: dict[str, Any]) -> dict:
    """The job settings (as JobSettings fields) of one trial: the command's settings, the space's
    pinned values, the trial's values, and the evaluation the pruner reads."""
    out = json.loads(json.dumps(base))  # a deep copy of plain data
    values = {p.name: p.fixed for p in space.params if not p.searched}
    values.update({k: v for k, v in params.items() if k in PARAMS})
    for name, v in values.items():
        section, key, _, _ = PARAMS[name]
        out.setdefault(section, {})[key] = v
    out["train"]["eval_every"] = space.eval_every
    return out


def combined_corpus(files: list[str], folder: Path) -> Path:
    """One corpus of several files: a corpus set (backend/ingest/corpora.py, read in place, members
    in the given order) written once under `folder`; one file is itself."""
    from backend.ingest.corpora import write_corpus_set

    if len(files) == 1:
        return Path(files[0])
    key = hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]
    stems = "+".join(Path(f).stem[:12] for f in files[:3]) + (f"+{len(files) - 3}more" if len(files) > 3 else "")
    target = folder / f"{stems}-{key}.corpora"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_corpus_set(target, files, note="written by ltm-tui search for a trial's subset")
    return target


def intermediate(value: float, direction: str) -> float:
    """An eval loss as the pruner's intermediate value: lower loss is better, so it is negated
    when the objective is maximised (Optuna's pruners compare in the study's direction)."""
    return -value if direction == "maximize" else value


def objective_value(run: dict, scores: dict, objective: str) -> float | None:
    return run.get("overall") if objective == "overall" else scores.get(objective)


# --- the study -------------------------------------------------------------------------------


def study_request(space_path: str | Path, files: list[str], settings: dict, trials: int, *, root: Path,
                  sampler: str = "tpe", study: str | None = None, seed: int = 0, priority: int = 0,
                  ) -> tuple[dict[str, Any], list[str]]:
    """The `search_start` request for a space file, the files (none: a resumed study's own) and
    the trials' starting settings (JobSettings as a dict), checked as `ltm-tui search` and the
    dashboard both need it; and the notes to show (a grid smaller than the trials asked). Bad
    input raises one line. The files are recorded in the study's folder the first time."""
    import yaml

    if study is not None and not STUDY_NAME.fullmatch(study):
        raise SpaceError(f"study {study!r}: use letters, digits, _ . - (at most 64)")
    if trials < 1:
        raise SpaceError(f"--trials {trials}: give at least 1")
    space = load_space(space_path)
    if study:
        space = replace(space, study=study)
    check_base(space, settings["base"]["base"] == "micro")
    check_objective(space, settings["scenes"])
    folder = study_dir(root, space.study)
    record = folder / "files.json"  # the files a resume takes when none are named
    if files:
        files = check_files(files, space.subsets, space.path)
    elif record.exists():
        files = json.loads(record.read_text(encoding="utf-8"))
    else:
        raise SpaceError(f"study {space.study!r} is new: name the files to search over")
    notes, target = [], trials
    if sampler == "grid":
        size = grid_size(grid_space(space, files))
        if target > size:
            notes.append(f"the grid holds {size} points: {size} trials, not {target}")
            target = size
    data = yaml.safe_load(Path(space_path).read_text(encoding="utf-8"))
    request = {
        "study": space.study, "space": json.loads(json.dumps(data, default=str)),
        "space_path": str(Path(space_path).expanduser().absolute()), "sampler": sampler,
        "files": files, "settings": settings, "target": target, "seed": seed, "priority": priority,
    }
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(files, indent=1), encoding="utf-8")
    return request, notes


def study_dir(workspace_root: Path, name: str) -> Path:
    from backend.core.workspace import Workspace

    return Workspace(Path(workspace_root)).search_dir(name)


def open_study(folder: Path, space: Space, sampler_name: str, files: list[str], settings: dict, seed: int):
    """Create or load the study in `folder` (a journal file: no server; a stop at any point
    loses at most the line being written). A resumed study must have the same space, files,
    sampler and settings, else one SpaceError says what differs."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    # A resumed TPE continues its random stream where the study stands: re-seeded as at the
    # start, its first random draw would repeat trial 0's parameters.
    held_trials = 0
    if space.study in optuna.study.get_all_study_names(storage):
        held_trials = len(optuna.load_study(study_name=space.study, storage=storage).get_trials(deepcopy=False))
    if sampler_name == "grid":
        sampler = _GridSampler(grid_space(space, files), seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=seed + held_trials, n_startup_trials=min(5, max(2, len(space.params))))
    study = optuna.create_study(
        study_name=space.study, storage=storage, load_if_exists=True, direction=space.direction,
        sampler=sampler, pruner=make_pruner(space.pruner),
    )
    identity = {"space": space.to_dict(), "files": files, "sampler": sampler_name, "settings": settings}
    held = study.user_attrs.get("identity")
    if held is None:
        study.set_user_attr("identity", identity)
    elif held != identity:
        what = [k for k in identity if held.get(k) != identity[k]]
        raise SpaceError(
            f"study {space.study!r} in {folder} was started with other {' and '.join(what)}; "
            f"resume it as it was, or name a new study (--study NAME, or study: in {space.path})"
        )
    return study


def make_pruner(spec: dict):
    parts = []
    if spec.get("kind", "median") == "median":
        parts.append(optuna.pruners.MedianPruner(
            n_startup_trials=spec.get("startup_trials", 2), n_warmup_steps=spec.get("warmup_steps", 0)))
    if spec.get("max_eval_loss") is not None:
        parts.append(_LossCeiling(spec["max_eval_loss"], spec.get("warmup_steps", 0)))
    if not parts:
        return optuna.pruners.NopPruner()
    return parts[0] if len(parts) == 1 else _AnyPruner(parts)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without its study.stop() at the last point (which works only inside
    study.optimize; the search loop caps its trials at the grid's size itself)."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ARG002
        return None


class _AnyPruner(optuna.pruners.BasePruner):
    """Prunes when any of its pruners would."""

    def __init__(self, pruners) -> None:
        self.pruners = pruners

    def prune(self, study, trial) -> bool:
        return any(p.prune(study, trial) for p in self.pruners)


class _LossCeiling(optuna.pruners.BasePruner):
    """Prunes a trial whose last eval loss is above `limit` (or not a number) after the warm-up
    steps, whichever sign the intermediate value carries."""

    def __init__(self, limit: float, warmup_steps: int = 0) -> None:
        self.limit, self.warmup = limit, warmup_steps

    def prune(self, study, trial) -> bool:  # noqa: ARG002
        step = trial.last_step
        if step is None or step < self.warmup:
            return False
        loss = abs(trial.intermediate_values[step])
        return math.isnan(loss) or loss > self.limit


def trial_rows(study) -> list[dict]:
    """The study's trials as plain rows (for DuckDB, the table and JSON)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = t.last_step
        rows.append({
            "number": t.number,
            "run_id": t.user_attrs.get("run_id"),
            "state": t.state.name,
            "params": dict(t.params),
            "value": t.value if t.state.name == "COMPLETE" else None,
            "last_step": last,
            "last_value": abs(t.intermediate_values[last]) if last is not None else None,
            "error": t.user_attrs.get("error"),
        })
    return rows


def importances(study) -> tuple[dict[str, float] | None, str | None]:
    """Optuna's parameter importances, or None with the reason (too few finished trials, or a
    single searched parameter)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    varied = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 3:
        return None, f"importances need 3 finished trials; {len(complete)} finished"
    if not varied:
        return None, "no parameter varied among the finished trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "quantiles select the same set": equal shares, said below
            found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return None, f"importances could not be computed: {exc}"
    return {k: round(float(v), 4) for k, v in found.items()}, None


def best(study) -> Any:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return study.best_trial if complete else None


def study_summary(study, space: Space, sampler: str, files: list[str], target: int,
                  imp: dict | None) -> dict:
    top = best(study)
    return {
        "study": space.study, "objective": space.objective, "direction": space.direction,
        "sampler": sampler, "target_trials": target, "space": space.to_dict(), "files": files,
        "best_trial": top.number if top else None, "best_value": top.value if top else None,
        "importances": imp,
    }


def finished_count(rows: Iterable[dict]) -> int:
    return sum(1 for r in rows if r["state"] in FINISHED)


def params_text(params: dict) -> str:
    """A trial's parameters in one line: lr=0.003 steps=20."""
    return " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())


def fmt_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_files(files: list[str], subsets: bool, shown: str) -> list[str]:
    """The corpora as absolute paths (folders expanded); one line for the first bad one."""
    from backend.ingest.corpora import expand_paths

    found, errors = expand_paths(files)
    if errors:
        raise errors[0]
    if not found:
        raise CorpusError("no corpus given: name the files to search over (ltm-tui search --space S.yaml FILE...)")
    if subsets and len(found) < 2:
        raise SpaceError(f"{shown}:corpora: subsets need at least two files; {len(found)} given")
    return [str(p) for p in found]

