//! End-to-end tests: the real `ciyuan` binary, its HTTP API and its files.

mod common;
mod crash;
mod e2e;
mod tamper;
