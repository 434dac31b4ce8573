"""Where `mira run`'s fixed seconds go: start-up, wrap-up, and a finished run resumed.

Three measurements of `mira run -v` as a user starts it (a new process each time):

1. a whole one-round run of the tiny random model (tests/conftest.py's tiny config: 4 clients,
   2 local steps), from the command to the end of the process;
2. the quickstart (the real model, converted and cached already) up to round 1: from the
   command to the last identity (with its fingerprint) of the second identify exchange, after
   which round 1 begins; the run is then interrupted. Twice: with every fingerprint computed
   (`server.fingerprint_cache = false`, as on a client's first run) and with the clients'
   fingerprints read from their cache (as in every later run on the same data and settings;
   the cache is filled by one untimed run first);
3. `mira run --resume` of the finished tiny run.

With ``--base FOLDER`` (a checkout of another mira, e.g. ``git worktree add /tmp/base
COMMIT``), every measurement is taken of that mira too, run through PYTHONPATH=FOLDER/src in
the same environment, alternating with this one, so that both see the same machine; the tiny
runs of both are compared with ``mira diff --atol 0`` (they must compute the same numbers).
The start-up breakdown is the one this mira records in run.json (``startup``), median over
the tiny runs. Each figure is the median of ``--repeats`` runs.

    .venv/bin/python benchmarks/startup.py --base /tmp/base --out docs/startup.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_raw, write_tiny_tasks  # noqa: E402

MIRA = [sys.executable, "-m", "mira.cli"]
IDENTIFIED = re.compile(r"^  identify[^:]*: (\d+)/(\d+) clients done")
LIMIT = 1800.0  # seconds any one measurement may take
NOTES = "<!-- notes: kept when the tables above are measured again -->"


@dataclass
class Mira:
    """One mira to measure: this checkout, or another through PYTHONPATH."""

    name: str
    src: Path | None  # None: the installed one
    tiny: list[float] = field(default_factory=list)
    to_round_1: list[float] = field(default_factory=list)
    to_round_1_cached: list[float] = field(default_factory=list)
    resume: list[float] = field(default_factory=list)
    startups: list[dict[str, float]] = field(default_factory=list)
    runs: list[Path] = field(default_factory=list)

    def env(self, cache: Path) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MIRA_CACHE": str(cache)}
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.src), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        return env


def timed(
    command: list[str], env: dict[str, str], stop: Callable[[str], bool] | None = None
) -> tuple[float, float | None, str]:
    """Run ``command``; return its seconds to the end of the process, the seconds to the line
    for which ``stop`` held (None: it never did; the process is then interrupted with SIGINT,
    as Ctrl-C does), and its output."""
    started = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    seen, marked = [], None
    for line in proc.stdout:
        seen.append(line)
        if stop is not None and stop(line):
            marked = time.monotonic() - started
            proc.send_signal(signal.SIGINT)
            break
        if time.monotonic() - started > LIMIT:
            proc.kill()
            break
    try:
        rest = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        rest = proc.communicate()[0]
    seconds = time.monotonic() - started
    output = "".join(seen) + (rest or "")
    if stop is None and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    time.sleep(5)  # its watchdog ends what is left of it: not in the next measurement
    return seconds, marked, output


class Identified:
    """True at the line saying the last client of the second identify exchange answered:
    every client process has loaded the model, and round 1 begins."""

    def __init__(self) -> None:
        self.exchanges = 0

    def __call__(self, line: str) -> bool:
        found = IDENTIFIED.match(line)
        if found is not None and found.group(1) == found.group(2):
            self.exchanges += 1
        return self.exchanges == 2


def measure(mira: Mira, work: Path, config: Path, index: int) -> None:
    env = mira.env(work / f"cache-{mira.name}")
    out = work / f"{mira.name}-tiny-{index}"
    seconds, _, _ = timed([*MIRA, "run", str(config), "--out", str(out), "-v"], env)
    mira.tiny.append(seconds)
    mira.runs.append(out)
    info = json.loads((out / "run.json").read_text())
    if "startup" in info:
        mira.startups.append(info["startup"])
    seconds, _, _ = timed([*MIRA, "run", "--resume", str(out)], env)
    mira.resume.append(seconds)


def quickstart_to_round_1(mira: Mira, out: Path, *overrides: str) -> float:
    env = mira.env(Path(os.environ.get("MIRA_CACHE", Path.home() / ".cache" / "mira")))
    settings = [arg for key in overrides for arg in ("--set", key)]
    command = [*MIRA, "run", *settings, "--out", str(out), "-v"]
    _, marked, output = timed(command, env, stop=Identified())
    if marked is None:
        raise RuntimeError(f"the quickstart never reached round 1:\n{output[-3000:]}")
    return marked


def measure_quickstart(mira: Mira, work: Path, index: int) -> None:
    computed = work / f"{mira.name}-quickstart-{index}"
    mira.to_round_1.append(quickstart_to_round_1(mira, computed, "server.fingerprint_cache=false"))
    cached = work / f"{mira.name}-quickstart-cached-{index}"
    mira.to_round_1_cached.append(quickstart_to_round_1(mira, cached))


def largest_difference(first: Path, second: Path) -> str:
    done = subprocess.run(
        [*MIRA, "diff", str(first), str(second), "--atol", "0"], capture_output=True, text=True
    )
    verdict = "0 (identical)" if done.returncode == 0 else "not 0"
    return f"{verdict}: {done.stdout.strip().splitlines()[0] if done.stdout.strip() else ''}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def ratio(now: float | None, base: float | None) -> str:
    return "-" if now is None or not base else f"{now / base:.2f}"


def report(miras: list[Mira], repeats: int, load: tuple[float, float], diff: str) -> str:
    now, base = miras[0], miras[1] if len(miras) > 1 else None
    rows = [
        ("whole one-round tiny run", "tiny"),
        ("quickstart: `mira run` to round 1, fingerprints computed", "to_round_1"),
        (
            "quickstart: `mira run` to round 1, fingerprints from the clients' cache",
            "to_round_1_cached",
        ),
        ("`mira run --resume` of the finished tiny run", "resume"),
    ]
    head = "| what | this mira |" + (" base | ratio (this / base) |" if base else "")
    rule = "| --- | ---: |" + (" ---: | ---: |" if base else "")
    lines = [head, rule]
    for label, key in rows:
        mine = median(getattr(now, key))
        line = f"| {label} | {cell(mine)} |"
        if base is not None:
            theirs = median(getattr(base, key))
            line += f" {cell(theirs)} | {ratio(mine, theirs)} |"
        lines.append(line)
    spare = " | |" if base else ""
    if diff:
        lines.append(f"| `mira diff --atol 0` of the two tiny runs | {diff} |{spare}")
    lines.append(f"| runs of each (median shown) | {repeats} |{spare}")
    lines.append(
        f"| cores, load average before / after (1 min) | {os.cpu_count()} "
        f"({platform.machine()}), {load[0]:.2f} / {load[1]:.2f} |{spare}"
    )
    breakdown = ""
    if now.startups:
        phases = list(now.startups[0])
        breakdown = "\n".join(
            [
                "| phase of the tiny run (run.json `startup`) | seconds (median) |",
                "| --- | ---: |",
                *(
                    f"| {phase} | {statistics.median(s[phase] for s in now.startups):.1f} |"
                    for phase in phases
                ),
            ]
        )
    return "\n".join(lines) + ("\n\n" + breakdown if breakdown else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="a checkout of another mira to compare with")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (median shown)")
    parser.add_argument("--no-quickstart", action="store_true", help="the tiny runs only")
    parser.add_argument("--out", type=Path, help="markdown file to write")
    args = parser.parse_args()
    miras = [Mira("this", None)]
    if args.base is not None:
        miras.append(Mira("base", args.base.resolve() / "src"))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mira-startup-") as tmp:
        work = Path(tmp)
        raw = tiny_raw(write_tiny_tasks(work), work / "unused")
        raw["federation"]["rounds"] = 1
        del raw["model"]["cache_dir"]  # MIRA_CACHE: one cache per mira
        config = work / "tiny.toml"
        config.write_text(tomli_w.dumps(raw))
        for mira in miras:  # build the tiny model once, untimed
            timed(
                [
                    sys.executable,
                    "-c",
                    "import sys; from mira.config import load_config; "
                    "from mira.client.base import prepare_model; "
                    "prepare_model(load_config(sys.argv[1]).model)",
                    str(config),
                ],
                mira.env(work / f"cache-{mira.name}"),
            )
        if not args.no_quickstart:  # fill the clients' fingerprint caches, untimed
            for mira in miras:
                quickstart_to_round_1(mira, work / f"{mira.name}-quickstart-fill")
        for index in range(args.repeats):
            for mira in miras if index % 2 == 0 else miras[::-1]:
                measure(mira, work, config, index)
                if not args.no_quickstart:
                    measure_quickstart(mira, work, index)
                print(f"{mira.name} #{index + 1}: tiny {mira.tiny[-1]:.1f} s", flush=True)
        diff = largest_difference(miras[0].runs[0], miras[1].runs[0]) if len(miras) > 1 else ""
    table = report(miras, args.repeats, (load_before, os.getloadavg()[0]), diff)
    print(table)
    if args.out:
        command = "    .venv/bin/python benchmarks/startup.py" + (
            " --base BASE" if args.base else ""
        )
        command += " --no-quickstart" if args.no_quickstart else ""
        command += f" --repeats {args.repeats} --out {args.out}"
        kept = ""  # what the file says about the figures, below its marker, stays
        if args.out.exists() and NOTES in args.out.read_text():
            kept = "\n" + NOTES + args.out.read_text().split(NOTES, 1)[1]
        args.out.write_text(
            "# Start-up\n\n"
            + __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
            + "\n\nMeasured with (BASE: a checkout of the mira compared with):\n\n"
            + command
            + "\n\n"
            + table
            + "\n"
            + kept
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
