"""Evaluation after the runs: `compare` two runs scene by scene, `scenes check|weak|import-lmeval`,
and `judge` (a second model grades generations on the scenes' rubrics). docs/measures.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ltm_tui.cli.common import EXIT_FAILED, EXIT_OK, add_workspace, ask, scene_results, workspace


def add_parsers(sub) -> None:
    cmp = sub.add_parser("compare", help="two runs scene by scene: what flipped, and an exact test")
    cmp.add_argument("run_a", metavar="RUN_A")
    cmp.add_argument("run_b", metavar="RUN_B")
    cmp.add_argument("--format", choices=["table", "json"], default="table")
    cmp.set_defaults(handler=cmd_compare)
    add_workspace(cmp)

    sc = sub.add_parser("scenes", help="check a battery folder, list weak scenes, import an lm-eval task")
    sc.set_defaults(handler=cmd_scenes)
    scs = sc.add_subparsers(dest="scenes_command", metavar="ACTION", required=True)
    chk = scs.add_parser("check", help="validate every battery in DIR and count scenes per measure and language")
    chk.add_argument("dir", metavar="DIR")
    chk.add_argument("--format", choices=["table", "json"], default="table")
    add_workspace(chk)  # not used (a battery is checked where it lies): every command takes it
    weak = scs.add_parser("weak", help="scenes with no spread across runs, or at chance in every run")
    weak.add_argument("--format", choices=["table", "json"], default="table")
    add_workspace(weak)
    imp = scs.add_parser("import-lmeval", help="convert an lm-evaluation-harness task (local data) to a battery")
    imp.add_argument("task", metavar="TASK.yaml")
    imp.add_argument("-o", "--output", metavar="FILE", help="write the battery here (default: stdout)")
    imp.add_argument("--metric", help="the measure it feeds (default: the task's name as snake_case)")
    imp.add_argument("--limit", type=int, help="at most this many documents")
    add_workspace(imp)  # not used, as for `scenes check`

    jd = sub.add_parser("judge", help="a second model grades the runs' generations on the scenes' rubrics")
    jd.set_defaults(handler=cmd_judge)
    jd.add_argument("runs", nargs="+", metavar="RUN")
    jd.add_argument("--model", metavar="PATH", help="a local Hugging Face model folder (deterministic yes/no)")
    jd.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    jd.add_argument("--judge-model", metavar="NAME", help="the model name the endpoint serves")
    jd.add_argument("--key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    jd.add_argument("--device", help="device of a local judge (default: cuda when present)")
    jd.add_argument("--format", choices=["table", "json"], default="table")
    add_workspace(jd)


def cmd_compare(args) -> int:
    from backend.core.errors import LtmError
    from backend.scoring.stats import compare_runs

    found = scene_results(args, [args.run_a, args.run_b])
    missing = [run_id for run_id in (args.run_a, args.run_b) if not found.get(run_id)]
    if missing:
        status = {j["run_id"]: j["status"] for j in ask(args, "jobs", lambda st: [], runs=missing)}
        run_id = missing[0]
        if run_id not in status:
            raise LtmError(f"no run {run_id}; `ltm-tui status` lists them", title="compare")
        raise LtmError(f"run {run_id} is {status[run_id]} and has no scene results to compare"
                       f"{' yet' if status[run_id] != 'done' else ''}", title="compare")
    result = {"run_a": args.run_a, "run_b": args.run_b, **compare_runs(found[args.run_a], found[args.run_b])}
    if args.format == "json":
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return EXIT_OK
    print(f"{args.run_a} → {args.run_b}: {result['shared']} scenes in both")
    print(f"  right in both {result['both_right']}, wrong in both {result['both_wrong']}")
    for key, label in (("wrong_to_right", "wrong → right"), ("right_to_wrong", "right → wrong")):
        items = result[key]
        print(f"  {label}: {len(items)}" + (f"  ({', '.join(items[:12])}{' …' if len(items) > 12 else ''})" if items else ""))
    print(f"  exact McNemar p = {result['mcnemar_p']:.4g} (two-sided, on the flipped items)")
    print(f"  scores higher in B {result['scores_better']}, lower {result['scores_worse']}:"
          f" sign test p = {result['sign_test_p']:.4g}")
    return EXIT_OK


def cmd_scenes(args) -> int:
    if args.scenes_command == "check":
        from backend.scoring.scenes import battery_counts, load_batteries

        counts = battery_counts(load_batteries(args.dir))
        if args.format == "json":
            print(json.dumps(counts, ensure_ascii=False, indent=1))
        else:
            from ltm_tui.report import print_battery_counts

            print_battery_counts(counts)
        return EXIT_OK
    if args.scenes_command == "import-lmeval":
        from backend.scoring.scenes import import_lmeval

        text, n = import_lmeval(args.task, metric=args.metric, limit=args.limit)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}: {n} scenes", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return EXIT_OK
    from backend.scoring.stats import weak_scenes

    runs = ask(args, "jobs", lambda st: [])
    done = [r["run_id"] for r in runs if r["status"] == "done"]
    weak = weak_scenes(scene_results(args, done)) if done else []
    if args.format == "json":
        print(json.dumps(weak, ensure_ascii=False, indent=1))
    elif not weak:
        print(f"no weak scenes over {len(done)} finished runs")
    else:
        print(f"{len(weak)} weak scenes over {len(done)} finished runs (baselines included):")
        for w in weak:
            print(f"  {w['battery']}/{w['scene_id']}: {', '.join(w['reasons'])}")
    return EXIT_OK


def cmd_judge(args) -> int:
    report = _judge_in_a_slot(args) if args.model and not args.endpoint else _judge_here(args)
    if args.format == "json":
        print(json.dumps(report, ensure_ascii=False, indent=1))
    for r in report if args.format == "table" else ():
        print(f"{r['run_id']}: {r['graded']} graded by {r['judge']}: {r['yes']} yes, {r['no']} no,"
              f" {r['parse_failures']} unparsed; overall now {r['overall']}")
    return EXIT_OK if report else EXIT_FAILED


def _judge_in_a_slot(args) -> list[dict]:
    """A local judge model is loaded by a worker in one of the service's slots (backend/jobs/tasks.py),
    never beside a run on the same card; the service stores the grades."""
    from backend.jobs.client import run_task

    model = str(Path(args.model).expanduser().absolute())
    say = (lambda s: None) if args.format == "json" else (lambda s: print(f"judge: {s}", file=sys.stderr))
    task = run_task(workspace(args), "judge", say, runs=list(args.runs), model=model, device=args.device)
    for run_id in task.get("skipped") or []:
        print(f"ltm-tui: run {run_id} has no scene results; skipped", file=sys.stderr)
    return task["result"]


def _judge_here(args) -> list[dict]:
    """An endpoint judge runs on another server: this process only sends the prompts. (Given
    neither --model nor --endpoint, make_judge says what to give.)"""
    from backend.compute.judge import judge_rows, make_judge, rescore

    judge = make_judge(model=args.model, endpoint=args.endpoint, judge_model=args.judge_model,
                       key_env=args.key_env, device=args.device)
    found = scene_results(args, args.runs)
    report = []
    for run_id in args.runs:
        rows = found.get(run_id) or []
        if not rows:
            print(f"ltm-tui: run {run_id} has no scene results; skipped", file=sys.stderr)
            continue
        rows, counts = judge_rows(rows, judge)
        scores, overall = rescore(rows)
        ask(args, "rescore", lambda st: st.rescore_run(run_id, rows, scores, overall),
             run_id=run_id, scene_results=rows, scores=scores, overall=overall)
        report.append({"run_id": run_id, "judge": judge.name, "overall": overall, **counts})
    return report
