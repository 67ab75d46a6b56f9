#!/usr/bin/env python3
"""Flight output beside Parquet, measured side by side in one run.

  scripts/bench_flight.sh            # builds the release binary, then runs this

1. A job (datagen -> flight_sink) read by a pyarrow.flight client, all
   partitions in parallel: rows/s and GB/s into Python.
2. The same job writing the same rows with parquet_sink: rows/s.
3. Reading that Parquet with pyarrow.dataset: rows/s and GB/s.
4. The Flight job with a deliberately slow trainer (it sleeps per batch):
   the peak RSS of the strata process beside the fast reader's, which
   back-pressure keeps bounded by the network buffers and queue_bytes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def job(name, rows, sink, parallelism):
    return f"""[job]
name = "{name}"
parallelism = {parallelism}

[[operator]]
name = "events"
type = "datagen"
rows = {rows}
keys = 100_000
seed = 5

{sink}
"""


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def flight_run(strata, path, delay_s, batches_limit=None):
    port = free_port()
    proc = subprocess.Popen(
        [strata, "run", path, "--no-progress", "-D", "rest.port=0", "-D", f"jobmanager.flight.port={port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    client = flight.FlightClient(f"grpc://127.0.0.1:{port}")
    nbytes = [0]
    lock = threading.Lock()

    def on_batch(_p, batch):
        with lock:
            nbytes[0] += batch.nbytes
        if delay_s:
            time.sleep(delay_s)

    # Wait for the endpoints (the job deploys), then time the reading.
    train.flight_info(client, path_job_name(path), "out", flight.FlightCallOptions(), 60)
    started = time.time()
    rows = train.read_all(client, path_job_name(path), "out", flight.FlightCallOptions(), 60, on_batch)
    seconds = time.time() - started
    out, err = proc.communicate(timeout=600)
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"flight job failed: {out}\n{err}")
    return rows, nbytes[0], seconds, peak[0], job_seconds(out)


def job_seconds(summary):
    """The job's own wall time from its summary ("FINISHED in 1.23 s")."""
    import re

    m = re.search(r"FINISHED in ([0-9.]+) s", summary)
    return float(m.group(1)) if m else float("nan")


JOB_NAMES = {}


def path_job_name(path):
    return JOB_NAMES[path]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strata", default="target/release/strata")
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--slow-rows", type=int, default=2_000_000)
    ap.add_argument("--slow-delay", type=float, default=0.05, help="seconds the slow trainer sleeps per batch")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="strata-bench-flight-")
    results = {}

    fpath = os.path.join(tmp, "flight.toml")
    with open(fpath, "w") as f:
        f.write(job("bench-flight", args.rows, '[[operator]]\nname = "out"\ntype = "flight_sink"\n', args.parallelism))
    JOB_NAMES[fpath] = "bench-flight"
    rows, nbytes, seconds, peak_fast, job_s = flight_run(args.strata, fpath, 0)
    results["flight"] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "gb_per_s": nbytes / seconds / 1e9, "peak_rss_mib": peak_fast / 1024, "job_seconds": job_s, "job_rows_per_s": rows / job_s}

    out_dir = os.path.join(tmp, "parquet")
    ppath = os.path.join(tmp, "parquet.toml")
    with open(ppath, "w") as f:
        f.write(job("bench-parquet", args.rows, f'[[operator]]\nname = "out"\ntype = "parquet_sink"\npath = "{out_dir}"\n', args.parallelism))
    started = time.time()
    done = subprocess.run([args.strata, "run", ppath, "--no-progress", "-D", "rest.port=0"], capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    job_s = job_seconds(done.stdout)
    results["parquet_sink"] = {"rows": args.rows, "seconds_process": wall, "job_seconds": job_s, "rows_per_s": args.rows / job_s}

    started = time.time()
    table = ds.dataset(out_dir, format="parquet").to_table()
    seconds = time.time() - started
    results["pyarrow_dataset_read"] = {"rows": table.num_rows, "seconds": seconds, "rows_per_s": table.num_rows / seconds, "gb_per_s": table.nbytes / seconds / 1e9}
    # Parquet end to end: write with strata, then read into Python.
    results["parquet_end_to_end_rows_per_s"] = args.rows / (job_s + seconds)

    spath = os.path.join(tmp, "slow.toml")
    with open(spath, "w") as f:
        f.write(job("bench-slow", args.slow_rows, '[[operator]]\nname = "out"\ntype = "flight_sink"\n', args.parallelism))
    JOB_NAMES[spath] = "bench-slow"
    rows, nbytes, seconds, peak_slow, _ = flight_run(args.strata, spath, args.slow_delay)
    fpath2 = os.path.join(tmp, "fast-small.toml")
    with open(fpath2, "w") as f:
        f.write(job("bench-fast-small", args.slow_rows, '[[operator]]\nname = "out"\ntype = "flight_sink"\n', args.parallelism))
    JOB_NAMES[fpath2] = "bench-fast-small"
    _, _, fast_seconds, peak_fast_small, _ = flight_run(args.strata, fpath2, 0)
    results["slow_trainer"] = {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": peak_slow / 1024,
        "fast_reader_seconds": fast_seconds,
        "fast_reader_peak_rss_mib": peak_fast_small / 1024,
        "delay_per_batch_s": args.slow_delay,
    }

    f = results["flight"]
    print(f"Flight into pyarrow:     {f['rows_per_s']:>14,.0f} rows/s  {f['gb_per_s']:.3f} GB/s  ({f['rows']:,} rows, {f['seconds']:.2f} s reading)")
    print(f"Flight job (deploy to last row read): {f['job_rows_per_s']:>14,.0f} rows/s  ({f['job_seconds']:.2f} s)")
    p = results["parquet_sink"]
    print(f"parquet_sink job:        {p['rows_per_s']:>14,.0f} rows/s  ({p['job_seconds']:.2f} s; process {p['seconds_process']:.2f} s)")
    d = results["pyarrow_dataset_read"]
    print(f"pyarrow.dataset read:    {d['rows_per_s']:>14,.0f} rows/s  {d['gb_per_s']:.3f} GB/s  ({d['seconds']:.2f} s)")
    print(f"Parquet write+read:      {results['parquet_end_to_end_rows_per_s']:>14,.0f} rows/s")
    print(f"ratio Flight job / (Parquet job + dataset read): {f['job_rows_per_s'] / results['parquet_end_to_end_rows_per_s']:.2f}x")
    s = results["slow_trainer"]
    print(
        f"slow trainer ({s['delay_per_batch_s'] * 1000:.0f} ms/batch): {s['rows_per_s']:,.0f} rows/s over {s['seconds']:.1f} s, "
        f"peak RSS {s['peak_rss_mib']:.0f} MiB vs fast reader {s['fast_reader_peak_rss_mib']:.0f} MiB ({s['fast_reader_seconds']:.1f} s)"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
