//! Policy (placeholder: being written).
