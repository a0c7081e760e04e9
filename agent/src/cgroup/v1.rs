//! cgroup v1 grid partition (placeholder: being written).
use std::path::{Path, PathBuf};

use super::CgroupError;

pub struct V1Partition {
    pub root: PathBuf,
    pub name: String,
}

impl V1Partition {
    pub fn new(root: &Path, name: &str) -> Result<V1Partition, CgroupError> {
        Ok(V1Partition { root: root.to_path_buf(), name: name.to_string() })
    }
}
