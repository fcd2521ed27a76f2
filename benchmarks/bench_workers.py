"""The ~100M-parameter GPT of bench_big_model.py swept in one process and in `--workers 2`, side by side.

Each mode runs as a fresh process timed from outside (import, model, sweep, table: what a user
waits for), one after the other in one session:
- one process, 1 intra-op thread (the reference the workers' table must equal byte for byte);
- `workers=2` on a local Ray cluster: 2 worker processes of 1 intra-op thread each (Ray start-up,
  model shipping and each worker's own preparation included);
- one process with every core's thread (torch's default), for context.
Random initialisation, weight-only int8/int4 with exact output metrics (the numbers are about time),
or with `--output-metrics estimated`, where the workers split the chunks of samples instead of the
layers (`--cache-mb` sets the chunks: the estimate's cache is 1/5 of it with its 2
projections; each mode prints how many chunks it had). CPU seconds are reported beside wall time: on a shared machine the wall time mostly measures the
other processes; the CPU seconds of the driver and of each worker (read from /proc) do not.
Before each mode, `corun_slowdown_before` says how much slower one core's work runs while every
core is busy than alone, on this machine at that moment (a fixed probe: 1.0 is separate cores).
Run: python benchmarks/bench_workers.py [--blocks 12] [--sequences 2] [--tokens 64]
     python benchmarks/bench_workers.py --output-metrics estimated --sequences 16 --cache-mb 256 [--workers-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker_cpu_seconds(stop: threading.Event, seen: dict[int, tuple[float, float, int]]) -> None:
    """Until `stop`: the CPU seconds (user + system), system seconds and minor page faults of each
    Ray ShardWorker process on this machine, read from /proc twice a second (the workers are gone
    once the sweep returns)."""
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.wait(0.5):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if not (entry / "cmdline").read_bytes().startswith(b"ray::ShardWorker"):
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime + stime, and stime and minor page faults apart: first-touch faults of freshly
            # mapped buffers are system time, which a process reusing its heap does not pay.
            seen[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick, int(fields[7]))


def machine_cpu_seconds() -> float | None:
    """CPU seconds every process on this machine has used since boot (/proc/stat: all but idle and
    iowait); the difference over a run counts Ray's own daemons too, which the per-process figures miss."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def sweep(args: argparse.Namespace) -> None:
    """One mode in this process: build the model, sweep, write the table."""
    import torch

    from analysis.data import Dataset
    from analysis.sweep import AnalysisConfig, analyze
    from bench_big_model import GPT

    torch.manual_seed(0)
    model = GPT(blocks=args.blocks, context=args.tokens).eval()
    idx = torch.randint(0, 16384, (args.sequences, args.tokens))
    data = Dataset(idx, torch.roll(idx, -1, dims=1), "language-model", "random tokens")
    extra = {} if args.cache_mb is None else {"cache_bytes": args.cache_mb << 20}
    config = AnalysisConfig(weight_formats=("int8", "int4"), act_formats=(), targets=("weights",),
                            num_samples=args.sequences, workers=args.workers, output_metrics=args.output_metrics,
                            **extra)
    stop, workers = threading.Event(), {}
    sampler = threading.Thread(target=worker_cpu_seconds, args=(stop, workers), daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = analyze(model, data, config)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    result.to_frame().to_csv(args.table, index=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"sweep_seconds": round(seconds, 1), "layers": len(result.layers),
                      "trials": len(result.trials), "chunks": result.data["chunks"],
                      "output_metrics": args.output_metrics, "threads": torch.get_num_threads(),
                      "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                      "cpu_seconds_this_process": round(usage.ru_utime + usage.ru_stime, 1),
                      "system_seconds_this_process": round(usage.ru_stime, 1), "page_faults_this_process": usage.ru_minflt,
                      "cpu_seconds_workers": sorted(round(v[0], 1) for v in workers.values()),
                      "system_seconds_workers": sorted(round(v[1], 1) for v in workers.values()),
                      "page_faults_workers": sorted(v[2] for v in workers.values())}))


def probe() -> None:
    """A fixed piece of the sweep's kind of work, in this process on one thread: forwards of a
    2-block GPT on one 128-token sequence; prints the seconds it took."""
    import torch

    from bench_big_model import GPT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(blocks=2, context=128).eval()
    idx = torch.randint(0, 16384, (1, 128))
    with torch.inference_mode():
        model(idx)
        started = time.perf_counter()
        for _ in range(PROBE_FORWARDS):
            model(idx)
    print(time.perf_counter() - started)


PROBE_FORWARDS = 60


def corun_slowdown(env: dict, cores: int) -> float:
    """How much slower each of `cores` copies of `probe` runs beside the others than one alone
    (1.0: the cores are truly separate). On a shared virtual machine this drifts from run to run —
    two busy vCPUs may share a physical core or memory bandwidth with each other or with other
    machines — and it bounds what N workers can gain, whatever they do."""
    command = [sys.executable, __file__, "--probe"]
    alone = float(subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout)
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(cores)]
    together = [float(child.communicate()[0]) for child in children]
    return round(sum(together) / len(together) / alone, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=12, help="12: the ~100M model; fewer for a quick run")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--output-metrics", choices=("exact", "estimated"), default="exact",
                        help="estimated: the workers split the chunks of samples (data parallel)")
    parser.add_argument("--cache-mb", type=int, help="the sweep's cache bound, which sets the chunks of samples")
    parser.add_argument("--workers-only", action="store_true",
                        help="only 1 process vs the workers (leave out the 1 process with every core's thread)")
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)  # a child's mode
    parser.add_argument("--table", help=argparse.SUPPRESS)  # where a child writes its layers.csv
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # a child timing `probe`
    args = parser.parse_args()
    if args.probe:
        probe()
        return
    if args.table:
        sweep(args)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="quantlens-bench-workers-"))
    modes = [("1 process, 1 thread", 1, "1"), (f"--workers {cores}, 1 thread each", cores, "1"),
             (f"1 process, {cores} threads", 1, str(cores))][:2 if args.workers_only else 3]
    rows = []
    for label, workers, threads in modes:
        table = work / f"{len(rows)}.csv"
        env = {**os.environ, "OMP_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
        slowdown = corun_slowdown({**env, "OMP_NUM_THREADS": "1"}, cores)  # the machine's state as this mode starts
        started, busy = time.perf_counter(), machine_cpu_seconds()
        child = subprocess.run([sys.executable, __file__, "--blocks", str(args.blocks), "--sequences", str(args.sequences),
                                "--tokens", str(args.tokens), "--workers", str(workers), "--table", str(table),
                                "--output-metrics", args.output_metrics,
                                *(["--cache-mb", str(args.cache_mb)] if args.cache_mb is not None else [])],
                               capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        busy = None if busy is None else round(machine_cpu_seconds() - busy, 1)
        load = os.getloadavg()[0]  # other processes on the machine: the wall times depend on them
        if child.returncode:
            sys.exit(f"{label} failed:\n{child.stderr[-2000:]}")
        report = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({"mode": label, "wall_seconds": round(wall, 1), **report, "cpu_seconds_machine": busy,
                     "corun_slowdown_before": slowdown,
                     "load_average_after": round(load, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # as it finishes
    reference = (work / "0.csv").read_bytes()
    for index, row in enumerate(rows):
        row["vs_1_process_1_thread"] = round(row["wall_seconds"] / rows[0]["wall_seconds"], 2)
        row["table_identical_to_1_thread"] = (work / f"{index}.csv").read_bytes() == reference
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
