//! The `ferrocorn` binary: everything happens in [`ferrocorn_supervisor::main`].

/// mimalloc for everything Rust allocates (the master and the workers). Its `override` feature
/// also puts it in place of malloc, so DuckDB's C++ allocations use it too: glibc's malloc was a
/// fifth of a worker's time under point lookups (docs/design.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let code = ferrocorn_supervisor::main();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
