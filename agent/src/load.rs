//! Composite load factor (placeholder: being written).
