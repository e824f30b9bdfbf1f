//! System interfaces (to be written).
