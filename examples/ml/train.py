#!/usr/bin/env python3
"""Trains a small model on the Flight streams of examples/ml/features.toml.

Asks the JobManager for the job's Flight endpoints (GetFlightInfo on the job
name and sink), reads every partition in parallel with pyarrow.flight, and
trains a linear model on the batches as they arrive: with PyTorch when it is
installed, else with NumPy. Prints the loss per epoch and the validation
loss. One run of the job is one epoch's stream: with --epochs N the trainer
waits for the job to be running again after each epoch.

Failures: each batch's app_metadata carries its partition, execution attempt
and row offset. When a stream breaks (a TaskManager failed and the job
restarts), the reader asks for the flight info again and skips the rows it
has already seen; if the restored stream starts after rows it never got, the
epoch cannot be completed exactly and the trainer says so.
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

FEATURES = ["value", "price", "weekday"]
# Stream breaks survived (failovers, reconnects), for reporting.
BREAKS = [0]
LABEL = "label"


def call_options(secret):
    if not secret:
        return flight.FlightCallOptions()
    token = hmac.new(secret.encode(), b"strata-flight-v1", hashlib.sha256).hexdigest()
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def flight_info(client, job, sink, options, wait_s):
    """GetFlightInfo, retrying while the job deploys or restarts."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.get_flight_info(flight.FlightDescriptor.for_path(job, sink), options)
        except flight.FlightUnauthenticatedError:
            raise
        except (flight.FlightError, pa.ArrowException) as e:
            # Unavailable while the job deploys or restarts; not found
            # before it is submitted.
            last = e
        if time.time() > deadline:
            raise SystemExit(f"no Flight endpoints for {job}/{sink} within {wait_s} s: {last}")
        time.sleep(0.2)


class StreamGap(Exception):
    """A restored stream starts after rows this trainer never received."""


class Partition:
    """Reads one partition, surviving a failover by offsets."""

    def __init__(self, index):
        self.index = index
        self.rows_seen = 0  # the next offset wanted

    def read(self, endpoint, options, on_batch):
        location = endpoint.locations[0]
        client = flight.FlightClient(location)
        reader = client.do_get(endpoint.ticket, options)
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return True
            meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata else None
            batch = chunk.data
            if meta is None:
                raise StreamGap(f"partition {self.index}: a batch without strata metadata")
            offset = meta["offset"]
            if offset > self.rows_seen:
                raise StreamGap(
                    f"partition {self.index}: rows {self.rows_seen}..{offset} were lost in a failover; restart the epoch"
                )
            skip = self.rows_seen - offset
            if skip >= batch.num_rows:
                continue  # replayed rows this trainer has seen already
            batch = batch.slice(skip)
            self.rows_seen += batch.num_rows
            on_batch(self.index, batch)


def read_all(client, job, sink, options, wait_s, on_batch, retries=50):
    """Reads every partition of a sink in parallel; returns the row count."""
    info = flight_info(client, job, sink, options, wait_s)
    partitions = [Partition(i) for i in range(len(info.endpoints))]
    errors = []

    def run(p):
        attempts = 0
        endpoint = info.endpoints[p.index]
        while True:
            try:
                p.read(endpoint, options, on_batch)
                return
            except (flight.FlightError, pa.ArrowException, OSError) as e:
                if isinstance(e, flight.FlightUnauthenticatedError):
                    errors.append(f"partition {p.index}: {e}")
                    return
                attempts += 1
                if attempts > retries:
                    errors.append(f"partition {p.index}: {e}")
                    return
                # The JobManager may not know of the failure yet (it waits
                # for a heartbeat timeout): back off before asking again.
                time.sleep(min(0.2 * attempts, 2.0))
                BREAKS[0] += 1
                print(f"partition {p.index}: stream broke ({e}); asking for the flight info again", file=sys.stderr)
                try:
                    fresh = flight_info(client, job, sink, options, wait_s)
                except SystemExit as gone:
                    errors.append(f"partition {p.index}: {gone}")
                    return
                endpoint = fresh.endpoints[p.index]
            except Exception as e:  # a gap, a bug: fail the read, not just this thread
                errors.append(f"partition {p.index}: {e!r}")
                return

    threads = [threading.Thread(target=run, args=(p,)) for p in partitions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("; ".join(errors))
    return sum(p.rows_seen for p in partitions)


class NumpyModel:
    def __init__(self, features, lr):
        self.w = np.zeros(features)
        self.b = 0.0
        self.lr = lr

    def step(self, x, y):
        err = x @ self.w + self.b - y
        self.w -= self.lr * (x.T @ err) / len(y)
        self.b -= self.lr * err.mean()
        return float((err**2).mean())

    def loss(self, x, y):
        return float(((x @ self.w + self.b - y) ** 2).mean())


class TorchModel:
    def __init__(self, features, lr):
        import torch

        self.torch = torch
        self.model = torch.nn.Linear(features, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def step(self, x, y):
        t = self.torch
        xt, yt = t.from_numpy(x).float(), t.from_numpy(y).float().unsqueeze(1)
        self.opt.zero_grad()
        loss = t.nn.functional.mse_loss(self.model(xt), yt)
        loss.backward()
        self.opt.step()
        return float(loss)

    def loss(self, x, y):
        t = self.torch
        with t.no_grad():
            xt, yt = t.from_numpy(x).float(), t.from_numpy(y).float().unsqueeze(1)
            return float(t.nn.functional.mse_loss(self.model(xt), yt))


def arrays(batch):
    x = np.column_stack([batch.column(f).to_numpy(zero_copy_only=False) for f in FEATURES])
    y = batch.column(LABEL).to_numpy(zero_copy_only=False)
    return x.astype(np.float64), y.astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flight", default="grpc://127.0.0.1:8815", help="the JobManager's Flight address")
    ap.add_argument("--job", default="ml-features")
    ap.add_argument("--train-sink", default="train")
    ap.add_argument("--validation-sink", default="validation")
    ap.add_argument("--epochs", type=int, default=1, help="one run of the job per epoch")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for the job's streams")
    ap.add_argument("--numpy", action="store_true", help="NumPy even when PyTorch is installed")
    ap.add_argument("--secret-env", default="STRATA_AUTH_SECRET", help="variable holding the cluster secret")
    args = ap.parse_args()

    try:
        if args.numpy:
            raise ImportError
        model = TorchModel(len(FEATURES), args.lr)
        backend = "PyTorch"
    except ImportError:
        model = NumpyModel(len(FEATURES), args.lr)
        backend = "NumPy"
    options = call_options(os.environ.get(args.secret_env))
    client = flight.FlightClient(args.flight)
    lock = threading.Lock()
    for epoch in range(1, args.epochs + 1):
        losses, validation = [], []

        def train(_partition, batch):
            x, y = arrays(batch)
            with lock:
                losses.append((model.step(x, y), len(y)))

        def hold(_partition, batch):
            with lock:
                validation.append(batch)

        started = time.time()
        rows = read_all(client, args.job, args.train_sink, options, args.wait, train)
        val_rows = read_all(client, args.job, args.validation_sink, options, args.wait, hold)
        seconds = time.time() - started
        total = sum(n for _, n in losses) or 1
        train_loss = sum(l * n for l, n in losses) / total
        val_loss = float("nan")
        if validation:
            x, y = arrays(pa.Table.from_batches(validation).combine_chunks().to_batches()[0])
            val_loss = model.loss(x, y)
        print(
            f"epoch {epoch}: train loss {train_loss:.6f} over {rows} rows, "
            f"validation loss {val_loss:.6f} over {val_rows} rows "
            f"({rows / max(seconds, 1e-9):,.0f} rows/s, {backend})",
            flush=True,
        )


if __name__ == "__main__":
    main()
