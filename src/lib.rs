pub mod proto;
pub mod certs;
pub mod tls;
pub mod config;
pub mod disk;
pub mod stage;
pub mod hook;
