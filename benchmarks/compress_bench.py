"""Wall time and peak memory of `onnx-inher compress` on real models.

Each run starts the CLI as a subprocess and measures it from outside:

* wall time: `time.perf_counter()` from spawn to exit (interpreter start-up and imports included),
  and CPU time (user + system, from `os.wait4`), which other jobs on the machine disturb less;
* peak RSS: the kernel's high-water mark of the CLI process (`ru_maxrss` from `os.wait4`, the number
  `/usr/bin/time -v` prints as "Maximum resident set size"), and, as a cross-check that also counts
  child processes, the largest sum of RSS over the process and all its descendants, sampled with
  psutil every 20 ms. The reported peak is the larger of the two (the CLI spawns no children today,
  so the two agree up to sampling). Sampling can miss a spike shorter than 20 ms; `ru_maxrss` cannot.
* file size: the model file plus every external data file its tensors point at.

Targets (issue): wall < 60 s and peak RSS < 3x the model's file size, on a 2-core machine.

Usage (from the repository root):

    .venv/bin/python -m benchmarks.compress_bench [--repeat 2] [--json results.json]
        [--models minilm_torchscript,minilm_dynamo,bert_base_random] [--modes inher,svd] [--blas-threads N]

Every (model, mode) runs `--repeat` times; the table shows the minimum wall time, CPU time and
peak RSS over the repeats (the least-disturbed run: other jobs may share the machine), and the
load average before and after. The sha256 of the student (model file + data file) is recorded so
that a change to the code can be checked to leave the output byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from benchmarks.common import ROOT, write_json

POLL_S = 0.020
WALL_TARGET_S = 60.0
RSS_TARGET_RATIO = 3.0
MODELS = ("minilm_torchscript", "minilm_dynamo", "bert_base_random")
MODES = ("inher", "svd")
MiB = 2**20


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # user + system CPU time of the CLI (less disturbed by other jobs than wall time)
    maxrss_mb: float  # kernel high-water mark of the CLI process (ru_maxrss)
    sampled_mb: float  # max over 20 ms samples of RSS summed over the process tree
    returncode: int
    load_before: float
    load_after: float

    @property
    def peak_mb(self) -> float:
        return max(self.maxrss_mb, self.sampled_mb)


@dataclass
class Result:
    model: str
    mode: str
    path: str
    file_mb: float
    args: list[str]
    runs: list[Run] = field(default_factory=list)
    student_sha256: str = ""
    student_mb: float = 0.0
    stdout_tail: str = ""

    @property
    def wall_s(self) -> float:
        return min(r.wall_s for r in self.runs)

    @property
    def cpu_s(self) -> float:
        return min(r.cpu_s for r in self.runs)

    @property
    def peak_mb(self) -> float:
        return min(r.peak_mb for r in self.runs)

    @property
    def ratio(self) -> float:
        return self.peak_mb / self.file_mb

    @property
    def ok(self) -> bool:
        return all(r.returncode == 0 for r in self.runs) and self.wall_s < WALL_TARGET_S \
            and self.ratio < RSS_TARGET_RATIO

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(wall_s=self.wall_s, cpu_s=self.cpu_s, peak_rss_mb=self.peak_mb, rss_per_file=self.ratio,
                 meets_targets=self.ok)
        return d


def model_files(path: Path) -> list[Path]:
    """The model file and the external data files its tensors point at (read in a separate process,
    like `fixture`: loading a model here would raise the RSS every CLI run inherits)."""
    code = ("import sys, onnx; from onnx_inher.ir.io import iter_tensors; "
            "m = onnx.load(sys.argv[1], load_external_data=False); "
            "print('\\n'.join(sorted({e.value for t in iter_tensors(m.graph) "
            "if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == 'location'})))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return [path, *(path.parent / name for name in out.stdout.split())]


def files_sha256(paths: list[Path]) -> str:
    """sha256 of the files' contents, concatenated (for one file: what `sha256sum` prints)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run `cmd`, returning its wall time and peak RSS (kernel max and 20 ms sampled process-tree sum)."""
    load_before = os.getloadavg()[0]
    with open(log, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        peak = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            try:
                proc = psutil.Process(child.pid)
                while not done.is_set():
                    peak = max(peak, _tree_rss(proc))
                    done.wait(POLL_S)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass

        sampler = threading.Thread(target=poll, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)  # reaps the child and gets its rusage
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        child.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, maxrss_mb=usage.ru_maxrss * 1024 / MiB,
               sampled_mb=peak / MiB, returncode=child.returncode, load_before=load_before,
               load_after=os.getloadavg()[0])


def cli() -> str:
    exe = Path(sys.executable).parent / "onnx-inher"
    return str(exe) if exe.exists() else shutil.which("onnx-inher") or "onnx-inher"


def fixture(name: str) -> Path:
    """The fixture's path, built in a separate process: a forked child starts with the parent's
    current RSS and Linux keeps the high-water mark across exec, so a CLI forked from this process
    with torch and the zoo loaded would report at least that as its `ru_maxrss`."""
    code = f"from benchmarks.common import zoo; print(zoo.{name}())"  # run in ROOT, which -c puts on sys.path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return Path(out.stdout.strip().splitlines()[-1])


def import_baseline(workdir: Path) -> Run:
    """`onnx-inher --help`: the interpreter and every import, which counts in each peak RSS."""
    return measure([cli(), "--help"], workdir / "import-baseline.log")


def blas_env(threads: int | None) -> dict[str, str] | None:
    """The environment for the CLI: inherited, with the BLAS thread pools pinned to `threads` if given."""
    if threads is None:
        return None
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def bench(models: list[str], modes: list[str], repeat: int, extra: list[str], workdir: Path,
          blas_threads: int | None = None, verbose: bool = True) -> list[Result]:
    results = []
    env = blas_env(blas_threads)
    for name in models:
        path = fixture(name)
        files = model_files(path)
        file_mb = sum(p.stat().st_size for p in files) / MiB
        for mode in modes:
            out = workdir / f"{name}-{mode}.onnx"
            args = ["compress", str(path), "-o", str(out), "--param-ratio", "0.5", "--mode", mode, *extra]
            res = Result(name, mode, str(path), file_mb, args)
            for i in range(repeat):
                for p in workdir.glob(f"{out.name}*"):
                    p.unlink()
                log = workdir / f"{out.name}.log"
                run = measure([cli(), *args], log, env)
                res.runs.append(run)
                text = log.read_text(errors="replace")
                res.stdout_tail = text[-2000:]
                if run.returncode != 0:
                    print(f"!! {name} {mode}: exit {run.returncode}\n{text[-2000:]}", file=sys.stderr)
                    break
                written = [p for p in (out, out.with_name(out.name + ".data")) if p.exists()]
                digest = files_sha256(written)
                if res.student_sha256 and digest != res.student_sha256:
                    print(f"!! {name} {mode}: student differs between repeats", file=sys.stderr)
                res.student_sha256 = digest
                res.student_mb = sum(p.stat().st_size for p in written) / MiB
                if verbose:
                    print(f"  {name:20s} {mode:5s} run {i + 1}: {run.wall_s:6.1f} s (cpu {run.cpu_s:5.1f} s), "
                          f"ru_maxrss {run.maxrss_mb:7.0f} MiB, sampled tree {run.sampled_mb:7.0f} MiB, load "
                          f"{run.load_before:.2f}->{run.load_after:.2f}", file=sys.stderr, flush=True)
            results.append(res)
    return results


def table(results: list[Result]) -> str:
    lines = [
        "| model | mode | file MiB | wall s (min) | CPU s (min) | peak RSS MiB (min) | RSS / file | student MiB "
        "| targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        verdict = "ok" if r.ok else ", ".join(
            filter(None, ["FAILED" if any(x.returncode for x in r.runs) else "",
                          f"wall >= {WALL_TARGET_S:g} s" if r.wall_s >= WALL_TARGET_S else "",
                          f"RSS >= {RSS_TARGET_RATIO:g}x" if r.ratio >= RSS_TARGET_RATIO else ""]))
        lines.append(f"| {r.model} | {r.mode} | {r.file_mb:.1f} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.peak_mb:.0f} | "
                     f"{r.ratio:.2f} | {r.student_mb:.1f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated fixtures of tests/zoo.py")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeat", type=int, default=2, help="runs per (model, mode); the table shows the min")
    ap.add_argument("--json", type=Path, help="write all runs and the machine state here")
    ap.add_argument("--workdir", type=Path, help="where students are written (default: a temp folder)")
    ap.add_argument("--blas-threads", type=int,
                    help="set OPENBLAS/OMP/MKL_NUM_THREADS for the CLI (default: inherit, i.e. one per core)")
    ap.add_argument("extra", nargs="*", help="extra compress options, after --")
    ns = ap.parse_args(argv)
    models, modes = ns.models.split(","), ns.modes.split(",")
    tmp = None
    workdir = ns.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnx-inher-bench-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "mem_total_mb": psutil.virtual_memory().total / MiB,
               "platform": platform.platform(), "python": platform.python_version(),
               "blas_threads": ns.blas_threads or "default",
               "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    try:
        base = min((import_baseline(workdir) for _ in range(3)), key=lambda r: r.peak_mb)
        results = bench(models, modes, ns.repeat, ns.extra, workdir, ns.blas_threads)
    finally:
        if tmp is not None:
            tmp.cleanup()
    machine["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(table(results))
    shares = ", ".join(f"{r.model} {base.peak_mb / (RSS_TARGET_RATIO * r.file_mb):.0%}"
                       for r in results if r.mode == modes[0])
    print(f"\ninterpreter + imports (`onnx-inher --help`): peak RSS {base.peak_mb:.0f} MiB, {base.wall_s:.2f} s; "
          f"share of the {RSS_TARGET_RATIO:g}x budget: {shares}")
    print(f"\nmachine: {machine['cpus']} CPUs, {machine['mem_total_mb']:.0f} MiB RAM; BLAS threads "
          f"{machine['blas_threads']}; "
          f"before: {machine['uptime_before']}; after: {machine['uptime_after']}")
    if ns.json:
        write_json(ns.json, {"machine": machine, "poll_s": POLL_S, "import_baseline": asdict(base),
                             "results": [r.to_dict() for r in results]})
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
