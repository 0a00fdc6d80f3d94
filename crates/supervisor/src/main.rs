//! The `ferrocorn` binary: everything happens in [`ferrocorn_supervisor::main`].

/// mimalloc for everything Rust allocates (the master and the workers); DuckDB's C++ allocates
/// through its own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let code = ferrocorn_supervisor::main();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
