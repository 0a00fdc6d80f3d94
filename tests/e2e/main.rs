//! End-to-end tests: the real `ferrocorn` binary, real sockets, real signals.

mod auth;
mod cli;
mod cors;
mod fastpath;
mod framing;
mod hostile;
mod http;
mod lifecycle;
mod nginx;
mod ops;
mod query;
mod sandbox;
mod support;
mod upgrade;
