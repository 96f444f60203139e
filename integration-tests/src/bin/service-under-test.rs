//! The zoom-integration binary, built for the process-level tests.

fn main() -> std::process::ExitCode {
    zoom_integration::cli::main()
}
