//! Where the shipped models are found, whatever the working directory.
//!
//! The small models in the repository's `models/mnist` are the defaults of every command
//! (`dpar sample` draws with `models/mnist/dpar`). A default like that is a relative path, so
//! [`locate`] looks it up in these places, in order:
//!
//! 1. the working directory (a clone of the repository, as the README's commands run it);
//! 2. `$DPAR_HOME` (a folder that holds `models/`: a clone, or a copy of its `models` folder);
//! 3. beside the executable: `<bin>/models`, then `<bin>/../share/dpar/models` (for packagers);
//! 4. the source tree the binary was built from (so `cargo install --path .` works while the
//!    clone stays where it was built).
//!
//! Only paths under `models/` are searched this way; every other relative path (data, runs,
//! outputs) means the working directory.

use std::path::{Path, PathBuf};

/// The environment variable that names a folder holding `models/`.
pub const HOME_VAR: &str = "DPAR_HOME";

/// The folder of the shipped small models, relative to a search root.
pub const SHIPPED: &str = "models/mnist";

/// Errors of finding the shipped models.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// No search root holds the path.
    #[error("{path}: not found in any of {tried}; run from a clone of the repository, or set {HOME_VAR} to one")]
    NotFound { path: PathBuf, tried: String },
}

/// The search roots of [`locate`], in order, each with a label for messages.
pub fn search_roots() -> Vec<(String, PathBuf)> {
    let mut roots = vec![("the working directory".to_string(), PathBuf::from("."))];
    if let Some(home) = std::env::var_os(HOME_VAR).filter(|v| !v.is_empty()) {
        roots.push((format!("${HOME_VAR}"), PathBuf::from(home)));
    }
    if let Some(bin) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        roots.push(("beside the executable".to_string(), bin.clone()));
        roots.push(("the executable's ../share/dpar".to_string(), bin.join("../share/dpar")));
    }
    roots.push(("the source tree it was built from".to_string(), PathBuf::from(env!("CARGO_MANIFEST_DIR"))));
    roots
}

/// `path` itself if it exists or is not under `models/`; else the first search root that holds
/// it. An error names every place tried.
pub fn locate(path: &Path) -> Result<PathBuf, HomeError> {
    if path.is_absolute() || path.exists() || !path.starts_with("models") {
        return Ok(path.to_path_buf());
    }
    let roots = search_roots();
    for (_, root) in &roots[1..] {
        let candidate = root.join(path);
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    let tried =
        roots.iter().map(|(label, root)| format!("{label} ({})", root.display())).collect::<Vec<_>>().join(", ");
    Err(HomeError::NotFound { path: path.to_path_buf(), tried })
}

/// A shipped model's folder (`tokenizer`, `entropy`, `dpar`, `gpt`, `classifier`), located.
pub fn shipped(part: &str) -> Result<PathBuf, HomeError> {
    locate(&Path::new(SHIPPED).join(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_models_are_left_alone_and_missing_models_name_every_place() {
        assert_eq!(locate(Path::new("runs/no-such-run")).unwrap(), PathBuf::from("runs/no-such-run"));
        let err = locate(Path::new("models/no-such-model")).unwrap_err().to_string();
        assert!(
            err.contains("the working directory") && err.contains("source tree") && err.contains(HOME_VAR),
            "{err}"
        );
        // The shipped models are found through the source tree even when the working
        // directory is elsewhere (tests run in the crate root, so this also covers ".").
        assert!(shipped("dpar").unwrap().join("model.safetensors").is_file());
    }
}
