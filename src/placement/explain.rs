//! `strata explain`: the placement of every operator as a table.

use std::fmt::Write;

use super::{Placement, breakdown_summary, bytes, seconds};

fn cost(cost_s: Option<f64>) -> String {
    cost_s.map_or_else(|| "-".to_owned(), seconds)
}

fn rows(rows: f64) -> String {
    if rows >= 1e6 {
        format!("{:.1}M", rows / 1e6)
    } else if rows >= 1e3 {
        format!("{:.1}k", rows / 1e3)
    } else {
        format!("{rows:.0}")
    }
}

/// The table `strata explain` prints.
pub fn render(job_name: &str, placement: &Placement) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Job '{job_name}': placement.mode = {}", placement.mode);
    let _ = writeln!(out, "  calibration: {}", placement.calibration_origin);
    let _ = writeln!(out, "  GPU tier:    {}", placement.gpu_tier);
    let _ = writeln!(
        out,
        "  {:<3} {:<14} {:<12} {:>3} {:>9}  {:<4} {:>9} {:>9}  REASON",
        "#", "OPERATOR", "TYPE", "PAR", "ROWS IN", "TIER", "CPU COST", "GPU COST"
    );
    for op in &placement.operators {
        let _ = writeln!(
            out,
            "  {:<3} {:<14} {:<12} {:>3} {:>9}  {:<4} {:>9} {:>9}  {}",
            op.operator,
            op.name,
            op.kind,
            op.parallelism,
            rows(op.rows_in_estimate),
            op.tier.to_string(),
            cost(op.cpu_cost_s),
            cost(op.gpu_cost_s),
            op.reason
        );
    }
    let priced: Vec<_> = placement
        .chains
        .iter()
        .filter_map(|chain| chain.gpu.as_ref().map(|gpu| (chain, gpu)))
        .collect();
    if !priced.is_empty() {
        let _ = writeln!(
            out,
            "  GPU chains (one fused program each; input coalesced into batches of {}):",
            bytes(placement.coalesce_bytes as f64)
        );
    }
    for (chain, gpu) in priced {
        let _ = writeln!(
            out,
            "    {} on {}: {} on GPU vs {} on CPU",
            chain.names,
            chain.tier,
            seconds(gpu.total_s),
            seconds(chain.cpu_cost_s)
        );
        let _ = writeln!(out, "      {}", breakdown_summary(gpu));
    }
    let _ = writeln!(
        out,
        "  (costs: estimated seconds for the whole job; rows in: estimates from the job file; \
         a GPU chain's cost is shared equally by its operators)"
    );
    out
}
