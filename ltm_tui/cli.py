"""`ltm-tui`: the dashboard with no arguments, the headless commands with one.

Nothing here imports torch: the commands queue work for worker subprocesses and read the
results database. Every failure a user can cause ends in one line on stderr and a non-zero
exit code, never a traceback (set LTM_DEBUG=1 to see one anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace",
        metavar="DIR",
        help="where runs and ltm.duckdb live (env LTM_WORKSPACE, default ./ltm-workspace)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm-tui",
        description="Which of your texts teach a model to think better, and how long it takes.",
    )
    _add_workspace(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train on each file, test, and print the ranked table")
    run.add_argument("files", nargs="+", metavar="FILE", help="corpora: .txt .md .pdf .epub .html, or folders")
    run.add_argument("--base", default="micro", help="micro (default), a Hugging Face id, or a local model folder")
    run.add_argument("--preset", default="small", help="micro size: tiny, small, base, large (default small)")
    run.add_argument("--quant", choices=["4bit"], help="QLoRA: load the HF base in 4-bit nf4")
    run.add_argument("--trust-remote-code", action="store_true", help="let an HF base run its own code")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    run.add_argument("--scenes", metavar="DIR", help="battery folder or file (default: the built-in scenes/)")
    run.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    run.add_argument("--seeds", type=int, default=1, help="repeats with seeds seed..seed+N-1 (default 1)")
    run.add_argument("--steps", type=int, help="cap on optimizer steps (default: from epochs and token floor)")
    run.add_argument("--epochs", type=float, help="passes over each corpus")
    run.add_argument("--min-train-tokens", type=int, help="train on at least this many tokens")
    run.add_argument("--lr", type=float, help="peak learning rate")
    run.add_argument("--block-size", type=int, help="tokens per training sequence")
    run.add_argument("--micro-batch", type=int, help="sequences per forward pass")
    run.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    run.add_argument("--lora-r", type=int, help="LoRA rank (HF bases)")
    run.add_argument("--lora-alpha", type=int, help="LoRA alpha (HF bases)")
    run.add_argument("--format", choices=["table", "json"], default="table", help="final output")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_workspace(run)

    res = sub.add_parser("results", help="the ranked results table")
    res.add_argument("--sort", default="overall", help="column or measure to sort by (default overall)")
    order = res.add_mutually_exclusive_group()
    order.add_argument("--asc", dest="descending", action="store_false", help="ascending")
    order.add_argument("--desc", dest="descending", action="store_true", help="descending (default)")
    res.set_defaults(descending=True)
    res.add_argument("--format", choices=["table", "csv", "json"], default="table")
    _add_workspace(res)

    exp = sub.add_parser("export", help="write the results as CSV")
    exp.add_argument("--csv", default="ltm_results_table.csv", metavar="PATH", help="default ltm_results_table.csv")
    exp.add_argument("--sort", default="overall")
    _add_workspace(exp)

    st = sub.add_parser("status", help="the jobs and their states")
    st.add_argument("--format", choices=["table", "json"], default="table")
    _add_workspace(st)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from backend.errors import LtmError

    try:
        if args.command is None:
            from ltm_tui.app import run_app

            return run_app(args.workspace)
        handler = {"run": cmd_run, "results": cmd_results, "export": cmd_export, "status": cmd_status}
        return handler[args.command](args)
    except LtmError as exc:
        print(f"ltm-tui: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ltm-tui: interrupted; `ltm-tui status` shows what was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("LTM_DEBUG"):
            raise
        print(
            f"ltm-tui: unexpected {type(exc).__name__}: {exc} (set LTM_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _open(args):
    from backend.store import Store
    from backend.workspace import Workspace

    ws = Workspace.resolve(args.workspace)
    return ws, Store(ws.db_path)


def _job_settings(args):
    from backend.config import LORA_DEFAULTS, MICRO_DEFAULTS
    from backend.errors import LtmError
    from backend.jobs import JobSettings
    from backend.workspace import default_scenes_dir

    micro = args.base == "micro"
    if micro and args.preset not in ("tiny", "small", "base", "large"):
        raise LtmError(f"unknown --preset {args.preset!r}; use tiny, small, base or large", title="usage")
    if micro and args.quant:
        raise LtmError("--quant 4bit is for Hugging Face bases; micro trains in full", title="usage")
    scenes = Path(args.scenes).expanduser().resolve() if args.scenes else default_scenes_dir()
    if not scenes.exists():
        raise LtmError(f"{scenes}: no such battery folder; pass --scenes DIR", title="battery")
    from backend.scenes import load_batteries

    load_batteries(scenes)  # a malformed battery stops here, naming file, line and field
    train = (MICRO_DEFAULTS if micro else LORA_DEFAULTS).to_dict()
    flags = {
        "max_steps": args.steps,
        "epochs": args.epochs,
        "min_train_tokens": args.min_train_tokens,
        "lr": args.lr,
        "block_size": args.block_size,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
    }
    train.update({k: v for k, v in flags.items() if v is not None})
    train.pop("seed", None)
    lora = {}
    if not micro:
        from backend.config import LoraSettings

        lora = LoraSettings().to_dict()
        if args.lora_r:
            lora["r"] = args.lora_r
        if args.lora_alpha:
            lora["alpha"] = args.lora_alpha
    base = {
        "base": args.base,
        "preset": args.preset if micro else None,
        "quant": args.quant,
        "trust_remote_code": bool(args.trust_remote_code),
        "device": args.device,
    }
    return JobSettings(base=base, scenes=str(scenes), train=train, lora=lora)


def cmd_run(args) -> int:
    from backend.jobs import JobManager
    from ltm_tui.report import RunProgress, print_ranked

    settings = _job_settings(args)
    ws, store = _open(args)
    with store:
        manager = JobManager(ws, store)
        seeds = range(args.seed, args.seed + max(1, args.seeds))
        submission = manager.submit(args.files, settings, seeds=seeds)
        for err in submission.errors:
            print(f"ltm-tui: {err.one_line()}", file=sys.stderr)
        mine = submission.run_ids + submission.baseline_ids
        if not submission.run_ids:
            print("ltm-tui: no corpus could be read; nothing was queued", file=sys.stderr)
            return EXIT_FAILED
        progress = RunProgress(store, mine, enabled=not args.quiet and args.format == "table")
        with progress:
            manager.run_queue(on_event=progress.on_event)
        rows = [r for r in store.results() if r["run_id"] in mine]
        if args.format == "json":
            print(json.dumps(rows, ensure_ascii=False, indent=1))
        else:
            print_ranked(rows)
            for r in rows:
                if r["status"] != "done":
                    print(f"ltm-tui: {r['run_id']} {r['status']}: {r.get('error')}", file=sys.stderr)
        failed = submission.errors or any(r["status"] != "done" for r in rows)
        return EXIT_FAILED if failed else EXIT_OK


def cmd_results(args) -> int:
    from ltm_tui.report import print_ranked, rows_to_csv

    _, store = _open(args)
    with store:
        try:
            rows = store.results(sort=args.sort, descending=args.descending)
        except ValueError as exc:
            print(f"ltm-tui: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    elif args.format == "csv":
        sys.stdout.write(rows_to_csv(rows))
    else:
        print_ranked(rows, sort=args.sort)
    return EXIT_OK


def cmd_export(args) -> int:
    _, store = _open(args)
    with store:
        try:
            path = store.export_csv(Path(args.csv).expanduser(), sort=args.sort)
        except ValueError as exc:
            print(f"ltm-tui: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            print(f"ltm-tui: cannot write {args.csv}: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILED
    print(f"wrote {path}")
    return EXIT_OK


def cmd_status(args) -> int:
    from ltm_tui.report import print_status

    _, store = _open(args)
    with store:
        runs = store.list_runs()
        jobs = [
            {
                "run_id": r["run_id"],
                "corpus": Path(r["corpus_path"]).name if r.get("corpus_path") else None,
                "kind": r["kind"],
                "status": r["status"],
                "step": r.get("steps"),
                "total": None,
                "pid": None,
                "eta_s": None,
                "error": r.get("error"),
            }
            for r in runs
        ]
    if args.format == "json":
        print(json.dumps(jobs, ensure_ascii=False, indent=1))
    else:
        print_status(jobs)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
