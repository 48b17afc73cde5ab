"""Do two mpifed runs have the same results, bit for bit? Exit 0 if so, 1 (printing every difference) if not.

For a restructure that must not change what a run computes: run the same jobs with the old and the new
code, then compare. Each argument is a run directory, or a folder of run directories paired by name:

    git worktree add /tmp/before <old commit>
    bash analysis/same_results_runs.sh /tmp/before runs/before    # the old code (first on PYTHONPATH)
    bash analysis/same_results_runs.sh .           runs/after     # the same runs, the new code
    python analysis/same_results.py runs/before runs/after        # every run, by name
    python analysis/same_results.py runs/before/topk runs/after/topk
    python analysis/same_results.py runs/before runs/after --added "attrs['data_plane']"   # a new attribute
    python analysis/same_results.py runs/before runs/after --added iter/acc                # a new dataset

Compared: run.h5's datasets (dtype, shape, bytes: NaN matches NaN at the same place), root and /models
attributes; model.pt and every checkpoints/round-*.pt (same names; tensors bitwise, dicts, lists).
Not compared, being measured rather than computed: /iter/t_* (t_iter_pred too: predicted from timings),
/clients/t_* (a pooled client's compute time),
/server/wall, /eval/wall, a checkpoint's 'wall'; /ranks/max_batch of a rank without a memory budget (its
cap then comes from the free memory at start-up: on a CPU MemAvailable or a cgroup's room, which move between
runs), and /ranks/sized_budget and budget_bound (that free memory and what bound it);
/models perf.* (fitted to probe timings) and memory.*.verified_peak (a measured peak, CUDA only); root
attrs 'started' (a time) and 'command' (with paths); in 'job', run.out (where the run was written); in
'resumes', each note's "(date)". Other files (job.toml = the 'job' attr, run.lock, profile.json) are not read.
"""

import argparse
import re
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import torch

MEASURED_DATASETS = re.compile(r"(iter|clients)/t_\w+|server/wall|eval/wall|ranks/sized_budget|ranks/budget_bound")
MEASURED_MODEL_ATTRS = re.compile(r"perf\..*|memory\..*\.verified_peak")
MEASURED_ROOT_ATTRS = {"started", "command"}
MEASURED_CHECKPOINT_KEY = "wall"
RESUME_DATE = re.compile(r" \(\d{4}-\d\d-\d\dT[\d:.]+\)$")  # "resumed at round 10 from round-...pt (2026-...)"


def describe(a: np.ndarray, b: np.ndarray) -> str:
    """Where two arrays part: dtype or shape, else how many values differ and the first of them."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"dtype/shape {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    if a.dtype.kind not in "biufc":
        return f"{a.tolist()!r} vs {b.tolist()!r}"[:400]
    differ = (a != b) & ~(np.isnan(a) & np.isnan(b)) if a.dtype.kind in "fc" else a != b
    where = np.argwhere(np.atleast_1d(differ))
    if where.size == 0:
        return "values equal but bytes differ (signed zero or NaN payload)"
    first = tuple(int(i) for i in where[0]) if a.ndim else ()
    return f"{len(where)} of {a.size} values differ, first at {first}: {a[first].item()!r} vs {b[first].item()!r}"


def compare(where: str, a, b, out: list[str]) -> None:
    """Append where a and b differ: tensors, arrays, floats bitwise; dicts by key, lists in order; else ==."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        a, b = (t.detach().cpu().contiguous() for t in (a, b))
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: tensor {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            out.append(f"{where}: {describe(a.double().numpy(), b.double().numpy())}")
    elif isinstance(a, (np.ndarray, np.generic, float)) and isinstance(b, (np.ndarray, np.generic, float)):
        x, y = np.asarray(a), np.asarray(b)  # object arrays (strings) element by element
        if x.dtype != y.dtype or x.shape != y.shape or (x.tolist() != y.tolist() if x.dtype.kind == "O"
                                                        else x.tobytes() != y.tobytes()):
            out.append(f"{where}: {describe(x, y)}")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key in a and key in b:
                compare(f"{where}[{key!r}]", a[key], b[key], out)
            else:
                out.append(f"{where}[{key!r}]: only in {'second' if key not in a else 'first'}")
    elif isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare(f"{where}[{i}]", x, y, out)
    elif type(a) is not type(b) or a != b:
        out.append(f"{where}: {a!r} vs {b!r}"[:400])


def comparable_attrs(attrs, measured) -> dict:
    """Attributes less measured ones; the job as data less run.out; resume notes less their date."""
    kept = {key: value for key, value in attrs.items() if not measured(key)}
    if "job" in kept:
        kept["job"] = tomllib.loads(kept["job"])
        kept["job"].get("run", {}).pop("out", None)
    if "resumes" in kept:
        kept["resumes"] = [RESUME_DATE.sub("", str(note)) for note in kept["resumes"]]
    return kept


def computed_datasets(f: h5py.File) -> dict:
    """Every dataset of a run log that is not a measurement, by path."""
    found: dict = {}
    f.visititems(lambda name, obj: found.update({name: obj[()]})
                 if isinstance(obj, h5py.Dataset) and not MEASURED_DATASETS.fullmatch(name) else None)
    if "ranks/max_batch" in found:  # -1 where the cap came from the free memory of the moment (no budget)
        found["ranks/max_batch"] = np.where(found["ranks/memory_budget"] > 0, found["ranks/max_batch"], -1)
    return found


def compare_runs(a: Path, b: Path) -> list[str]:
    """Every difference between the results of run directories a and b."""
    out: list[str] = []
    with h5py.File(a / "run.h5", "r") as fa, h5py.File(b / "run.h5", "r") as fb:
        compare("run.h5 attrs", *(comparable_attrs(f.attrs, MEASURED_ROOT_ATTRS.__contains__) for f in (fa, fb)), out)
        compare("run.h5 /models attrs", *(comparable_attrs(f["models"].attrs, MEASURED_MODEL_ATTRS.fullmatch)
                                          for f in (fa, fb)), out)
        compare("run.h5", *(computed_datasets(f) for f in (fa, fb)), out)
    names = [{f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("round-*.pt")} for run in (a, b)]
    if names[0] != names[1]:
        out.append(f"checkpoints: {sorted(names[0])} vs {sorted(names[1])}")
    for name in ["model.pt", *sorted(names[0] & names[1])]:
        if not ((a / name).exists() and (b / name).exists()):
            out.append(f"{name}: missing in {' and '.join(str(run) for run in (a, b) if not (run / name).exists())}")
        elif (a / name).read_bytes() != (b / name).read_bytes():  # torch.save of the same payload: same bytes
            x, y = (torch.load(run / name, map_location="cpu", weights_only=True) for run in (a, b))
            for payload in (x, y) if name != "model.pt" else ():
                payload.pop(MEASURED_CHECKPOINT_KEY, None)
            compare(name, x, y, out)
    return out


def run_pairs(a: Path, b: Path) -> list[tuple[Path, Path]]:
    """(a, b) for two runs; for two folders of runs, the runs of each name found in either."""
    if (a / "run.h5").exists() or (b / "run.h5").exists():
        return [(a, b)]
    names = sorted({p.parent.name for folder in (a, b) for p in folder.glob("*/run.h5")})
    if not names:
        sys.exit(f"neither {a} nor {b} holds a run.h5 or */run.h5")
    return [(a / name, b / name) for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", type=Path, help="a run directory, or a folder of run directories")
    parser.add_argument("second", type=Path, help="the same from the other code")
    parser.add_argument("--added", action="append", default=[], metavar="WHERE",
                        help="a run.h5 attribute (e.g. \"attrs['data_plane']\"), job field (\"attrs['job']['comm']"
                             "['data']\") or dataset (iter/acc) the second code adds: present in the second run "
                             "only, it is listed, not counted as a difference (repeatable)")
    args, failed = parser.parse_args(), 0
    added = {line: where for where in args.added  # an attribute or job field, or a dataset
             for line in (f"run.h5 {where}: only in second", f"run.h5[{where!r}]: only in second")}
    for a, b in run_pairs(args.first, args.second):
        missing = [str(run) for run in (a, b) if not (run / "run.h5").exists()]
        found = [f"no run.h5 in {', '.join(missing)}"] if missing else compare_runs(a, b)
        differences = [line for line in found if line not in added]
        print(f"{a.name}: {f'{len(differences)} difference(s)' if differences else 'identical'}"
              + "".join(f"; added: {added[line]}" for line in found if line in added))
        for line in differences:
            print(f"  {line}")
        failed += bool(differences)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
