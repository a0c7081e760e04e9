//! Splitting (being written).
