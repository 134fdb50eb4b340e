//! Compiles every contract under `proto/` into Rust with tonic-prost-build.
//!
//! The .proto files are parsed by `protox` (pure Rust), so no system `protoc`
//! is needed. The full descriptor set, with source comments and all imports
//! (well-known types included), is written to `OUT_DIR/trellis_descriptor.bin`
//! for server reflection and for registering contracts with the registry.

use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(proto_root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let relative: Vec<PathBuf> = files
        .iter()
        .map(|f| f.strip_prefix(proto_root).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;
    let fds = protox::Compiler::new([proto_root])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(relative)?
        .file_descriptor_set();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("trellis_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("_includes.rs")
        // Type names let events carry a payload as `google.protobuf.Any`
        // and be checked against the type their topic calls for.
        .compile_fds_with_config(fds, {
            let mut config = prost_build::Config::new();
            config
                .enable_type_names()
                .type_name_domain(["."], "type.googleapis.com");
            config
        })?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
