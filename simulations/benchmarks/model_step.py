"""Benchmark: parameters, step time and peak memory of UNet-MoE-Cli.

Runs each configuration in its own process (so peak memory is its own) and
prints a table plus JSON. A benchmark, not a test: it reports what it measured.

    python -m simulations.benchmarks.model_step            # demo patch, CPU widths
    python -m simulations.benchmarks.model_step --full     # + 2x32x192x192 at nnU-Net widths
    python -m simulations.benchmarks.model_step --json out.json

Configurations: the demo patch (16, 64, 64) at 3.0 x 1.5 x 1.5 mm with CPU widths
(8..256) and a realistic patch (32, 192, 192) at 3.0 x 0.7 x 0.7 mm with nnU-Net
widths (32..320); each without and with opacus DP-SGD (functorch per-sample
gradients, noise 1.0, clip 1.0); on CUDA also with mixed precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CONFIGS: dict[str, dict[str, Any]] = {
    "demo": {
        "patch": (16, 64, 64),
        "spacing": (3.0, 1.5, 1.5),
        "base": 8,
        "max": 256,
        "batch": 4,
    },
    "realistic": {
        "patch": (32, 192, 192),
        "spacing": (3.0, 0.7, 0.7),
        "base": 32,
        "max": 320,
        "batch": 2,
    },
}


def measure(
    name: str, *, dp: bool, amp: bool, steps: int, device: str
) -> dict[str, Any]:
    """One configuration in this process: warm-up step, then ``steps`` timed steps."""
    from shared_model.loss import MoELoss
    from shared_model.model import build_model
    from shared_model.model_config import ModelConfig

    spec = CONFIGS[name]
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch_size=spec["patch"],
        spacing=spec["spacing"],
        base_filters=spec["base"],
        max_filters=spec["max"],
    )
    model = build_model(cfg).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    b = spec["batch"]
    image, label, clinical, regimen, pcr = _batch(b, cfg.patch_size, dev)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=1e-3, momentum=0.99, nesterov=True
    )
    net: torch.nn.Module = model
    if dp:
        net, optimizer = _make_private(
            model, optimizer, (image, clinical, regimen), batch_size=b
        )
    loss_fn = MoELoss()
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not dp)

    def step() -> None:
        with torch.autocast(dev.type, enabled=use_amp):
            out = net(image, clinical, regimen)
            loss, _ = loss_fn(out, label, pcr)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    times, peak = _timed_steps(step, steps, dev)
    return {
        "config": name,
        "dp": dp,
        "amp": use_amp,
        "device": str(dev),
        "input": [b, 2, *cfg.patch_size],
        "filters": cfg.filters,
        "parameters": n_params,
        "step_s_min": round(min(times), 4),
        "step_s_mean": round(sum(times) / len(times), 4),
        "peak_mb": round(peak, 1),
        "peak_kind": "cuda max allocated" if dev.type == "cuda" else "process max RSS",
    }


def _batch(
    b: int, patch: tuple[int, int, int], dev: torch.device
) -> tuple[torch.Tensor, ...]:
    """A random batch: image, a centred cube as the label, clinical,
    regimen and pCR."""
    image = torch.randn(b, 2, *patch, device=dev)
    label = torch.zeros(b, 1, *patch, device=dev)
    d, h, w = patch
    label[:, :, d // 4 : 3 * d // 4, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    clinical = torch.zeros(b, 15, device=dev)
    regimen = torch.arange(b, device=dev) % 3
    pcr = (torch.arange(b, device=dev) % 2).float()
    return image, label, clinical, regimen, pcr


def _make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: tuple[torch.Tensor, ...],
    *,
    batch_size: int,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimiser under opacus DP-SGD (functorch per-sample
    gradients, noise 1.0, clip 1.0)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(
        TensorDataset(*(t.cpu() for t in inputs)), batch_size=batch_size
    )
    net, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode="functorch",
    )
    return net, optimizer


def _timed_steps(
    step: Callable[[], None], steps: int, dev: torch.device
) -> tuple[list[float], float]:
    """A warm-up step, then ``steps`` timed ones; their seconds and the peak
    memory in MB (CUDA: allocated since the warm-up; CPU: the process's RSS)."""
    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return times, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="include the realistic patch"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: name,dp,amp
    args = parser.parse_args(argv)

    if args.one:
        name, dp, amp = args.one.split(",")
        result = measure(
            name, dp=dp == "1", amp=amp == "1", steps=args.steps, device=args.device
        )
        print(json.dumps(result))
        return 0

    names = ["demo"] + (["realistic"] if args.full else [])
    runs = [(n, dp, "0") for n in names for dp in ("0", "1")]
    if args.device.startswith("cuda"):
        runs += [(n, "0", "1") for n in names] + [(n, "1", "1") for n in names]
    results: list[dict[str, Any]] = []
    for name, dp, amp in runs:
        r = _measure_in_child(name, dp, amp, args.steps, args.device)
        results.append(r)
        if "error" in r:
            print(f"{name:9s} dp={dp} amp={amp}: FAILED {r['error']}", flush=True)
        else:
            print(
                f"{name:9s} dp={int(r['dp'])} amp={int(r['amp'])} input {r['input']} "
                f"params {r['parameters'] / 1e6:.2f} M  step {r['step_s_min']:.3f} s "
                f"(mean {r['step_s_mean']:.3f})  peak {r['peak_mb']:.0f} MB",
                flush=True,
            )
    _print_dp_ratios(names, results)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


def _measure_in_child(
    name: str, dp: str, amp: str, steps: int, device: str
) -> dict[str, Any]:
    """One configuration measured in its own process (so its peak memory is
    its own); what failed when the process did."""
    cmd = [
        sys.executable,
        "-m",
        "simulations.benchmarks.model_step",
        "--one",
        f"{name},{dp},{amp}",
        "--steps",
        str(steps),
        "--device",
        device,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"config": name, "dp": dp == "1", "amp": amp == "1", "error": tail[0]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _print_dp_ratios(names: list[str], results: list[dict[str, Any]]) -> None:
    """Each configuration's DP step time over its non-DP one."""
    for name in names:
        base = next(
            (
                r
                for r in results
                if r["config"] == name
                and not r["dp"]
                and not r["amp"]
                and "error" not in r
            ),
            None,
        )
        dp_run = next(
            (
                r
                for r in results
                if r["config"] == name and r["dp"] and not r["amp"] and "error" not in r
            ),
            None,
        )
        if base and dp_run:
            print(
                f"{name}: DP step / non-DP step = "
                f"{dp_run['step_s_min'] / base['step_s_min']:.2f}x"
            )


if __name__ == "__main__":
    sys.exit(main())
