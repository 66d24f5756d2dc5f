//! The fault suite's short form, run by `cargo test --workspace` like every other test: the real
//! `ingest` and `worker` binaries, every fault scenario, and a failure if any acknowledged event
//! was lost or anything was dead-lettered.

use std::path::Path;
use std::process::Command;

#[test]
fn the_short_fault_suite_loses_no_acknowledged_event_and_dead_letters_nothing() {
    let suite = Path::new(env!("CARGO_BIN_EXE_fault-suite"));
    let bin_dir = suite.parent().expect("the suite binary has a directory");

    // The binaries under test, built with this test's profile into the same directory. This is
    // the build `cargo test --workspace` has just made (the same packages, features and
    // profile), so there it finishes at once; under `cargo test -p fault-suite` it builds the
    // rest of the workspace. (`cargo build -p ingest -p worker` would resolve features
    // differently and rebuild both binaries, and their dependencies, every time.)
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["test", "--workspace", "--no-run", "--quiet"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    match bin_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(profile) => {
            build.args(["--profile", profile]);
        }
        None => panic!("unexpected binary directory {}", bin_dir.display()),
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building ingest and worker failed");

    let output = Command::new(suite)
        .arg("--short")
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .expect("the suite runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown by the test harness on failure, and with `--nocapture`.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the fault suite failed ({})",
        output.status
    );
    assert!(stdout.contains("| combined "), "the combined scenario ran");
}
