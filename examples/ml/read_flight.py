#!/usr/bin/env python3
"""Reads one flight_sink of a running job to the end, surviving failovers
(by the offsets in each batch's app_metadata), and writes what each
partition delivered to OUT/part-<partition>.parquet.

  read_flight.py --flight grpc://HOST:PORT --job NAME --sink NAME --out DIR

Prints one JSON line: rows per partition and the stream breaks survived.
"""

import argparse
import json
import os
import sys
import threading

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flight", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--sink", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--wait", type=float, default=120)
    args = ap.parse_args()
    client = flight.FlightClient(args.flight)
    options = train.call_options(os.environ.get("STRATA_AUTH_SECRET"))
    parts = {}
    lock = threading.Lock()
    progress = os.path.join(args.out, "rows-read")
    os.makedirs(args.out, exist_ok=True)
    total = [0]

    def keep(partition, batch):
        with lock:
            parts.setdefault(partition, []).append(batch)
            total[0] += batch.num_rows
            with open(progress, "w") as f:
                f.write(str(total[0]))

    rows = train.read_all(client, args.job, args.sink, options, args.wait, keep)
    for i, batches in parts.items():
        pq.write_table(pa.Table.from_batches(batches), os.path.join(args.out, f"part-{i}.parquet"))
    print(json.dumps({"rows": rows, "partitions": {i: sum(b.num_rows for b in bs) for i, bs in parts.items()}, "breaks": train.BREAKS[0]}))


if __name__ == "__main__":
    main()
