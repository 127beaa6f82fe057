"""Regenerate the stored benchmark results: every JSON in benchmarks/results/ that docs/results.md
quotes, each by its own script, one process at a time, with the flags that produced it.

    python benchmarks/run_all.py --list              # the jobs, their flags and quick flags
    python benchmarks/run_all.py                     # every stored result (hours on 2 cores)
    python benchmarks/run_all.py --only throughput_2d --only quality_targets   # a job, or a script's jobs
    python benchmarks/run_all.py --quick             # each script's small flags, into results/quick/
    python benchmarks/run_all.py --dry-run           # print the commands only

A job is named after the JSON it writes (results/<name>.json). --quick passes each script's own
quick flags (fewer rounds, repeats, seeds or epochs) and sends the results to
benchmarks/results/quick/ (git-ignored, through UNET_BENCH_RESULTS), so a smoke run never replaces
a stored figure; a script without a quick mode is skipped, and says so. --all adds the scripts
whose results are not stored (data_prep, distributed_modes, region_heads, launch_overhead,
slurm_overhead): their JSON must then be quoted in docs/results.md, or deleted. benchmark_step
compares with an older checkout and runs only with --old-checkout DIR. UNET_BENCH_LOCK works as for
every script (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
QUICK_RESULTS = RESULTS / "quick"


@dataclass(frozen=True)
class Job:
    name: str                         # writes results/<name>.json
    script: str                       # benchmarks/<script>.py
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] | None = None  # the full flags for --quick; None: the script has no quick mode
    stored: bool = True               # its JSON is kept in benchmarks/results/ and quoted by docs/results.md
    needs_slices: bool = False        # reads the 2D default (data/prepared/brats-default) without making it

    def output(self, quick: bool) -> str:
        if quick and self.script == "quality_targets":
            return f"quality_quick_{self.name.removeprefix('quality_')}"
        return self.name


def _quality(tag: str, *flags: str) -> Job:
    """A quality_targets.py job; --quick trains 1 seed for 1 epoch under a tag of its own, so that
    its runs are never reused as (or reuse) the full recipe's (runs/quality/<tag>_*)."""
    quick = _replace(_replace(flags, "--seeds", "1"), "--epochs", "1")
    return Job(f"quality_{tag}", "quality_targets", ("--tag", tag, *flags), ("--tag", f"quick_{tag}", *quick))


def _replace(flags: tuple[str, ...], option: str, value: str) -> tuple[str, ...]:
    """``flags`` with ``option``'s value set to ``value`` (appended when absent)."""
    out = list(flags)
    if option in out:
        out[out.index(option) + 1] = value
    else:
        out += [option, value]
    return tuple(out)


FP32, BF16 = ("--set", "train.precision=fp32"), ("--set", "train.precision=bf16")
JOBS: tuple[Job, ...] = (
    # training speed and memory (throughput.py makes the synthetic default data it needs)
    Job("throughput_2d", "throughput", ("--models", "2d", "--avx2", "--rounds", "2", "--out", "throughput_2d"),
        ("--models", "2d", "--avx2", "--rounds", "1", "--out", "throughput_2d")),
    Job("throughput_3d", "throughput", ("--models", "3d", "--rounds", "2", "--out", "throughput_3d"),
        ("--models", "3d", "--rounds", "1", "--out", "throughput_3d")),
    Job("onednn_primitives", "onednn_primitives", ("--models", "2d,3d", "--rounds", "2"),
        ("--models", "2d,3d", "--rounds", "1")),
    Job("batch_norm_kernels", "batch_norm_kernels", ("--rounds", "2"), ("--rounds", "1")),
    # inference speed
    Job("inference_engines_2d_recheck", "inference_engines",
        ("--dims", "2d", "--repeats", "2", "--avx2", "--out", "inference_engines_2d_recheck"),
        ("--dims", "2d", "--repeats", "1", "--steps", "1", "--avx2", "--out", "inference_engines_2d_recheck")),
    Job("inference_engines", "inference_engines", ("--dims", "3d", "--repeats", "2", "--avx2", "--out",
                                                   "inference_engines"),
        ("--dims", "3d", "--repeats", "1", "--avx2", "--out", "inference_engines")),
    # held-out quality (each trains and evaluates through the CLI; finished runs are reused)
    _quality("norm_fp32_2d", "--model", "2d", "--seeds", "1,2", "--isas", "native", *FP32),
    _quality("norm_bf16_2d", "--model", "2d", "--seeds", "1,2", "--isas", "native", *BF16),
    _quality("norm_avx2_2d", "--model", "2d", "--seeds", "1,2", "--isas", "avx2", *FP32),
    _quality("modes2d", "--model", "2d", "--seeds", "1,2,3", "--isas", "native", "--modes", "single,horovod,ps",
             *FP32),
    _quality("regions2d_e10_norm", "--model", "2d", "--seeds", "1,2", "--isas", "native", "--regions", "wt,tc,et",
             "--epochs", "10"),
    _quality("bn4d_fp32_3d", "--model", "3d", "--seeds", "1,2", "--isas", "native", *FP32),
    _quality("bn4d_bf16_3d", "--model", "3d", "--seeds", "1,2", "--isas", "native", *BF16),
    _quality("bn4d_avx2_3d", "--model", "3d", "--seeds", "1,2", "--isas", "avx2", *FP32),
    _quality("regions3d", "--model", "3d", "--seeds", "1,2", "--isas", "native,avx2", "--regions", "wt,tc,et"),
    _quality("hard_3d_e10x80", "--model", "3d", "--difficulty", "hard", "--regions", "wt,tc,et", "--steps", "80",
             "--seeds", "1,2", "--isas", "native"),
    _quality("hard_2d", "--model", "2d", "--difficulty", "hard", "--regions", "wt,tc,et", "--epochs", "10",
             "--seeds", "1,2", "--isas", "native"),
    _quality("hard_3d_e10x80_avx2", "--model", "3d", "--difficulty", "hard", "--regions", "wt,tc,et", "--steps",
             "80", "--seeds", "1,2", "--isas", "avx2"),
    _quality("hard_2d_avx2", "--model", "2d", "--difficulty", "hard", "--regions", "wt,tc,et", "--epochs", "10",
             "--seeds", "1,2", "--isas", "avx2"),
    _quality("hard_2d_k2", "--model", "2d", "--difficulty", "hard", "--regions", "wt,tc,et", "--epochs", "10",
             "--seeds", "1,2", "--isas", "native", "--set", "model.context_slices_2d=2"),
    _quality("hard_2d_k4", "--model", "2d", "--difficulty", "hard", "--regions", "wt,tc,et", "--epochs", "10",
             "--seeds", "1,2", "--isas", "native", "--set", "model.context_slices_2d=4"),
    _quality("hard_2d_k4s2", "--model", "2d", "--difficulty", "hard", "--regions", "wt,tc,et", "--epochs", "10",
             "--seeds", "1,2", "--isas", "native", "--set", "model.context_slices_2d=4", "--set",
             "model.context_stride_2d=2"),
    # whether validation's threshold choice holds on held-out cases (the 3D runs above must exist)
    Job("threshold_curves_hard_3d", "threshold_curves", ("--runs", "hard_3d_e10x80_single_native_s1,"
                                                         "hard_3d_e10x80_single_native_s2", "--out",
                                                         "threshold_curves_hard_3d")),
    # fault tolerance; the real step against the old benchmark
    Job("resilience", "resilience", ("--rounds", "1"), ("--rounds", "1"), needs_slices=True),
    Job("plan_fit", "plan_accuracy", ("--fit", "--steps", "4"), ("--fit", "--quick")),
    Job("plan_accuracy", "plan_accuracy", (), ("--quick",)),
    Job("network_constants", "network_constants"),
    Job("benchmark_step", "benchmark_step", ("--rounds", "1"), ("--rounds", "1"), needs_slices=True),
    # not stored (run with --all or --only)
    Job("data_prep", "data_prep", stored=False),
    Job("distributed_modes", "distributed_modes", stored=False, needs_slices=True),
    Job("region_heads", "region_heads", ("--rounds", "2"), ("--rounds", "1"), stored=False, needs_slices=True),
    Job("launch_overhead", "launch_overhead", stored=False, needs_slices=True),
    Job("slurm_overhead", "slurm_overhead", stored=False),
)


def select(jobs: tuple[Job, ...], only: list[str] | None, everything: bool) -> list[Job]:
    """The jobs to run: --only names (a job, or a script's every job), else the stored ones (--all:
    every job), in JOBS order."""
    if not only:
        return [job for job in jobs if job.stored or everything]
    known = {job.name for job in jobs} | {job.script for job in jobs}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SystemExit(f"run_all: unknown job {unknown[0]!r}; --list shows the jobs")
    return [job for job in jobs if job.name in only or job.script in only]


def command(job: Job, quick: bool, old_checkout: Path | None) -> list[str] | None:
    """The job's argv, or None when it cannot run in this mode (the reason is printed by main)."""
    args = job.quick if quick else job.args
    if args is None:
        return None
    if job.script == "benchmark_step":
        if old_checkout is None:
            return None
        args = ("--old-checkout", str(old_checkout), *args)
    return [sys.executable, str(BENCH / f"{job.script}.py"), *args]


def why_skipped(job: Job, quick: bool) -> str:
    if quick and job.quick is None:
        return f"{job.script}.py has no quick mode"
    return "needs --old-checkout DIR: a checkout of the commit before the one-loop refactor, e.g. " \
           "git worktree add /tmp/old 9e23545"


def show(jobs: tuple[Job, ...]) -> None:
    for job in jobs:
        where = "stored" if job.stored else "not stored (--all / --only)"
        print(f"{job.name}  [{where}]")
        old = "--old-checkout DIR " if job.script == "benchmark_step" else ""
        print(f"    python benchmarks/{job.script}.py {old}{' '.join(job.args)}".rstrip())
        quick = "no quick mode: skipped" if job.quick is None else f"{' '.join(job.quick)}"
        print(f"    --quick: {quick}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the jobs and stop")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run this job (its JSON name) or every job of this script; repeatable")
    parser.add_argument("--all", action="store_true", help="also the scripts whose results are not stored")
    parser.add_argument("--quick", action="store_true",
                        help="each script's quick flags, results into benchmarks/results/quick/")
    parser.add_argument("--old-checkout", type=Path, default=None, help="for benchmark_step (see its docstring)")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining jobs after a failure")
    parser.add_argument("--dry-run", action="store_true", help="print each command instead of running it")
    args = parser.parse_args(argv)
    if args.list:
        show(JOBS)
        return 0
    jobs = select(JOBS, args.only, args.all)
    results = QUICK_RESULTS if args.quick else RESULTS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if args.quick:
        env["UNET_BENCH_RESULTS"] = str(results)
    planned = [(job, command(job, args.quick, args.old_checkout)) for job in jobs]
    if not args.dry_run and any(cmd and job.needs_slices for job, cmd in planned):
        sys.path.insert(0, str(BENCH))
        from common import ensure_data  # the demo's synthetic default, made once

        ensure_data("2d")
    failed, skipped = [], []
    for job, cmd in planned:
        if cmd is None:
            skipped.append(job.name)
            print(f"run_all: {job.name}: skipped ({why_skipped(job, args.quick)})", flush=True)
            continue
        out = results / f"{job.output(args.quick)}.json"
        shown = " ".join([str(Path(cmd[1]).relative_to(ROOT)), *cmd[2:]])
        print(f"run_all: {job.name}: python {shown}  -> {out.relative_to(ROOT)}", flush=True)
        if args.dry_run:
            continue
        started = time.time()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        minutes = (time.time() - started) / 60
        if code == 0 and out.is_file() and out.stat().st_mtime >= started:
            print(f"run_all: {job.name}: done in {minutes:.1f} min", flush=True)
            continue
        reason = f"exit code {code}" if code else f"{out.name} was not written"
        print(f"run_all: {job.name}: FAILED ({reason}) after {minutes:.1f} min", flush=True)
        failed.append(job.name)
        if not args.keep_going:
            break
    ran = len(planned) - len(skipped)
    print(f"run_all: {ran} job(s) {'planned' if args.dry_run else 'run'}, {len(skipped)} skipped"
          + (f", failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
