//! End-to-end tests: the real `ferrocorn` binary, real sockets, real signals.

mod auth;
mod chaos;
mod cli;
mod container;
mod contract;
mod cors;
mod deploy;
mod fastpath;
mod framing;
mod hostile;
mod http;
mod lifecycle;
mod mix;
mod nginx;
mod ops;
mod query;
mod sandbox;
mod support;
mod upgrade;
