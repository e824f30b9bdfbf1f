//! Sidecar (to be written).
