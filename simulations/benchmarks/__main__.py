"""Run the benchmark suite: ``python -m simulations.benchmarks [--quick]``.

Each benchmark runs in its own process and writes ``OUT/<name>.json``; the
GPU benchmark runs only where CUDA is available and is reported as skipped
otherwise. ``--quick`` (what ``make bench`` runs) uses the tiny cohort and
small widths: minutes on a laptop, numbers that show the machinery works, not
the numbers in ``docs/benchmarks.md``. Without ``--quick`` each benchmark runs
its full version on the demo cohort (``--cohort``; without it one is made
under ``OUT/cohort`` and shared by every benchmark): about
2 h 20 min on two CPU cores (an hour of it the three DP-SGD runs, 20 min the
deployed rounds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shared_model.layout import COHORT_RECORD
from simulations.benchmarks.common import machine, write_json


def commands(quick: bool, cohort: Path | None, out: Path) -> dict[str, list[str]]:
    """Benchmark name -> the command line that runs it."""
    co = [] if cohort is None else ["--cohort", str(cohort)]
    q = ["--quick"] if quick else []
    runs = {
        "quality": ["quality", *q, *co, "--out", str(out / "quality")],
        "overhead": ["overhead", *q, *co, "--out", str(out / "overhead")],
        "deployed": ["deployed", *q, *co, "--out", str(out / "deployed")],
        "privacy_step": [
            "privacy",
            "step",
            *(["--steps", "4", "--repeats", "1"] if quick else []),
        ],
        "privacy_auc": [
            "privacy",
            "auc",
            *(["--quick", "--epsilons", "8"] if quick else []),
            *co,
            "--out",
            str(out / "privacy"),
        ],
        "dp_heads": [
            "dp_heads",
            *(["--quick", "--epsilons", "8"] if quick else []),
            *co,
            "--out",
            str(out / "dp_heads"),
        ],
        "scale": ["scale", *q, *co, "--out", str(out / "scale")],
        "hostile": ["hostile", "--quick", "--out", str(out / "hostile")],
        "secure": ["secure", *q, *co, "--out", str(out / "secure")],
        "model_step": ["model_step"],
    }
    return {
        name: [sys.executable, "-m", f"simulations.benchmarks.{args[0]}", *args[1:]]
        for name, args in runs.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny cohort, minutes")
    parser.add_argument("--cohort", type=Path, help="an existing demo cohort")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument(
        "--only", nargs="*", help="run only these (quality, overhead, ...)"
    )
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    names = [*commands(args.quick, None, args.out), "gpu"]
    unknown = set(args.only or []) - set(names)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {names}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cohort is None:  # one cohort for every benchmark
        from simulations.synth import synthesize

        args.cohort = args.out / "cohort"
        if not (args.cohort / COHORT_RECORD).is_file():
            preset = "tiny" if args.quick else "demo"
            print(f"making the {preset} cohort in {args.cohort} ...", flush=True)
            synthesize(args.cohort, preset=preset, seed=0, force=True)
    todo = commands(args.quick, args.cohort, args.out)
    if cuda:
        todo["gpu"] = [
            sys.executable,
            "-m",
            "simulations.benchmarks.model_step",
            "--full",
            "--steps",
            "3" if args.quick else "5",
        ]
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only}
    summary: dict[str, object] = {"machine": machine(), "quick": args.quick}
    if not cuda:
        summary["gpu"] = "skipped: no CUDA device"
        print("gpu: skipped (no CUDA device)")
    failed = []
    for name, cmd in todo.items():
        path = args.out / f"{name}.json"
        print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([*cmd, "--json", str(path)])
        seconds = round(time.perf_counter() - t0, 1)
        summary[name] = {"exit": code, "seconds": seconds, "json": str(path)}
        if code:
            failed.append(name)
        print(f"== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds} s")
    write_json(args.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1))
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
