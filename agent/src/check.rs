//! Host capability check (placeholder: being written).
