"""Every benchmark plus the default study, one after another, figures appended to RESULTS.md.

Each benchmark runs as its own process (``--device`` and ``--quick`` passed on); its ``RESULT`` lines,
its wall time and whether it finished are collected, then the study runs (``bias-circuits study``
with the default config on CUDA; with ``--quick``, a one-context study sized for a CPU smoke run),
and a dated section naming the machine, device and torch version is appended to
``benchmarks/RESULTS.md`` (``--no-record`` prints it only). A benchmark that fails is recorded as
failed with its last error line; the others still run. Exit status 1 when any step failed.

``--budget`` bounds the whole run: each step may use what is left of it, and a step that would
start with under a minute left is recorded as skipped. ``--log`` appends each step's output and
result line to a file as soon as the step ends (then the section), so a run killed from outside
keeps every finished step: on a lent GPU machine, point it into ``$OUT``.

Run: ``python benchmarks/run_all.py --device cuda`` (target: under 8 minutes on one H100-class GPU),
``python benchmarks/run_all.py --quick`` on a CPU. On the ``device`` tool's machine, through
``benchmarks/device_kit.py`` (it brings the packages and the model that machine lacks).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_precision_arguments

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# (step, takes --device) in the order they run: the study is ``bias-circuits study``, the rest scripts
# here; the 10,000-row audit, the longest, comes last
STEPS = (
    ("bench_scale", True),
    ("bench_attribution", True),
    ("bench_patching", True),
    ("bench_candidates", True),
    ("bench_audit", True),
    ("bench_precision", True),
    ("bench_evaluation", True),
    ("bench_refinement", False),
    ("study", True),
    ("bench_audit_rows", True),
)
MIN_STEP_SECONDS = 60
QUICK_STUDY = """\
contexts = ["lending_amount", "commerce_buy"]
variations = 3
names_per_cell = 1
strategies = ["top_k_neurons", "top_k_heads"]
neuron_ks = [20]
head_ks = [3]
refine_top = 10
refine_random = 5
null_draws = 2
n_null = 20
n_bootstrap = 200
utility_texts = 2
answer_nodes = 64
"""


def run_step(name: str, command: list[str], timeout: float, log: Path | None = None) -> dict:
    """Run one step; its RESULT lines, wall seconds, status and last error line (and, with ``log``,
    its whole output appended there at once)."""
    start = time.perf_counter()
    path = os.pathsep.join([str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    try:
        proc = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": path})
        out, err, status = proc.stdout, proc.stderr, "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as timeout_err:
        out, err, status = timeout_err.stdout or "", timeout_err.stderr or "", f"timed out after {timeout:.0f} s"
        out, err = (s.decode() if isinstance(s, bytes) else s for s in (out, err))
    seconds = time.perf_counter() - start
    results = re.findall(r"^RESULT .*$", out, re.MULTILINE)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    last_error = lines[-1] if status != "ok" and lines else ""
    summary = (f"{name}: {status} in {seconds:.0f} s" + "".join(f"\n  {r}" for r in results)
               + (f"\n  {last_error}" if last_error else ""))
    print(summary, flush=True)
    if log is not None:
        with log.open("a") as f:
            f.write(f"### {name}: {' '.join(command)}\n{out}\n--- stderr ---\n{err}\n{summary}\n\n")
    return {"name": name, "status": status, "seconds": seconds, "results": results, "error": last_error}


def section(steps: list[dict], args: argparse.Namespace, total: float) -> str:
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    lines = [
        f"## run_all.py --device {args.device} --dtype {args.dtype} --matmul-precision {args.matmul_precision}"
        f"{' --quick' if args.quick else ''}",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"device {device}, torch {torch.__version__}, load average at the end {os.getloadavg()[0]:.1f}. "
        f"Total wall time {total / 60:.1f} min. "
        f"Command: `python benchmarks/run_all.py {' '.join(sys.argv[1:])}`.",
        "",
        "| step | status | wall s | results |",
        "|---|---|---|---|",
    ]
    for s in steps:
        shown = "; ".join(r.removeprefix("RESULT ") for r in s["results"]) or s["error"].replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {shown} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="each benchmark's small run and a small study")
    add_precision_arguments(parser)  # to every step taking --device (bench_scale: bfloat16 on CUDA by default)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per step (default 900)")
    parser.add_argument("--budget", type=float, default=None, help="seconds allowed for the whole run (default: none)")
    parser.add_argument("--log", type=Path, default=None, help="append each step's output here as it ends")
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it")
    parser.add_argument("--only", nargs="+", metavar="STEP", choices=[name for name, _ in STEPS],
                        help="run only these steps (bench_scale, study, ...)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    start = time.perf_counter()
    steps = []
    with tempfile.TemporaryDirectory(prefix="run-all-study-") as tmp:
        for name, takes_device in STEPS:
            if (args.only and name not in args.only) or (not takes_device and args.device != "cpu"):
                continue  # not asked for, or a CPU-only benchmark
            left = args.timeout if args.budget is None else args.budget - (time.perf_counter() - start)
            if left < MIN_STEP_SECONDS:
                steps.append({"name": name, "status": "skipped (budget)", "seconds": 0.0, "results": [],
                              "error": f"{left:.0f} s of --budget left"})
                print(f"{name}: skipped, {left:.0f} s of the budget left", flush=True)
                continue
            if name == "study":
                command = [sys.executable, "-m", "circuits.study.cli", "study", "--out", f"{tmp}/study",
                           "--no-progress"]
                if args.quick:
                    (Path(tmp) / "quick.toml").write_text(QUICK_STUDY)
                    command += ["--config", f"{tmp}/quick.toml"]
                name = f"study ({'quick' if args.quick else 'default'} config)"
            else:
                command = [sys.executable, f"{name}.py"] + (["--quick"] if args.quick else [])
            precision = ["--dtype", args.dtype, "--matmul-precision", args.matmul_precision]
            command += ["--device", args.device, *precision] if takes_device else []
            steps.append(run_step(name, command, min(args.timeout, left), args.log))
    text = section(steps, args, time.perf_counter() - start)
    print("\n" + text)
    if args.log is not None:
        with args.log.open("a") as f:
            f.write(text)
    if not args.no_record:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return int(any(s["status"] != "ok" for s in steps))


if __name__ == "__main__":
    sys.exit(main())
