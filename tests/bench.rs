//! `strata bench` through the real CLI, on tiny sizes (`--size-scale`):
//! the table, JSON, HTML and plots of a quick run; `--compare` of a report
//! with itself; `--serve` and `--peer` over loopback. Behaviour only: no
//! test looks at how fast anything was.

use std::process::Command;

mod common;

fn strata() -> Command {
    common::strata_command()
}

use common::output;

#[test]
fn bench_quick_writes_table_json_html_and_plots_then_compares_with_itself() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("a.json");
    let html = dir.path().join("report.html");
    let plots = dir.path().join("plots");
    let spill = dir.path().join("spill");
    let (code, stdout, stderr) = output(strata().args([
        "bench",
        "--quick",
        "--no-progress",
        "--size-scale",
        "0.005",
        "--only",
        "memory,cpu,gpu,storage",
        "--dir",
        spill.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in [
        "figure",
        "memory/copy 1 thread",
        "memory/first touch per 4 KiB page",
        "cpu/operator sort @rows=8192",
        "cpu/kernel hash @rows=1024",
        "storage/spill write thread pool",
    ] {
        assert!(stdout.contains(line), "{line} missing:\n{stdout}");
    }
    // Without a GPU the section is one line saying why.
    if !stdout.contains("gpu/launch latency") {
        assert!(stdout.contains("gpu/gpu: skipped: no GPU ("), "{stdout}");
    }

    let report = strata::bench::Report::read_json(&json).unwrap();
    assert_eq!(report.schema_version, strata::bench::report::SCHEMA_VERSION);
    assert!(report.machine.cores >= 1);
    assert!(report.run.quick);
    let operator = report
        .run
        .figures
        .iter()
        .find(|f| f.name == "operator filter")
        .expect("a filter figure");
    assert!(operator.ratio.is_some(), "{operator:?}");

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"), "no inline plot");
    let without_namespaces = page
        .replace("http://www.w3.org/2000/svg", "")
        .replace("http://www.w3.org/1999/xlink", "");
    assert!(!without_namespaces.contains("http://") && !without_namespaces.contains("https://"));
    let svgs: Vec<_> = std::fs::read_dir(&plots)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for plot in ["cpu-operators.svg", "cpu-kernels.svg", "memory-copy.svg"] {
        assert!(svgs.iter().any(|s| s == plot), "{plot} not in {svgs:?}");
    }

    let compare_html = dir.path().join("compare.html");
    let (code, stdout, stderr) = output(strata().args([
        "bench",
        "--compare",
        json.to_str().unwrap(),
        json.to_str().unwrap(),
        "--html",
        compare_html.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("B/A"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{} figures compared, 0 beyond",
            report.run.figures.len()
        )),
        "{stdout}"
    );
    assert!(
        std::fs::read_to_string(&compare_html)
            .unwrap()
            .contains("<svg")
    );
}

#[test]
fn bench_compare_names_a_missing_report() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.json");
    let (code, _, stderr) = output(strata().args([
        "bench",
        "--compare",
        missing.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]));
    assert_eq!(code, 2);
    assert!(stderr.contains("nowhere.json"), "{stderr}");
}

#[test]
fn bench_against_a_serve_peer_measures_shuffle_beside_raw_tcp() {
    let mut serve = strata();
    serve.args(["bench", "--serve", "--listen", "127.0.0.1:0"]);
    let (_server, address) = common::spawn_announcing_command(serve, "strata bench serving on ");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("peer.json");
    let (code, stdout, stderr) = output(strata().args([
        "bench",
        "--quick",
        "--no-progress",
        "--size-scale",
        "0.01",
        "--only",
        "network",
        "--peer",
        &address,
        "--json",
        json.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report = strata::bench::Report::read_json(&json).unwrap();
    assert_eq!(report.run.peer.as_deref(), Some(address.as_str()));
    let shuffles: Vec<_> = report
        .run
        .figures
        .iter()
        .filter(|f| f.name == "shuffle tcp (peer)")
        .collect();
    assert_eq!(shuffles.len(), 3, "{stdout}");
    for figure in shuffles {
        let reference = figure.reference.as_ref().expect("a reference");
        assert_eq!(reference.name, "raw tcp stream (peer)");
        assert!(figure.ratio.is_some());
    }
    // The server is still there for the next client.
    let (code, stdout, _) = output(strata().args([
        "bench",
        "--quick",
        "--no-progress",
        "--size-scale",
        "0.01",
        "--only",
        "network",
        "--peer",
        &address,
    ]));
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn bench_with_an_unreachable_peer_fails_naming_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let (code, stdout, _) = output(strata().args([
        "bench",
        "--no-progress",
        "--only",
        "network",
        "--peer",
        &address,
    ]));
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains(&format!("peer {address}")), "{stdout}");
    assert!(stdout.contains("skipped: failed:"), "{stdout}");
}
