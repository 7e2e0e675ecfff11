//! `kopir bench` runs the whole exchange against a direct call and prints the
//! figures docs/performance.md quotes: here a one-second sweep (and its overload level)
//! checks that every call went through or was shed, and that the JSON has the
//! documented shape (no speed is asserted: the benchmark measures it).

use std::process::Command;

#[test]
fn the_benchmark_prints_every_figure_for_each_level() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kopir"))
        .args([
            "bench",
            "--seconds",
            "1",
            "--concurrency",
            "1,4",
            "--json",
            "--dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kopir bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let levels: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels = levels.as_array().unwrap();
    assert_eq!(levels.len(), 3, "two levels and the overload level");
    for (level, concurrency) in levels.iter().zip([1, 4, 40]) {
        let overload = concurrency == 40;
        assert_eq!(level["concurrency"], concurrency);
        assert_eq!(level["overload"], overload);
        assert_eq!(level["seconds"], 1);
        for mode in ["direct", "gateway"] {
            let f = &level[mode];
            for key in [
                "calls_per_s",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "max_ms",
                "cpu_us_per_call",
            ] {
                assert!(f[key].as_f64().unwrap() > 0.0, "{mode}.{key}: {f}");
            }
            if !overload || mode == "direct" {
                assert_eq!(f["errors"], 0, "{mode}: {f}");
            }
            assert!(f["p50_ms"].as_f64() <= f["p99_ms"].as_f64());
        }
        let g = &level["gateway"];
        for key in [
            "consumer_peak_rss_mib",
            "provider_peak_rss_mib",
            "fsync_ms_per_call",
            "consumer_cpu_us_per_call",
            "provider_cpu_us_per_call",
            "added_p50_ms",
            "switches_per_call",
        ] {
            assert!(g[key].as_f64().unwrap() > 0.0, "gateway.{key}: {g}");
        }
        // Every commit holds at least one record.
        assert!(g["records_per_commit"].as_f64().unwrap() >= 1.0, "{g}");
        // Each server waits for the disk at most once per exchange.
        let syncs = g["syncs_per_call"].as_f64().unwrap();
        assert!(syncs > 0.0 && syncs <= 2.0, "{g}");
        // Under overload, every error is a call shed at once.
        assert_eq!(g["errors"], g["shed"], "{g}");
        assert!(g["slowest_ms"].as_f64().unwrap() > 0.0, "{g}");
        if overload {
            assert_eq!(level["deadline_ms"], 1000);
        }
        let ratio = level["ratio"].as_f64().unwrap();
        let expected =
            g["calls_per_s"].as_f64().unwrap() / level["direct"]["calls_per_s"].as_f64().unwrap();
        assert!((ratio - expected).abs() < 1e-9, "{level}");
    }
}
