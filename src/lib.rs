pub mod proto;
pub mod certs;
pub mod tls;
pub mod config;
