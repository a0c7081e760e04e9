//! cgroup v2 grid partition (placeholder: being written).
use std::path::{Path, PathBuf};

pub struct V2Partition {
    pub root: PathBuf,
    pub name: String,
}

impl V2Partition {
    pub fn new(root: &Path, name: &str) -> V2Partition {
        V2Partition { root: root.to_path_buf(), name: name.to_string() }
    }
}
