"""What every command shares: exit codes, the workspace, the service, the run flags, following.

The run flags come as argparse parents, one per concern, so `run`, `attribute`, `search` and
`estimate` take the very same flags (help and checks cannot drift apart), and
`backend.jobs.settings.RunOptions.from_namespace` reads them back whatever the command.
"""

from __future__ import annotations

import argparse
import sys

from backend.core.config import ATTENTION, GRAD_CHECKPOINTING, KERNELS, PRECISIONS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
WEIGHTS_HELP = "weights of overall: depth=2,novelty=0.5 or a YAML/JSON file (default: 1 each)"


def add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", metavar="DIR",
                   help="where runs and ltm.duckdb live (env LTM_WORKSPACE, default ./ltm-workspace)")


# The dashboard's own flags: the file picker's defaults and where it opens (dest, flag, type, metavar, help).
DASHBOARD_FLAGS = (
    ("dash_base", "--base", str, "BASE", "micro (default), an HF id or a folder"),
    ("dash_preset", "--preset", str, "NAME", "micro size (default small)"),
    ("dash_scenes", "--scenes", str, "DIR", "battery folder (default: built-in)"),
    ("dash_steps", "--steps", int, "N", "cap on optimizer steps"),
    ("dash_min_train_tokens", "--min-train-tokens", int, "N", "train on at least this many tokens"),
    ("dash_root", "--root", str, "DIR", "where the file picker opens (default: here)"),
)


def add_dashboard_flags(group, *, below_a_command: bool = False) -> None:
    """The dashboard's flags on the top-level parser, and again on a command that starts
    dashboards (`web`), where they may come after the command's name. There a flag not given
    is left out of the result, so it never hides the same flag given before the command."""
    for dest, flag, kind, metavar, text in DASHBOARD_FLAGS:
        extra = {"default": argparse.SUPPRESS} if below_a_command else {}
        group.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=text, **extra)


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def model_flags() -> argparse.ArgumentParser:
    """Which base, and how it is loaded."""
    p = _parent()
    p.add_argument("--base", default="micro", help="micro (default), a Hugging Face id, or a local model folder")
    p.add_argument("--preset", help="micro size: tiny, small, base, large (default small)")
    p.add_argument("--quant", choices=["4bit"], help="QLoRA: load the HF base in 4-bit nf4")
    p.add_argument("--trust-remote-code", action="store_true", help="let an HF base run its own code")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): bf16 mixed precision on a GPU, fp32 on the CPU")
    p.add_argument("--attn", choices=ATTENTION,
                   help="attention kernel (default auto: flash-attn 2 when installed on a GPU, else SDPA)")
    p.add_argument("--kernels", choices=KERNELS,
                   help="fused Triton kernels on a GPU (pip install -e '.[gpu]'); off where they cannot run")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each decoder layer (a minute of compiling, then faster steps)")
    return p


def training_flags() -> argparse.ArgumentParser:
    """How long and how each run trains (None: the base's defaults, backend/core/config.py)."""
    p = _parent()
    p.add_argument("--steps", type=int, help="cap on optimizer steps (default: from epochs and token floor)")
    p.add_argument("--epochs", type=float, help="passes over each corpus")
    p.add_argument("--min-train-tokens", type=int, help="train on at least this many tokens")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--block-size", type=int, help="tokens per training sequence")
    p.add_argument("--micro-batch", type=int, help="sequences per forward pass")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--grad-checkpointing", choices=GRAD_CHECKPOINTING,
                   help="recompute activations in the backward pass (default auto: when the memory plan "
                        "says the step would not fit the GPU otherwise; off on the CPU)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (HF bases)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (HF bases)")
    return p


def battery_flag(text: str = "battery folder or file (default: the built-in scenes/)") -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--scenes", metavar="DIR", help=text)
    return p


def queue_flags(*, seeds: bool = True) -> argparse.ArgumentParser:
    """How the runs are queued and followed."""
    p = _parent()
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    if seeds:
        p.add_argument("--seeds", type=int, default=1, help="repeats with seeds seed..seed+N-1 (default 1)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0; FIFO within a priority)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def workspace(args):
    from backend.core.workspace import Workspace

    return Workspace.resolve(args.workspace)


def job_settings(args):
    """The batch's settings from the parsed run flags, checked (one line for the first problem)."""
    from backend.jobs.settings import RunOptions

    for flag, value, low, high in (("--seed", getattr(args, "seed", None), 0, 2**32 - 1),
                                   ("--seeds", getattr(args, "seeds", None), 1, None),
                                   ("--priority", getattr(args, "priority", None), -1_000_000, 1_000_000)):
        if value is not None and (value < low or (high is not None and value > high)):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise usage(f"{flag} {value}: give a whole number {span}")
    return RunOptions.from_namespace(args).job_settings()


def usage(message: str):
    from backend.core.errors import LtmError

    return LtmError(message, title="usage")


def ask(args, op: str, direct, **kwargs):
    """Ask the workspace's service, starting it when none runs. The service owns the database:
    read directly, the file would show runs as live that no process moves any more (the service
    settles them when it starts), and a reader holding it keeps a starting service out."""
    from backend.jobs.client import connect
    from backend.jobs.store import Store

    ws = workspace(args)
    if not ws.db_path.exists():
        # no workspace yet: an empty in-memory store still checks the request (e.g. the sort column)
        with Store(":memory:") as store:
            return direct(store)
    with connect(ws) as client:
        return client.call(op, **kwargs)


def scene_results(args, run_ids: list[str]) -> dict:
    return ask(args, "scene_results", lambda st: {r: st.scene_results(r) for r in run_ids}, runs=run_ids)


def follow(ws, run_ids: list[str] | None, *, quiet: bool = False) -> dict[str, str]:
    """Progress bars for these runs until each reaches a terminal state; returns their states.
    Ctrl-C or a dropped terminal only detaches: the jobs go on in the service."""
    from backend.core.errors import LtmError
    from backend.core.states import JobState
    from backend.jobs.client import connect
    from ltm_tui.report import RunProgress

    def ended(status: str) -> bool:
        return JobState(status).is_terminal()

    events = connect(ws)
    stream = events.subscribe()  # subscribe first, then read states: no change falls between
    with connect(ws) as client:
        jobs = client.call("jobs", runs=run_ids)
        trouble = client.call("ping").get("trouble")
    if trouble:  # the queue stands still until it is mended: say so rather than wait in silence
        print(f"ltm-tui: service: {trouble}", file=sys.stderr)
    if run_ids is None:
        jobs = [j for j in jobs if not ended(j["status"])]
        if not jobs:
            print("nothing is queued or running", file=sys.stderr)
    states = {j["run_id"]: j["status"] for j in jobs}
    try:
        with RunProgress(jobs, enabled=not quiet) as progress:
            for job in jobs:
                if job.get("step") and job.get("total"):
                    progress.on_event({"type": "progress", **job})
            while not all(ended(s) for s in states.values()):
                event = next(stream)
                if event.get("type") == "service" and event.get("status") == "stopped":
                    raise LtmError("the service stopped; `ltm-tui status` shows where the jobs are", title="service")
                if event.get("type") == "service" and event.get("status") == "trouble":
                    print(f"ltm-tui: service: {event.get('message')}", file=sys.stderr)
                if event.get("run_id") in states:
                    if event.get("type") == "state" and event.get("requeued"):
                        # a hung worker or a lost node: the run is queued again by itself and
                        # resumes from its newest checkpoint; it is not over
                        print(f"ltm-tui: {event['run_id']} {event['status']} ({event.get('error') or '?'}); "
                              "queued again by itself, it resumes from its newest checkpoint", file=sys.stderr)
                        continue
                    if event.get("type") == "state":
                        states[event["run_id"]] = event["status"]
                    progress.on_event(event)
    except KeyboardInterrupt:
        print(f"\nltm-tui: detached; the jobs go on. Follow them again with: ltm-tui follow --workspace {ws.root}",
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        events.close()
    return states
