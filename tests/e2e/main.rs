//! End-to-end tests: the real `ferrocorn` binary, real sockets, real signals.

mod cli;
mod http;
mod lifecycle;
mod query;
mod support;
