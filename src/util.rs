//! Small shared helpers: atomic file writes, hashing, seeded RNG streams and progress bars.
//!
//! Every file this crate writes for a user (checkpoints, shards, PNGs, JSON) goes through
//! [`write_atomic`]: the bytes land in a temporary file beside the target, which is then renamed
//! over it, so an interrupted run never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::Digest;

/// Errors of the utility helpers.
#[derive(Debug, thiserror::Error)]
pub enum UtilError {
    /// A file could not be written, renamed or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, UtilError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> UtilError + '_ {
    move |source| UtilError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, then rename.
/// Creates the parent folder if needed. On any error the temporary file is removed, so a failed
/// write (a full disk, say) leaves nothing behind; one left by a killed process is removed by
/// [`remove_stale_temp_files`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
    }
    let tmp = temp_path(path, std::process::id());
    let written = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The temporary file [`write_atomic`] uses for `path` in process `pid`: `.NAME.PID.tmp`.
pub(crate) fn temp_path(path: &Path, pid: u32) -> PathBuf {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{file_name}.{pid}.tmp"))
}

/// Whether process `pid` is alive (on Unix; elsewhere every process is assumed alive).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary files [`write_atomic`] left in `dir` when its process was killed
/// (`.NAME.PID.tmp` whose PID no longer runs). Returns what was removed.
pub fn remove_stale_temp_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Tunes the process for tensor work; call once at start-up.
///
/// glibc serves allocations above 128 KiB with a fresh `mmap` and returns them with `munmap`, so
/// every activation buffer of a training step costs page faults and kernel zeroing (15 % of a
/// tokenizer step here). Raising the thresholds keeps freed buffers in the heap for reuse.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// The most memory one allocation asked for by a file or a config may take, in bytes: the
/// `DPAR_MEMORY_BUDGET` environment variable if set, else the machine's total memory
/// (`/proc/meminfo`), else 64 GiB. Sizes read from headers and configs are checked against it
/// before anything is allocated, so an absurd one is an error instead of an abort.
pub fn memory_budget() -> u64 {
    if let Some(v) = std::env::var("DPAR_MEMORY_BUDGET").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return v;
    }
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kb.checked_mul(1024)
        })
        .unwrap_or(64 << 30)
}

/// Refuses `bytes` (an estimate, as f64 so that absurd sizes cannot overflow) beyond
/// [`memory_budget`]; `what` names the flag, setting or file that asks for it.
pub fn check_memory(what: &str, bytes: f64) -> std::result::Result<(), String> {
    let budget = memory_budget() as f64;
    if bytes <= budget {
        return Ok(());
    }
    let gib = |b: f64| {
        if b < 1e6 * (1u64 << 30) as f64 {
            format!("{:.1} GiB", b / (1u64 << 30) as f64)
        } else {
            format!("{b:.2e} bytes")
        }
    };
    Err(format!("{what} needs about {} of memory, more than the budget of {} (the machine's memory; DPAR_MEMORY_BUDGET sets another)", gib(bytes), gib(budget)))
}

/// `value` as a `T`, refusing keys that `T` does not know, so that a misspelt or foreign
/// setting in a config file is an error instead of being silently ignored. The known keys are
/// those `T` writes back (serialising the parsed value); `tolerated` names keys that `T` reads
/// but does not always write (settings of earlier versions, empty lists). The error names every
/// unknown key by its dotted path.
pub fn from_json_strict<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: serde_json::Value,
    tolerated: &[&str],
) -> std::result::Result<T, String> {
    let parsed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let known = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    unknown_keys(&value, &known, "", tolerated, &mut unknown);
    match unknown.len() {
        0 => Ok(parsed),
        1 => Err(format!("unknown key `{}`", unknown[0])),
        _ => Err(format!("unknown keys {}", unknown.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))),
    }
}

fn unknown_keys(
    given: &serde_json::Value,
    known: &serde_json::Value,
    at: &str,
    tolerated: &[&str],
    out: &mut Vec<String>,
) {
    let (Some(given), Some(known)) = (given.as_object(), known.as_object()) else { return };
    for (key, value) in given {
        let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
        match known.get(key) {
            Some(k) => unknown_keys(value, k, &path, tolerated, out),
            None if tolerated.contains(&key.as_str()) => {}
            None => out.push(path),
        }
    }
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(sha256_hex(&bytes))
}

/// FNV-1a hash of a string: a stable, platform-independent way to derive sub-seeds from names.
pub fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A deterministic RNG for one purpose (`stream`, e.g. "dropout") at one point of a run
/// (`index`, e.g. the step). Deriving every random stream from `(seed, stream, index)` makes the
/// RNG state of a run a pure function of its seed and step, so resuming needs no RNG snapshot.
pub fn rng_for(seed: u64, stream: &str, index: u64) -> ChaCha8Rng {
    let mixed = seed ^ fnv1a(stream).rotate_left(17) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ChaCha8Rng::seed_from_u64(mixed)
}

/// A progress bar with the crate's style: position, rate, ETA and a free-form message.
/// Hidden automatically when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template =
        format!("{what} {{bar:30.cyan/blue}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Formats a duration in seconds as `1h02m03s` / `2m03s` / `4.5s`.
pub fn human_duration(seconds: f64) -> String {
    if seconds >= 3600.0 {
        let s = seconds as u64;
        format!("{}h{:02}m{:02}s", s / 3600, (s % 3600) / 60, s % 60)
    } else if seconds >= 60.0 {
        let s = seconds as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{seconds:.1}s")
    }
}

/// Appends one line to a file (JSONL logs). Creates the file if needed.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
    writeln!(file, "{line}").map_err(io_err(path))
}

/// The median of a slice (NaN for an empty slice).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    }
}

/// Serde for f64 values that may be infinite: JSON has no ±∞, so they are written as the
/// strings `"inf"` / `"-inf"`; finite values stay numbers.
pub mod serde_f64_inf {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("nan")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(v) => Ok(v),
            NumOrStr::Str(s) => match s.to_ascii_lowercase().as_str() {
                "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
                "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => other.parse::<f64>().map_err(serde::de::Error::custom),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("file.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["file.txt".to_string()]);
    }

    #[test]
    fn strict_json_names_unknown_keys_at_any_depth_and_tolerates_the_listed_ones() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Inner {
            a: u32,
        }
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Outer {
            inner: Inner,
            b: Option<u32>,
        }
        let ok: Outer =
            from_json_strict(serde_json::json!({ "inner": { "a": 1 }, "b": null, "old": 3 }), &["old"]).unwrap();
        assert_eq!(ok, Outer { inner: Inner { a: 1 }, b: None });
        let err =
            from_json_strict::<Outer>(serde_json::json!({ "inner": { "a": 1, "aa": 2 }, "c": 1 }), &[]).unwrap_err();
        assert!(err.contains("`inner.aa`") && err.contains("`c`"), "{err}");
        assert!(from_json_strict::<Outer>(serde_json::json!({ "inner": {} }), &[])
            .unwrap_err()
            .contains("missing field"));
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_and_stale_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a folder: the rename fails after the temporary file was written.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"data").is_err());
        let leftovers = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                .count()
        };
        assert_eq!(leftovers(dir.path()), 0);
        // A killed process's temporary (a pid that does not run) is removed; a live one is kept.
        let dead = dir.path().join(".checkpoint.safetensors.4194302.tmp");
        let live = temp_path(&dir.path().join("model.safetensors"), std::process::id());
        std::fs::write(&dead, b"partial").unwrap();
        std::fs::write(&live, b"being written").unwrap();
        assert!(!process_alive(4_194_302));
        assert_eq!(remove_stale_temp_files(dir.path()), vec![dead]);
        assert!(live.is_file());
    }

    #[test]
    fn rng_streams_are_reproducible_and_distinct() {
        let a: u64 = rng_for(7, "dropout", 3).random();
        let b: u64 = rng_for(7, "dropout", 3).random();
        let c: u64 = rng_for(7, "dropout", 4).random();
        let d: u64 = rng_for(7, "data", 3).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn sha256_matches_a_known_digest() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn median_of_even_and_odd_lengths() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
