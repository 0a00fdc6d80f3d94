//! The `ferrocorn` binary: everything happens in [`ferrocorn_supervisor::main`].

fn main() -> std::process::ExitCode {
    let code = ferrocorn_supervisor::main();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
