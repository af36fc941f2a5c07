"""What every benchmark shares: the machine it ran on, JSON output, memory."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared_model.layout import COHORT_RECORD, PROSPECTIVE, TEST, site_yamls


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """The machine and software a benchmark ran on."""
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import flwr

        info["flwr"] = flwr.__version__
    except ImportError:  # pragma: no cover - flwr is a dependency
        pass
    return info


def benchmark_parser(doc: str | None, name: str, quick: str) -> argparse.ArgumentParser:
    """The options every cohort benchmark takes: --cohort, --out, --quick, --json."""
    parser = argparse.ArgumentParser(description=(doc or name).split("\n")[0])
    parser.add_argument("--cohort", type=Path, help="an existing synthetic cohort")
    parser.add_argument("--out", type=Path, default=Path(f"runs/bench_{name}"))
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--json", type=Path, help=f"write the results here (OUT/{name}.json)"
    )
    return parser


def finish(args: argparse.Namespace, name: str, text: str, result: Any) -> None:
    """Print a benchmark's tables and write its JSON with the machine."""
    print(text)
    write_json(
        args.json or args.out / f"{name}.json", {"machine": machine(), "result": result}
    )


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (making the folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def _status(pid: int) -> dict[str, int]:
    """PPid, VmRSS and VmHWM (kB) of a process from /proc; empty if gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("PPid", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def process_tree(root: int) -> dict[int, dict[str, int]]:
    """``root`` and all its descendants (Linux /proc), with their memory."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _status(int(entry.name))
            if st:
                table[int(entry.name)] = st
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table and pid not in tree:
            tree[pid] = table[pid]
            frontier.extend(p for p, st in table.items() if st.get("PPid") == pid)
    return tree


class MemorySampler:
    """Peak resident memory of a process (default: this one) and all it starts.

    Samples the process tree (Flower's simulation starts Ray's GCS, raylet
    and worker processes as descendants) every ``interval`` seconds and keeps
    the largest sum of resident set sizes, and the largest single process's
    kernel-recorded peak (VmHWM). Shared pages are counted once per process,
    so the sum is an upper estimate of physical memory. Linux only: elsewhere
    both stay ``None``.
    """

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        self.root = os.getpid() if root is None else root
        self.interval = interval
        self.peak_total_mib: float | None = None
        self.peak_process_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        if not Path("/proc/self/status").is_file():
            return
        tree = process_tree(self.root)
        total = sum(st.get("VmRSS", 0) for st in tree.values()) / 1024
        single = max((st.get("VmHWM", 0) for st in tree.values()), default=0) / 1024
        self.peak_total_mib = max(self.peak_total_mib or 0.0, total)
        self.peak_process_mib = max(self.peak_process_mib or 0.0, single)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def prepare_cohort(
    out: Path,
    cohort: Path | None,
    preset: str,
    seed: int,
    echo: Callable[[str], None] = print,
) -> tuple[Path, list[Path], list[Path], list[Path]]:
    """``out/cohort``: a link to ``cohort``, or a ``preset`` cohort made from
    ``seed`` (kept when already there). Returns the folder and its training,
    prospective and test site YAMLs."""
    from simulations.synth import synthesize

    out.mkdir(parents=True, exist_ok=True)
    cohort_dir = out / "cohort"
    if cohort is not None:
        if not cohort_dir.exists():
            cohort_dir.symlink_to(Path(cohort).resolve())
    elif not (cohort_dir / COHORT_RECORD).is_file():
        echo(f"making the {preset} cohort in {cohort_dir} ...")
        synthesize(cohort_dir, preset=preset, seed=seed, force=True)
    return (
        cohort_dir,
        site_yamls(cohort_dir),
        site_yamls(cohort_dir, PROSPECTIVE),
        site_yamls(cohort_dir, TEST),
    )
