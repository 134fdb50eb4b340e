//! Compiles etcd's v3 API (`etcd-proto/`, see its README) into tonic client
//! stubs for the etcd store. `protox` parses the files, so no system
//! `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "etcd-proto";
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::Compiler::new([root])?
        .include_imports(true)
        .open_files(["etcd/api/etcdserverpb/rpc.proto"])?
        .file_descriptor_set();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .include_file("_etcd.rs")
        .out_dir(&out_dir)
        .compile_fds(fds)?;
    Ok(())
}
