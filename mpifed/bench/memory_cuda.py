"""Prepared GPU validation of the memory model, for one CUDA GPU, in about three minutes.

    python -m mpifed.bench.memory_cuda --out runs/memory-cuda            # 8 GiB budget, 4 models
    python -m mpifed.bench.memory_cuda --out DIR --budget 4GiB --models cnn,resnet18

With the budget made binding by the per-process memory fraction, for resnet18, resnet50, vgg11 and
cnn (CIFAR-10 shapes, SGD with momentum and weight decay, float32) it:
  1. computes mpifed's max batch (analytic walk, margin DEFAULT_MARGIN) and the measured model
     (real steps at DEFAULT_PROBES, least squares);
  2. sweeps batch 1, 2, 4, ... up to the max batch, and the max batch: predicted peak (analytic
     walk) against measured (torch.cuda.max_memory_allocated after reset_peak_memory_stats), with
     the linear and the measured models' predictions and the allocator's reserved peak beside;
  3. checks the max batch trains and 1.15x it runs out of memory.
It writes DIR/memory_cuda.md and exits 1 if any |error| of the walk exceeds --tolerance (5%) or a
max-batch check fails; 0 otherwise. Without CUDA it says so, writes that to the file, and exits 2
(nothing measured is not a pass).
"""

from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

import click


def _say(text: str) -> None:
    print(text, flush=True)


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for memory_cuda.md.")
@click.option("--budget", default="8GiB", show_default=True, help="Budget enforced with the memory fraction.")
@click.option("--models", default="resnet18,resnet50,vgg11,cnn", show_default=True)
@click.option("--tolerance", type=float, default=0.05, show_default=True, help="Largest |relative error| allowed.")
def main(out_dir: str, budget: str, models: str, tolerance: float) -> None:
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "memory_cuda.md"
    if not torch.cuda.is_available():
        text = ("# memory model on CUDA: skipped\n\nNo CUDA device is visible to this process, so nothing "
                "was measured. Run this script on a GPU node: `python -m mpifed.bench.memory_cuda --out DIR`.\n")
        report.write_text(text)
        _say("memory_cuda: no CUDA device visible; nothing measured (wrote %s). Run it on a GPU." % report)
        sys.exit(2)  # nothing measured is not a pass
    lines, ok = validate(torch.device("cuda", 0), budget, [m for m in models.split(",") if m], tolerance)
    report.write_text("\n".join(lines) + "\n")
    _say(f"wrote {report}; {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


def validate(device, budget: str, names: list[str], tolerance: float) -> tuple[list[str], bool]:
    import torch

    from mpifed import memory as mem
    from mpifed.bench.memory import trial_fits
    from mpifed.commands.memory import sweep
    from mpifed.models import build_model
    from mpifed.units import format_bytes, parse_bytes

    budget_bytes = parse_bytes(budget)
    props = torch.cuda.get_device_properties(device)
    mib = 2 ** 20
    lines = [
        "# memory model on CUDA: predicted vs measured peak of one training step", "",
        f"GPU {props.name} ({format_bytes(props.total_memory)}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}; budget {format_bytes(budget_bytes)} enforced with "
        f"torch.cuda.set_per_process_memory_fraction; SGD momentum 0.9, weight decay 5e-4; CIFAR-10 shapes; "
        f"float32; margin {mem.DEFAULT_MARGIN:.0%}; tolerance {tolerance:.0%}.", "",
        "predicted = analytic walk at that batch; linear = the fitted analytic model; probe-fit = the measured "
        "model (real steps at " + ",".join(map(str, mem.DEFAULT_PROBES)) + ", least squares); measured = "
        "torch.cuda.max_memory_allocated; reserved = max_memory_reserved. MiB.", "",
    ]
    ok = True
    step = mem.StepSpec()
    overhead = mem.library_overhead_bytes(device)
    lines.append(f"library overhead (cuBLAS/cuBLASLt workspaces held after a step): {overhead / mib:.2f} MiB")
    lines.append("")
    checks = ["", "## max batch checks", "",
              "| model | max batch | seconds to compute | trains | 1.15x | 1.15x fits? |", "|---|---|---|---|---|---|"]
    table = ["| model | batch | predicted | linear | probe-fit | measured | reserved | error % | linear err % "
             "| probe-fit err % |", "|---|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    torch.cuda.set_per_process_memory_fraction(budget_bytes / props.total_memory, device)
    for name in names:
        model = build_model(name, 10)
        shape, classes = (3, 32, 32), 10
        began = time.perf_counter()
        sizing = mem.size_client(model, shape, classes, step, device, budget_bytes, 1, name)
        seconds = time.perf_counter() - began
        probe_fit = mem.measured_memory_model(model, shape, classes, step, device)
        _say(f"[{name}] max batch {sizing.max_batch} ({seconds:.1f} s); analytic {sizing.model}; measured {probe_fit}")
        for b in sweep(sizing.max_batch, cap=sizing.max_batch):
            predicted = mem.analytic_peak(model, shape, classes, step, device, b, overhead).total
            try:
                truth = mem.measured_peak(model, shape, classes, step, device, b)
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                table.append(f"| {name} | {b} | {predicted / mib:.1f} | | | OOM | | | | |")
                _say(f"[{name}] b={b}: OOM below the predicted max batch")
                ok = False
                continue
            err = (predicted - truth.total) / truth.total
            lin_err = (sizing.model.peak(b) - truth.total) / truth.total
            fit_err = (probe_fit.peak(b) - truth.total) / truth.total
            worst = max(worst, abs(err))
            ok &= abs(err) <= tolerance
            table.append(f"| {name} | {b} | {predicted / mib:.1f} | {sizing.model.peak(b) / mib:.1f} | "
                         f"{probe_fit.peak(b) / mib:.1f} | {truth.total / mib:.1f} | {truth.reserved / mib:.1f} | "
                         f"{100 * err:+.2f} | {100 * lin_err:+.2f} | {100 * fit_err:+.2f} |")
            _say(f"[{name}] b={b}: predicted {predicted / mib:.1f} MiB, measured {truth.total / mib:.1f} MiB "
                 f"(fb {truth.forward_backward / mib:.1f}, update {truth.update / mib:.1f}, reserved "
                 f"{truth.reserved / mib:.1f}), error {100 * err:+.2f}%")
        fits = trial_fits(model, shape, classes, step, device, budget_bytes)
        trains = fits(sizing.max_batch)
        over = math.ceil(1.15 * sizing.max_batch)
        over_fits = fits(over)
        ok &= trains and not over_fits
        checks.append(f"| {name} | {sizing.max_batch} | {seconds:.2f} | {'yes' if trains else 'NO (OOM)'} | "
                      f"{over} | {'YES (timid)' if over_fits else 'no (OOM)'} |")
        _say(f"[{name}] max batch {sizing.max_batch} trains: {trains}; 1.15x = {over} fits: {over_fits}")
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    summary = [f"largest |error| of the walk: {100 * worst:.2f}% (target <= {100 * tolerance:.0f}%); "
               f"overall (errors and max-batch checks): {'PASS' if ok else 'FAIL'}", ""]
    return lines + summary + table + checks, ok


if __name__ == "__main__":
    main()
