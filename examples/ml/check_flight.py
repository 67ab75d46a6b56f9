#!/usr/bin/env python3
"""Reads every Flight stream of a running examples/ml job with pyarrow.flight
and checks it against a reference run that wrote the same sinks as Parquet.

Checks (exit status 1 and a message on the first failure):
  * each Flight partition holds exactly the rows of the reference run's
    part file of the same subtask, in the same order (so the shuffle is
    reproducible for its seed and parallelism);
  * the train/validation split is within --split-bound of its fraction;
  * the standardized training columns have mean 0 and variance 1 (to 1e-9:
    the statistics were fitted on exactly these rows), the validation
    columns roughly so (|mean| < 0.1, |var - 1| < 0.1).
Prints one JSON line with what it measured.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402  (read_all, call_options)

COLUMNS = ["value", "price", "weekday", "label"]


def fail(message):
    print(f"check_flight: {message}", file=sys.stderr)
    sys.exit(1)


def read_sink(client, job, sink, options, wait_s):
    parts = {}

    def keep(partition, batch):
        parts.setdefault(partition, []).append(batch)

    started = time.time()
    rows = train.read_all(client, job, sink, options, wait_s, keep)
    seconds = time.time() - started
    tables = {i: pa.Table.from_batches(b) for i, b in parts.items()}
    return tables, rows, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flight", required=True)
    ap.add_argument("--job", default="ml-features")
    ap.add_argument("--reference", required=True, help="directory with train/ and validation/ Parquet parts")
    ap.add_argument("--train-fraction", type=float, default=0.9)
    ap.add_argument("--split-bound", type=float, default=0.02)
    ap.add_argument("--wait", type=float, default=120)
    args = ap.parse_args()

    import pyarrow.flight as flight

    client = flight.FlightClient(args.flight)
    options = train.call_options(os.environ.get("STRATA_AUTH_SECRET"))
    result = {}
    rows = {}
    for sink in ["train", "validation"]:
        tables, count, seconds = read_sink(client, args.job, sink, options, args.wait)
        rows[sink] = count
        nbytes = sum(t.nbytes for t in tables.values())
        result[sink] = {"rows": count, "seconds": round(seconds, 3), "bytes": nbytes, "partitions": len(tables)}
        ref_dir = os.path.join(args.reference, sink)
        ref_files = sorted(f for f in os.listdir(ref_dir) if f.endswith(".parquet"))
        if len(ref_files) < len(tables):
            fail(f"{sink}: {len(tables)} Flight partitions but {len(ref_files)} reference part files")
        for i, table in sorted(tables.items()):
            ref = pq.read_table(os.path.join(ref_dir, f"part-{i}.parquet"))
            table = table.select(ref.column_names)
            if table.schema.remove_metadata() != ref.schema.remove_metadata():
                fail(f"{sink} partition {i}: schema {table.schema} differs from the reference {ref.schema}")
            if not table.equals(ref):
                fail(
                    f"{sink} partition {i}: {table.num_rows} rows differ from the reference part file ({ref.num_rows} rows) "
                    "in content or order"
                )
        whole = pa.concat_tables(tables.values()) if tables else None
        for column in COLUMNS:
            values = whole.column(column).to_numpy()
            mean, var = float(values.mean()), float(values.var())
            result[sink][column] = {"mean": mean, "var": var}
            tol_mean, tol_var = (1e-9, 1e-9) if sink == "train" else (0.1, 0.1)
            if abs(mean) > tol_mean or abs(var - 1) > tol_var:
                fail(f"{sink}.{column}: mean {mean}, variance {var}: not standardized")
    fraction = rows["train"] / max(rows["train"] + rows["validation"], 1)
    result["train_fraction"] = fraction
    if abs(fraction - args.train_fraction) > args.split_bound:
        fail(f"train fraction {fraction} is not within {args.split_bound} of {args.train_fraction}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
