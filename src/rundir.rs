//! Run folders that protect themselves.
//!
//! A training run owns its folder for as long as it runs: [`RunLock`] takes an exclusive OS lock
//! (`flock`) on `<run>/.lock`, so a second process aimed at the same folder is refused with the
//! first one's pid instead of interleaving its log and overwriting its checkpoint. A fresh start
//! ([`Start::Fresh`]) in a folder that already holds a run is refused, naming `--resume` and
//! `--overwrite`; [`Start::Overwrite`] removes the old run's files first. Temporary files left by
//! a killed process are removed when the next run takes the folder.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Errors of taking a run folder.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// Another process holds the folder.
    #[error("{path}: another run is using this folder (pid {pid}); wait for it to finish or choose another --out")]
    Locked { path: PathBuf, pid: String },
    /// A fresh start would overwrite an existing run.
    #[error("{path} already holds a run{at}; continue it with --resume, or start over with --overwrite (which deletes its checkpoint, log and snapshots)")]
    Exists { path: PathBuf, at: String },
    /// The folder or its lock file cannot be used.
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, RunDirError>;

/// How a run treats what its folder already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Start at step 0; refused when the folder already holds a run.
    Fresh,
    /// Continue from the folder's checkpoint (or start at step 0 when there is none).
    Resume,
    /// Delete the folder's run and start at step 0.
    Overwrite,
}

impl From<bool> for Start {
    /// `true` is [`Start::Resume`], `false` [`Start::Fresh`] (the `--resume` flag).
    fn from(resume: bool) -> Self {
        if resume {
            Start::Resume
        } else {
            Start::Fresh
        }
    }
}

/// The files of a run that a fresh start would clobber.
const RUN_FILES: [&str; 5] = ["checkpoint.safetensors", "model.safetensors", "log.jsonl", "config.json", "loss.png"];

/// An exclusive lock on a run folder, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Creates `dir` if needed and locks it, or names the pid that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let io = |reason: String| RunDirError::Io { path: dir.to_path_buf(), reason };
        std::fs::create_dir_all(dir).map_err(|e| io(format!("cannot create the folder: {e}")))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(format!("cannot open {}: {e}", path.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns; it only sets an advisory
            // lock that the kernel drops when the descriptor is closed.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(RunDirError::Locked {
                    path: dir.to_path_buf(),
                    pid: if pid.is_empty() { "unknown".into() } else { pid.to_string() },
                });
            }
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .and_then(|_| file.flush())
            .map_err(|e| io(format!("cannot write {}: {e}", path.display())))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether `dir` holds a run (a checkpoint, weights or a log), and the step of its checkpoint.
pub fn existing_run(dir: &Path) -> Option<Option<u64>> {
    let held = RUN_FILES.iter().take(3).any(|f| dir.join(f).is_file());
    held.then(|| {
        crate::tensor_io::read_safetensors_metadata(&dir.join("checkpoint.safetensors"))
            .ok()
            .and_then(|m| m.get("step").and_then(|s| s.parse().ok()))
    })
}

/// Prepares a locked run folder for `start`: refuses a fresh start over an existing run, removes
/// the old run for an overwrite, and removes temporary files left by killed processes.
pub fn prepare(dir: &Path, _lock: &RunLock, start: Start) -> Result<()> {
    // The run folder and its weight snapshots, the two places the loop writes.
    for folder in [dir.to_path_buf(), dir.join("snapshots")] {
        for stale in crate::util::remove_stale_temp_files(&folder) {
            tracing::warn!("removed {}, left by an interrupted write", stale.display());
        }
    }
    match (start, existing_run(dir)) {
        (Start::Fresh, Some(step)) => Err(RunDirError::Exists {
            path: dir.to_path_buf(),
            at: step.map(|s| format!(" (checkpoint at step {s})")).unwrap_or_default(),
        }),
        (Start::Overwrite, Some(_)) => {
            let io = |e: std::io::Error| RunDirError::Io {
                path: dir.to_path_buf(),
                reason: format!("cannot remove the old run: {e}"),
            };
            for f in RUN_FILES {
                let p = dir.join(f);
                if p.is_file() {
                    std::fs::remove_file(&p).map_err(io)?;
                }
            }
            let snapshots = dir.join("snapshots");
            if snapshots.is_dir() {
                std::fs::remove_dir_all(&snapshots).map_err(io)?;
            }
            tracing::warn!("--overwrite: removed the earlier run in {}", dir.display());
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process killed while writing a weight snapshot leaves `.model-step….tmp` in
    /// `snapshots/`; the next start removes it as it does in the run folder.
    #[test]
    fn a_start_removes_stale_temporaries_of_the_run_and_its_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("snapshots")).unwrap();
        let stale = [
            dir.path().join(".checkpoint.safetensors.4194302.tmp"),
            dir.path().join("snapshots/.model-step0000004.safetensors.4194302.tmp"),
        ];
        for f in &stale {
            std::fs::write(f, b"partial").unwrap();
        }
        let lock = RunLock::acquire(dir.path()).unwrap();
        prepare(dir.path(), &lock, Start::Resume).unwrap();
        assert!(stale.iter().all(|f| !f.exists()));
    }

    #[test]
    fn a_locked_folder_is_refused_with_the_holders_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        assert!(RunLock::acquire(dir.path()).is_ok());
    }

    #[test]
    fn a_fresh_start_over_a_run_is_refused_and_overwrite_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        prepare(dir.path(), &lock, Start::Fresh).unwrap();
        std::fs::write(dir.path().join("log.jsonl"), "{\"step\":1}\n").unwrap();
        std::fs::create_dir(dir.path().join("snapshots")).unwrap();
        let err = prepare(dir.path(), &lock, Start::Fresh).unwrap_err().to_string();
        assert!(err.contains("--resume") && err.contains("--overwrite"), "{err}");
        prepare(dir.path(), &lock, Start::Resume).unwrap();
        assert!(dir.path().join("log.jsonl").is_file());
        prepare(dir.path(), &lock, Start::Overwrite).unwrap();
        assert!(!dir.path().join("log.jsonl").exists() && !dir.path().join("snapshots").exists());
        prepare(dir.path(), &lock, Start::Fresh).unwrap();
    }
}
