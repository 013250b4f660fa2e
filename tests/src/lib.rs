pub mod backend;
pub mod cluster;
pub mod daemon;
pub mod fake_patroni;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod stats_client;
