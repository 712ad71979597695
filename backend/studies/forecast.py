"""How long a corpus will take, and how much memory, before it is queued. No torch here.

The dashboard's file picker and `ltm-tui run` call `predict` for every corpus they are about
to queue, so this module reads only files:

- the calibration `backend.compute.estimate` measured on this device for this base and these settings
  (`<workspace>/forecast/calib-<key>.json`): tokens/s in the steady state, the first step's
  extra time, peak memory, the time to load the base and to run the batteries, tokens a word;
- the workspace's finished runs (`runs/*/result.json`, the files the results database is fed
  from, read here so that no second process needs the database's single read-write lock),
  summarised once into `forecast/runs-index.json` and fitted as
  train_seconds = fixed + per_token × trained tokens (least squares).

Trained tokens are not corpus tokens: a run trains on max(epochs × corpus tokens, the token
floor) rounded up to whole steps, exactly as `TrainConfig.plan_steps` decides, so a one-page
corpus on `micro` trains as long as a 100-page one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Mapping

from backend.core.config import TrainConfig
from backend.core.devices import SLOT_ENV, nvml_text, visible_cards
from backend.ingest.corpora import WORDS_PER_PAGE

CALIBRATION_VERSION = 1

# Settings that change the speed per token or the memory; training length (epochs, token floor,
# max_steps) does not, and enters through the trained-token count instead.
_KEY_BASE = ("base", "preset", "quant")
_KEY_TRAIN = ("block_size", "micro_batch", "grad_accum")
_KEY_SPEED = ("precision", "attn", "kernels", "compile")

# Tokens a word when nothing was measured yet: bytes of English prose with its space (micro's
# byte tokenizer), and a typical subword tokenizer on English.
_DEFAULT_TOKENS_PER_WORD = {"micro": 6.0, "hf": 1.4}


def _root(workspace) -> Path:
    """A Workspace, or the path of its folder."""
    if isinstance(workspace, (str, os.PathLike)):
        return Path(workspace)
    return Path(workspace.root)


def forecast_dir(workspace) -> Path:
    return _root(workspace) / "forecast"


def _is_micro(base_spec: Mapping[str, Any]) -> bool:
    return (base_spec.get("base") or "micro") == "micro"


def resolved_train(base_spec: Mapping[str, Any], train: Mapping[str, Any] | None) -> TrainConfig:
    from backend.core.config import LORA_DEFAULTS, MICRO_DEFAULTS

    defaults = (MICRO_DEFAULTS if _is_micro(base_spec) else LORA_DEFAULTS).to_dict()
    known = set(defaults)
    return TrainConfig.from_dict({**defaults, **{k: v for k, v in (train or {}).items() if k in known}})


def settings_key(base_spec: Mapping[str, Any], train: Mapping[str, Any] | None) -> str:
    """What a calibration and a run must share to be compared: base, preset, quantisation,
    block size, micro-batch and accumulation (the device is checked separately)."""
    cfg = resolved_train(base_spec, train).to_dict()
    spec = dict(base_spec)
    if _is_micro(spec):
        spec["preset"] = spec.get("preset") or "small"
    else:
        spec["preset"] = None
    spec["quant"] = spec.get("quant") or None
    parts = [str(spec.get(k)) for k in _KEY_BASE] + [str(cfg[k]) for k in _KEY_TRAIN]
    # how the base runs, where it is not the default (so the keys of earlier calibrations stay)
    parts += [f"{k}={spec[k]}" for k in _KEY_SPEED if spec.get(k) not in (None, False, "auto")]
    return "|".join(parts)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _card_asked(base_spec: Mapping[str, Any]) -> int | None:
    """The card a job asks for with `--device cuda:N` (N counts the cards CUDA shows), 0 in a
    worker the service started in a slot (it sees its one card alone, whatever N was), or None:
    any card."""
    wanted = (base_spec.get("device") or "").lower()
    if os.environ.get(SLOT_ENV):
        return 0
    index = wanted.partition(":")[2]
    return int(index) if wanted.startswith("cuda:") and index.isdigit() else None


def _with_cards(read, fallback, entries: list[str] | None = None):
    """read(pynvml, cards) with NVML open, or `fallback` where NVML fails in any way (no
    package, no driver, no card, a card hidden by the environment). The cards are the ones this
    process sees, or those `entries` name (`service_cards`)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return read(pynvml, [handle for _, handle in visible_cards(pynvml, entries)])
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return fallback


def _gpu_name(base_spec: Mapping[str, Any], entries: list[str] | None = None) -> str | None:
    """The NVML name of the card a job would train on (the one it asks for, else the first
    CUDA shows), or None (no NVML, no card, hidden by the environment)."""

    def read(pynvml, cards):
        return nvml_text(pynvml.nvmlDeviceGetName(cards[_card_asked(base_spec) or 0]))

    return _with_cards(read, None, entries)


def device_tag(base_spec: Mapping[str, Any], workspace=None) -> str:
    """The device a job with this spec would train on, named without torch: the NVML GPU name,
    or the CPU model and the cores this process may use. With a workspace, `--device cuda:N`
    counts the cards of its job service (`service_cards`), which runs the job."""
    return _device_tag(base_spec, service_cards(workspace) if workspace is not None else None)


def _device_tag(base_spec: Mapping[str, Any], entries: list[str] | None) -> str:
    wanted = (base_spec.get("device") or "").lower()
    if not wanted.startswith("cpu"):
        gpu = _gpu_name(base_spec, entries)
        if gpu:
            return f"cuda:{gpu}"
    return f"cpu:{_cpu_name()} ×{_cpu_count()}"


def _key_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def calibration_path(workspace, base_spec: Mapping[str, Any], train: Mapping[str, Any] | None) -> Path:
    key = _key_hash(device_tag(base_spec, workspace), settings_key(base_spec, train))
    return forecast_dir(workspace) / f"calib-{key}.json"


def load_calibration(workspace, base_spec, train) -> dict | None:
    path = calibration_path(workspace, base_spec, train)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if data.get("version") == CALIBRATION_VERSION else None


# --- finished runs ------------------------------------------------------------------------


def _summarise(result: Mapping[str, Any]) -> dict | None:
    """What the forecast reads from one run's result.json: adapter runs give training,
    evaluation and load times; a baseline (nothing trained) only its load."""
    settings = result.get("settings") or {}
    kind = result.get("kind")
    if not settings.get("base") or not (kind == "baseline" or (kind == "adapter" and result.get("tokens_seen"))):
        return None
    evaluation = result.get("eval_seconds")
    probes = result.get("probes") if isinstance(result.get("probes"), dict) else {}
    probe_seconds = (probes.get("summary") or {}).get("seconds")
    if evaluation is not None and isinstance(probe_seconds, (int, float)):
        evaluation = float(evaluation) + float(probe_seconds)  # the job's time after training
    return {
        "kind": kind,
        "key": settings_key(settings["base"], settings.get("train")),
        "base": settings["base"],  # what `estimate` forecasts for when no flag chooses (settings_in_use)
        "train": settings.get("train") or {},
        "device": str(result.get("device") or "cpu").split(":")[0],
        "tokens": int(result.get("tokens") or 0),
        "tokens_seen": int(result["tokens_seen"]),
        "train_seconds": float(result.get("train_seconds") or 0.0),
        "eval_seconds": evaluation,
        "load_seconds": result.get("load_seconds"),
        "warm": result.get("warm"),  # None in runs from before it was recorded
        "oom_halvings": int(result.get("oom_halvings") or 0),
    }


SUMMARY_VERSION = 3  # in each index entry's stamp: a summary of an older shape is read again


def finished_runs(workspace) -> list[dict]:
    """One summary per finished adapter run in the workspace. result.json files are parsed once
    and remembered in forecast/runs-index.json by size and mtime (a picker over 1000 runs
    reads 1000 stats, not 1000 JSON files)."""
    root = _root(workspace)
    index_path = forecast_dir(root) / "runs-index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    fresh: dict[str, Any] = {}
    changed = False
    runs_dir = root / "runs"
    for path in sorted(runs_dir.glob("*/result.json")) if runs_dir.is_dir() else []:
        try:
            st = path.stat()
        except OSError:
            continue
        stamp = [SUMMARY_VERSION, st.st_size, st.st_mtime_ns]
        old = index.get(path.parent.name)
        if old and old.get("stamp") == stamp:
            fresh[path.parent.name] = old
            continue
        try:
            summary = _summarise(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # a file being replaced right now is read next time
        fresh[path.parent.name] = {"stamp": stamp, "run": summary}
        changed = True
    if changed or set(fresh) != set(index):
        try:
            # written by a client too (`run`'s forecast), whose umask is the user's: private as
            # the service's own files are, so the runs' times stay the user's
            from backend.core.workspace import folder_mode, shared_workspace

            index_path.parent.mkdir(mode=folder_mode(), parents=True, exist_ok=True)
            tmp = index_path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640 if shared_workspace() else 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(fresh))
            tmp.replace(index_path)
        except OSError:
            pass  # a read-only workspace still forecasts, it only re-reads next time
    return [v["run"] for _, v in sorted(fresh.items()) if v.get("run")]


def settings_in_use(workspace) -> list[dict]:
    """The settings of the workspace's finished adapter runs, grouped as the forecast compares
    them (`settings_key`): [{"base", "train", "runs"}],
    the most common base and preset first, and within it the most common training shape. A
    group's `train` is the one most of its runs had (training length included), so a forecast
    for it plans as many steps as those runs trained."""
    from collections import Counter

    runs = [r for r in finished_runs(workspace)
            if r.get("kind") == "adapter" and r.get("base")]
    per_base = Counter(_base_key(r["base"]) for r in runs)
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["key"], []).append(r)
    ranked = []
    for members in groups.values():
        by_train = Counter(json.dumps(r["train"], sort_keys=True) for r in members)
        common = by_train.most_common(1)[0][0]
        first = next(r for r in members if json.dumps(r["train"], sort_keys=True) == common)
        ranked.append(((per_base[_base_key(first["base"])], len(members)),
                       {"base": first["base"], "train": first["train"], "runs": len(members)}))
    ranked.sort(key=lambda item: item[0], reverse=True)
    return [group for _, group in ranked]


def _base_key(base_spec: Mapping[str, Any]) -> str:
    """Base, preset and quantisation: the part of `settings_key` a person names first."""
    return "|".join(settings_key(base_spec, None).split("|")[: len(_KEY_BASE)])


def fit_fixed_per_token(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = fixed + per_token × x; None unless the x spread says something (the
    largest x at least 10% above the smallest) and the slope is positive."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if max(xs) < 1.1 * min(xs):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if slope <= 0:
        return None
    return max(0.0, my - slope * mx), slope


# --- the forecast --------------------------------------------------------------------------


def trained_tokens(base_spec, train, tokens: int, block_size: int | None = None) -> tuple[int, int]:
    """(optimizer steps, tokens trained) for a corpus of `tokens`, as the recipe plans them."""
    cfg = resolved_train(base_spec, train)
    block = max(1, min(block_size or cfg.block_size, cfg.block_size, max(1, tokens)))
    steps = cfg.plan_steps(max(1, tokens), block)
    return steps, steps * cfg.micro_batch * cfg.grad_accum * block


def tokens_per_word(workspace, base_spec, train) -> tuple[float, str]:
    """Measured tokens per word of this base's tokenizer (from the calibration), or a default."""
    calib = load_calibration(workspace, base_spec, train)
    if calib and calib.get("tokens_per_word"):
        return float(calib["tokens_per_word"]), calib.get("tokens_per_word_source", "calibration")
    kind = "micro" if _is_micro(base_spec) else "hf"
    return _DEFAULT_TOKENS_PER_WORD[kind], "default"


def tokens_for_pages(workspace, base_spec, train, pages: float) -> int:
    per_word, _ = tokens_per_word(workspace, base_spec, train)
    return int(round(pages * WORDS_PER_PAGE * per_word))


WARM_LOAD_SECONDS = 0.1  # in runs that do not record `warm`: a load below this was a warm worker's


def predict(workspace, base_spec: dict, train: dict, tokens: int) -> dict | None:
    """Seconds and peak memory for one job on a corpus of `tokens` tokens, or None when neither
    a calibration nor a finished run with these settings is known.

    Keys: train_seconds, eval_seconds, load_seconds, tokenize_seconds, total_seconds,
    peak_memory_bytes (None without a calibration), trained_tokens, steps, source
    ("calibration", "runs" or "calibration+runs"), runs (how many were fitted), and
    per_token_seconds / fixed_seconds of the training-time model used.
    """
    calib = load_calibration(workspace, base_spec, train)
    key = settings_key(base_spec, train)
    kind = "cpu" if device_tag(base_spec).startswith("cpu") else "cuda"
    alike = [r for r in finished_runs(workspace) if r["key"] == key and r["device"] == kind]
    runs = [r for r in alike if r.get("kind") == "adapter"]
    if calib is None and not runs:
        return None
    steps, seen = trained_tokens(base_spec, train, tokens, (calib or {}).get("block_size"))

    sources = []
    fixed = per_token = None
    if calib:
        sources.append("calibration")
        per_token = 1.0 / float(calib["tokens_per_s"])
        fixed = float(calib.get("warmup_seconds") or 0.0)
    if runs:
        sources.append("runs")
        points = [(float(r["tokens_seen"]), float(r["train_seconds"])) for r in runs]
        fit = fit_fixed_per_token(points)
        if fit is not None:
            fixed, per_token = fit
        elif per_token is not None:
            # Every run trained about as long: the calibration gives the slope, the runs the level.
            fixed = max(0.0, statistics.fmean(y - per_token * x for x, y in points))
        else:
            per_token = sum(y for _, y in points) / sum(x for x, _ in points)
            fixed = 0.0
    train_seconds = fixed + per_token * seen

    def measured(name: str, among=runs) -> float:
        values = [float(r[name]) for r in among if r.get(name) is not None]
        if values:
            return statistics.median(values)
        return float((calib or {}).get(name) or 0.0)

    # A job that a warm worker ran after another found the imports done and an HF base loaded
    # (its load is about 0.01 s); the forecast is for a corpus on its own, so it counts the load
    # of a worker's first job. Runs from before `warm` was recorded: a load under 0.1 s was warm.
    # A baseline is usually a worker's first job: its load counts too.
    cold = [r for r in alike if r.get("warm") is False
            or (r.get("warm") is None and float(r.get("load_seconds") or 0.0) >= WARM_LOAD_SECONDS)]
    load_seconds = measured("load_seconds", cold)
    eval_seconds = measured("eval_seconds")
    tok_rate = (calib or {}).get("tokenize_tokens_per_s")
    tokenize_seconds = tokens / float(tok_rate) if tok_rate else 0.0
    total = load_seconds + tokenize_seconds + train_seconds + eval_seconds
    return {
        "tokens": int(tokens),
        "trained_tokens": int(seen),
        "steps": int(steps),
        "load_seconds": round(load_seconds, 2),
        "tokenize_seconds": round(tokenize_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "total_seconds": round(total, 2),
        "peak_memory_bytes": (calib or {}).get("peak_memory_bytes"),
        "source": "+".join(sources),
        "runs": len(runs),
        "fixed_seconds": round(fixed, 3),
        "per_token_seconds": per_token,
    }


# --- memory ---------------------------------------------------------------------------------


def free_memory(base_spec: Mapping[str, Any], workspace=None) -> tuple[int | None, str]:
    """(free bytes, where) on the device a job would use: NVML on a GPU, else available RAM.

    On a GPU, the card the job asks for (`--device cuda:N`), or for a job that may go to any
    card, the one with the least memory free: the queue starts such a job in the first free
    slot, whichever card that is, so it must fit on each. With a workspace whose job service
    runs, the cards are the service's (`service_view`), and memory held by its workers counts
    as free: the queue runs one job a slot, so a warm worker gives its memory up to the next job
    rather than sharing the card with it. Only processes NVML lists on that card count. A job
    that asks for a card NVML cannot read gets (None, "GPU"): unknown, not the host's RAM."""
    asks_cuda = (base_spec.get("device") or "").lower().startswith("cuda")
    pids, entries = service_view(workspace) if workspace is not None else ([], None)
    if asks_cuda or not _device_tag(base_spec, entries).startswith("cpu"):
        mine = set(pids)

        def read(pynvml, cards):
            asked = _card_asked(base_spec)
            free = []
            for card in cards if asked is None else [cards[asked]]:
                held = pynvml.nvmlDeviceGetComputeRunningProcesses(card) if mine else []
                free.append(int(pynvml.nvmlDeviceGetMemoryInfo(card).free)
                            + sum(int(p.usedGpuMemory or 0) for p in held if p.pid in mine))
            return min(free), "GPU"

        return _with_cards(read, (None, "GPU"), entries)
    try:
        import psutil

        return int(psutil.virtual_memory().available), "RAM"
    except Exception:
        return None, "RAM"


def service_view(workspace, *, workers: bool = True) -> tuple[list[int], list[str] | None]:
    """(the pids of this workspace's running workers, the cards its job service schedules on)
    from the service if one runs (none is started for this); ([], None) where none answers.

    The pids are what `free_memory` may count as free (asked only with `workers`). The cards
    are the service's own CUDA_VISIBLE_DEVICES entries, the ones `--device cuda:N` counts and
    its workers get: a shell that sees other cards (another CUDA_VISIBLE_DEVICES) would
    otherwise check the wrong card. None also in a worker (it sees its slot's card alone), from
    a service with no card (the CPU, Ray's nodes) and from one too old to say."""
    from backend.core.errors import LtmError
    from backend.core.workspace import Workspace
    from backend.jobs.client import try_connect

    in_worker = bool(os.environ.get(SLOT_ENV))
    if in_worker and not workers:
        return [], None  # nothing to ask
    try:
        client = try_connect(workspace if isinstance(workspace, Workspace) else Workspace(_root(workspace)))
        if client is None:
            return [], None
        with client:
            pids = [int(w["pid"]) for w in client.call("workers")] if workers else []
            try:
                cards = None if in_worker else client.call("cards")
            except LtmError:  # a service from before the `cards` request
                cards = None
    except (LtmError, OSError, KeyError, TypeError, ValueError):
        return [], None
    usable = isinstance(cards, list) and cards and all(isinstance(c, str) for c in cards)
    return pids, cards if usable else None


def service_cards(workspace) -> list[str] | None:
    return service_view(workspace, workers=False)[1]


def memory_fix(
    peak_bytes: int | None, free_bytes: int | None, base_spec: Mapping[str, Any], train: Mapping[str, Any] | None,
    where: str = "memory",
) -> str | None:
    """One line when the predicted peak does not fit in what is free, naming the fix; else None.
    On a card, where the worker fits the step to the memory it finds (`--grad-checkpointing
    auto`), a job fits if its smallest step does (`least_peak_bytes`): the predicted peak is
    what the calibration's step took when it filled the card, not what the job needs."""
    if not peak_bytes or free_bytes is None or peak_bytes <= free_bytes:
        return None
    cfg = resolved_train(base_spec, train)
    if where == "GPU" and cfg.grad_checkpointing == "auto":
        least = least_peak_bytes(base_spec, train)
        if least is not None and least <= free_bytes:
            return None
    fixes = []
    if not _is_micro(base_spec) and (base_spec.get("quant") or None) is None:
        fixes.append("--quant 4bit (QLoRA: the base in 4 bits)")
    if cfg.micro_batch > 1:
        # Activation memory scales with the micro-batch; keep the effective batch by accumulation.
        half = max(1, cfg.micro_batch // 2)
        fixes.append(
            f"--micro-batch {half} --grad-accum {cfg.grad_accum * (cfg.micro_batch // half)} "
            "(same effective batch)"
        )
    if _is_micro(base_spec):
        fixes.append("a smaller --preset")
    return (
        f"predicted peak {format_bytes(peak_bytes)} exceeds the {format_bytes(free_bytes)} of {where} "
        f"free: use {' or '.join(fixes) or 'a smaller base'}"
    )


def least_peak_bytes(base_spec: Mapping[str, Any], train: Mapping[str, Any] | None) -> int | None:
    """The memory plan's peak for the smallest step the worker can fit a Hugging Face base to on
    a card (micro-batch 1, checkpointed, the LoRA defaults), from the base's config.json; None
    for micro or where the config is not on this host."""
    from backend.core.errors import LtmError
    from backend.core.workspace import model_folder
    from backend.studies import memory_plan

    if _is_micro(base_spec):
        return None
    folder = model_folder(str(base_spec.get("base")))
    try:
        config = memory_plan.read_config(folder) if folder is not None else None
    except LtmError:
        return None
    if config is None:
        return None
    cfg = resolved_train(base_spec, train)
    block = min(cfg.block_size, int(config.get("max_position_embeddings") or cfg.block_size))
    return memory_plan.plan(config, quant=base_spec.get("quant") or None, micro_batch=1, block_size=block,
                            grad_checkpointing=True, device="cuda", packed_documents=True).peak


def format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def format_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(int(round(s / 60)), 60)
    return f"{h} h {m:02d} min"
