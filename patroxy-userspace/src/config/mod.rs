//! Configuration: raw TOML (`raw`), validated typed values (`model`).
mod model;
pub use model::*;
