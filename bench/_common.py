"""Shared helpers for the benchmarks: quiet-machine setup, timing, peak memory, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

_THREADS = {"OMP_NUM_THREADS": "2"}
# glibc returns freed blocks above this size to the OS at once, so the process's RSS follows live tensors and
# the peak RSS of one call measures its peak extra memory. It also makes every large allocation page-fault, so
# memory is measured in a separate process from timing (see ``run_memory_subprocess``).
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def reexec_with_bench_env(memory: bool = False) -> None:
    """Restart the interpreter with 2 threads, and the memory-measuring allocator setting if ``memory``."""
    want = {**_THREADS, **(_MEMORY_ENV if memory else {})}
    wrong = any(os.environ.get(k) != v for k, v in want.items())
    if not memory and "MALLOC_MMAP_THRESHOLD_" in os.environ:
        wrong = True
    if wrong:
        env = {k: v for k, v in os.environ.items() if memory or k != "MALLOC_MMAP_THRESHOLD_"}
        env.update(want)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def run_memory_subprocess(extra_args: list[str]) -> dict:
    """Run this benchmark script again with ``--memory-only`` and return the JSON it prints last."""
    import subprocess

    cmd = [sys.executable, sys.argv[0], *extra_args, "--memory-only"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def peak_extra_memory(fn: Callable[[], object]) -> int:
    """Bytes by which the resident set grows at its peak while ``fn()`` runs (Linux; resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")
    fn()
    return max(0, _proc_status("VmHWM") - base)


def median_time(fn: Callable[[], object], warmup: int = 2, min_runs: int = 5, budget_s: float = 3.0) -> float:
    """Median wall time of ``fn()`` in seconds: ``warmup`` calls, then at least ``min_runs`` timed calls,
    more while under ``budget_s``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def judge_targets(rows: list[dict], values: dict, targets: dict) -> None:
    """Fill ``target`` and ``meets`` of each row whose ``key`` has a ``(text, test)`` entry in ``targets``; the test
    gets the row's value and ``values`` (all measured values); ``"-"`` when the value could not be measured."""
    for r in rows:
        spec = targets.get(r["key"])
        if spec is None:
            continue
        r["target"] = spec[0]
        try:
            r["meets"] = "yes" if spec[1](r["value"], values) else "no"
        except (TypeError, KeyError):
            r["meets"] = "-"


def write_results(name: str, rows: list[dict], columns: list[tuple[str, str]], out_dir: str | Path,
                  meta: dict) -> str:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md``; returns the markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    (out / f"{name}.md").write_text(md + "\n")
    return md
