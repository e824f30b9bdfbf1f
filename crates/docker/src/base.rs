//! The default base images, and how to make them offline from the host's own toolchains when
//! they cannot be pulled (filled in by the base-images work).
