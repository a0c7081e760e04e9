//! libvirt runtime (placeholder: being written).
