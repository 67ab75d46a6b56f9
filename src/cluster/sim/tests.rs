use super::*;

fn run_seeds(base: u64, count: u64, cfg: &SimConfig) -> Vec<String> {
    seeds(base, count)
        .into_iter()
        .filter_map(|seed| Sim::new(seed, cfg.clone()).run().err())
        .collect()
}

/// 200 seeds of every fault kind; each must keep every invariant.
#[test]
fn cluster_keeps_its_invariants_under_faults() {
    let failures = run_seeds(1, 200, &SimConfig::default());
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Without faults every job finishes (none is refused for slots that a
/// previous job left behind).
#[test]
fn without_faults_every_job_finishes() {
    let cfg = SimConfig {
        faults: false,
        ..SimConfig::default()
    };
    for seed in seeds(1000, 50) {
        let mut sim = Sim::new(seed, cfg.clone());
        sim.run().unwrap();
        for (i, c) in sim.clients.iter().enumerate() {
            match &c.outcome {
                Some(Outcome::Ended {
                    state: JobState::Finished,
                    ..
                })
                | Some(Outcome::Rejected(_)) => {}
                Some(Outcome::Ended { state, reason, .. })
                    if reason
                        .as_deref()
                        .is_some_and(|r| r.contains("simulated failure")) =>
                {
                    let _ = state;
                }
                other => panic!("seed={seed}: client {i}: {other:?}"),
            }
        }
    }
}

fn caught(bug: Bug) -> usize {
    if std::env::var("STRATA_SIM_SEED").is_ok() {
        return usize::MAX;
    }
    let cfg = SimConfig {
        bug: Some(bug),
        ..SimConfig::default()
    };
    let failures = run_seeds(5000, 60, &cfg);
    assert!(failures.iter().all(|f| f.contains("seed=")), "{failures:?}");
    failures.len()
}

#[test]
fn checker_catches_a_slot_leaked_by_a_failed_deployment() {
    assert!(caught(Bug::SlotLeakOnFailedDeploy) > 0);
}

#[test]
fn checker_catches_the_slot_lifecycle_race() {
    assert!(caught(Bug::FreeOnFirstEnd) > 0);
}

#[test]
fn checker_catches_a_taskmanager_that_is_never_fenced() {
    assert!(caught(Bug::NoFencing) > 0);
}

/// A seed replays the same run: the same job outcomes and the same
/// executions, so a failing seed can be studied with `STRATA_SIM_TRACE`.
#[test]
fn a_seed_replays_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed, SimConfig::default());
        let result = sim.run();
        let outcomes: Vec<_> = sim.clients.iter().map(|c| c.outcome.clone()).collect();
        let mut executions: Vec<_> = sim.executions.keys().copied().collect();
        executions.sort_unstable();
        (result, outcomes, executions)
    };
    for seed in seeds(7, 5) {
        assert_eq!(run(seed), run(seed), "seed={seed}");
    }
}
