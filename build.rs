//! Compiles `proto/` into Rust with a vendored `protoc`, so a fresh machine needs no system protoc.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "autokitteh/common/v1/status.proto",
    "autokitteh/connections/v1/connection.proto",
    "autokitteh/dispatcher/v1/svc.proto",
    "autokitteh/events/v1/event.proto",
    "autokitteh/events/v1/svc.proto",
    "autokitteh/integrations/v1/integration.proto",
    "autokitteh/integrations/v1/svc.proto",
    "autokitteh/module/v1/module.proto",
    "autokitteh/program/v1/program.proto",
    "autokitteh/values/v1/values.proto",
    "autokitteh/vars/v1/svc.proto",
    "autokitteh/vars/v1/var.proto",
    "zoomintegration/v1/setup_links.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    let protos: Vec<PathBuf> = PROTOS
        .iter()
        .map(|p| PathBuf::from("proto").join(p))
        .collect();
    let includes = vec![PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file("autokitteh.rs")
        .compile_with_config(config, &protos, &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
