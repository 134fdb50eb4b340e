//! The contracts in proto/ pass `buf lint` (STANDARD and COMMENTS rules) and
//! generate importable Python stubs with grpcio-tools: what a team in
//! another language would do with them. The checks live in
//! scripts/check-protos.sh so they can be run by hand too.

use std::process::Command;

#[test]
fn protos_lint_and_generate_python_stubs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/check-protos.sh"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/check-protos.sh failed (run scripts/test, which installs buf and grpcio-tools):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("buf lint ok"), "{stdout}");
}

#[test]
fn descriptor_set_holds_every_service_with_comments() {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap();
    let services: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect();
    for expected in [
        "trellis.registry.v1.RegistryService",
        "trellis.config.v1.ConfigService",
        "trellis.events.v1.EventSubscriberService",
        "telco.user.v1.UserService",
        "telco.usage.v1.UsageService",
        "telco.settlement.v1.SettlementService",
    ] {
        assert!(services.iter().any(|s| s == expected), "{expected} missing");
    }
    // Imports (well-known types) are included, so reflection can serve them.
    assert!(
        set.file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto")
    );
    // Source info is kept, so reflection clients can show the comments.
    let usage = set
        .file
        .iter()
        .find(|f| f.package() == "telco.usage.v1")
        .unwrap();
    assert!(
        usage
            .source_code_info
            .as_ref()
            .is_some_and(|i| !i.location.is_empty())
    );
}
