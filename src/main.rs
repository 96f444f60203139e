//! The `zoom-integration` binary. Everything lives in the library; see `cli::main`.

fn main() -> std::process::ExitCode {
    zoom_integration::cli::main()
}
