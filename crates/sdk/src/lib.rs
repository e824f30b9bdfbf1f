//! The Rust SDK for Testground test plans (being written).
