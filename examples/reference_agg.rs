//! A hand-written single-threaded baseline for the main example job: the
//! same datagen rows, the same filter and aggregation, in one plain loop
//! over a `std::collections::HashMap`. `scripts/bench_pipeline.sh` prints
//! strata's end-to-end rate as a ratio to this one.
//!
//!   cargo run --release --example reference_agg -- [ROWS] [KEYS] [SEED]

use std::collections::HashMap;
use std::time::Instant;

use strata::exec::source::datagen_row;
use strata::job::DatagenSpec;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(50_000_000);
    let keys = args.get(1).copied().unwrap_or(100_000);
    let seed = args.get(2).copied().unwrap_or(42);
    let spec = DatagenSpec::new(rows, keys, seed);
    let started = Instant::now();
    let mut groups: HashMap<i64, (i64, i64, i64, i64, f64)> = HashMap::with_capacity(keys as usize);
    for i in 0..rows {
        let r = datagen_row(&spec, i);
        if r.value < 10 {
            continue;
        }
        let g = groups
            .entry(r.key)
            .or_insert((0, 0, i64::MAX, i64::MIN, 0.0));
        g.0 += 1;
        g.1 += r.value;
        g.2 = g.2.min(r.value);
        g.3 = g.3.max(r.value);
        g.4 += r.price;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "reference (1 thread, HashMap): {rows} rows, {} keys in {secs:.2} s = {:.2} M rows/s",
        groups.len(),
        rows as f64 / secs / 1e6
    );
}
