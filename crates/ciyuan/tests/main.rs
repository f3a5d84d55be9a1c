//! End-to-end tests: the real `ciyuan` binary, its HTTP API and its files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod budgets;
mod clients;
mod common;
mod console;
mod crash;
mod e2e;
mod finance;
mod gateway;
mod hostile;
mod listings;
mod money;
mod pg_faults;
mod postgres;
mod reports;
mod tamper;
