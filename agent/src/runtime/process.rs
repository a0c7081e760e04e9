//! Process runtime (placeholder: being written).
