//! The `barge` binary's own code: its arguments (which only parse), the commands that
//! turn them into work, and the demo.

mod args;
pub mod commands;
pub mod demo;

pub use args::*;
