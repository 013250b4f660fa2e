#![no_std]
// Intentionally empty: aya-build needs a library target to depend on; the programs are in main.rs.
