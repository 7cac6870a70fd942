//! `scripts/gpu-check`, the prepared GPU check, as a dry run on the CPU: the same script and
//! `dpar bench device` code path (candle's ops against the fused kernels, small presets) end
//! with both reports, every smoke test passing.

mod common;

#[test]
fn the_gpu_check_script_runs_dry_on_the_cpu_and_writes_both_reports() {
    let out = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check");
    let run = std::process::Command::new(script)
        .args(["--bin", env!("CARGO_BIN_EXE_dpar"), "--device", "cpu", "--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{text}");
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for want in
        ["| gpt (small) | f32 |", "| dpar (small) | bf16 |", "| gpt-mnist | bf16 | 4 |", "| dpar-mnist | f32 | 4 |"]
    {
        assert!(md.contains(want), "report.md lacks {want}:\n{md}");
    }
    assert!(!md.contains("FAIL"), "{md}");
    assert!(md.contains("DPAR's training images/s over the baseline's: ") && md.contains("× (bf16)"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["smoke"].as_array().unwrap().len(), 4);
    assert_eq!(json["throughput"].as_array().unwrap().len(), 4);
    let sampling = &json["sampling"][0];
    assert!(
        sampling["gpt_images_per_s"].as_f64().unwrap() > 0.0 && sampling["dpar_images_per_s"].as_f64().unwrap() > 0.0
    );
    assert!(out.path().join("gpu-check.log").is_file());
}

/// A binary that is not there, and a multi-rank launch of a build without a backend for it, are
/// clear errors.
#[test]
fn the_gpu_check_names_its_problems() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check");
    let run = std::process::Command::new(&script).args(["--bin", "/nonexistent/dpar"]).output().unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("no dpar binary"));
    let out = tempfile::tempdir().unwrap();
    let run = common::dpar()
        .args(["bench", "device", "--device", "cpu", "--out"])
        .arg(out.path())
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && !text.contains("panicked"), "{text}");
    assert!(text.contains("rank 0 of 2") && text.contains("--features"), "{text}");
}
