//! Userspace network emulator core (to be written).
