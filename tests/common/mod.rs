//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The MNIST folder (`DPAR_MNIST_DIR`, default `data/mnist` in the repository). Tests that need
/// real digits fail with a clear message when it is missing: run `scripts/fetch-mnist`.
pub fn mnist_dir() -> PathBuf {
    let dir = std::env::var_os("DPAR_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist"));
    assert!(
        dir.join("train-images-idx3-ubyte").is_file(),
        "MNIST not found in {}: run scripts/fetch-mnist (or set DPAR_MNIST_DIR)",
        dir.display()
    );
    dir
}

/// The `dpar` binary built for this test run.
pub fn dpar() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_dpar"))
}
