//! The mesh file's parsing and checks; each refusal with its line.

use super::*;

fn parse(text: &str) -> Result<MeshFile, MeshFileError> {
    MeshFile::parse(Path::new("trellis.toml"), text)
}

const GOOD: &str = r#"
[mesh]
ports = "7100-7299"

[[service]]
name = "usage"
instances = 2
command = ["{bin}/trellis-usage"]
database = true
depends_on = ["user"]

[[service]]
name = "user"
command = ["{bin}/trellis-user"]
database = true
"#;

#[test]
fn orders_services_after_their_dependencies() {
    let file = parse(GOOD).unwrap();
    let names: Vec<&str> = file.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["user", "usage"]);
    assert_eq!(file.services[1].instances, 2);
    assert_eq!(file.services[1].line, 5);
    assert_eq!(file.port_range(), PortRange::Range(7100, 7299));
    assert_eq!(
        file.edge_listen(),
        PortSpec::Fixed("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(file.edge_tls_listen(), None);
}

#[test]
fn the_repository_mesh_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("trellis.toml");
    let file = MeshFile::load(&path).unwrap();
    assert!(file.service("usage").is_some_and(|s| s.instances == 2));
}

fn refused(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn refuses_bad_files_with_line_and_reason() {
    let typo = refused("[[service]]\nname = \"a\"\ncommand = [\"x\"]\ninstancs = 2\n");
    assert!(
        typo.starts_with("trellis.toml:4: unknown field `instancs`"),
        "{typo}"
    );

    let syntax = refused("[[service]\nname = \"a\"\n");
    assert!(syntax.starts_with("trellis.toml:1:"), "{syntax}");

    let dep = refused("[[service]]\nname = \"a\"\ncommand = [\"x\"]\ndepends_on = [\"nope\"]\n");
    assert!(dep.contains(":4:") && dep.contains("\"nope\""), "{dep}");

    let cycle = refused(
        "[[service]]\nname = \"a\"\ncommand = [\"x\"]\ndepends_on = [\"b\"]\n\
         [[service]]\nname = \"b\"\ncommand = [\"x\"]\ndepends_on = [\"a\"]\n",
    );
    assert!(cycle.contains("cycle: a, b"), "{cycle}");

    let twice = refused(
        "[[service]]\nname = \"a\"\ncommand = [\"x\"]\n[[service]]\nname = \"a\"\ncommand = [\"y\"]\n",
    );
    assert!(
        twice.contains(":5:") && twice.contains("first on line 1"),
        "{twice}"
    );

    let empty = refused("[[service]]\nname = \"a\"\ncommand = []\n");
    assert!(
        empty.contains(":3:") && empty.contains("command is empty"),
        "{empty}"
    );

    let many = refused("[[service]]\nname = \"a\"\ncommand = [\"x\"]\ninstances = 500\n");
    assert!(many.contains(":4:") && many.contains("1 to 32"), "{many}");

    let ports = refused("[mesh]\nports = \"9000\"\n[[service]]\nname = \"a\"\ncommand = [\"x\"]\n");
    assert!(
        ports.contains(":2:") && ports.contains("not a range"),
        "{ports}"
    );

    let edge =
        refused("[edge]\nlisten = \"localhost\"\n[[service]]\nname = \"a\"\ncommand = [\"x\"]\n");
    assert!(
        edge.contains(":2:") && edge.contains("not an address"),
        "{edge}"
    );

    let reserved = refused("[[service]]\nname = \"edge\"\ncommand = [\"x\"]\n");
    assert!(reserved.contains("taken by the mesh"), "{reserved}");

    let upper = refused("[[service]]\nname = \"User\"\ncommand = [\"x\"]\n");
    assert!(upper.contains("lowercase"), "{upper}");

    assert!(refused("").contains("no [[service]]"));
}

// ---- Several versions of one service.

/// A canary: echo v1 (two instances, zone a) and echo v2 (one, another
/// command), with a client listed between them that depends on echo.
const CANARY: &str = r#"
[[service]]
name = "echo"
version = "v1"
zone = "a"
instances = 2
command = ["{bin}/trellis-echo"]

[[service]]
name = "client"
command = ["{bin}/client"]
depends_on = ["echo"]

[[service]]
name = "echo"
version = "v2"
command = ["{bin}/trellis-echo-next", "--fast"]
sidecar_args = ["--grpc-services", "trellis.echo.v1.EchoService"]
"#;

#[test]
fn two_versions_of_one_service_are_one_service_with_two_entries() {
    let file = parse(CANARY).unwrap();
    let order: Vec<String> = file.services.iter().map(ServiceSpec::label).collect();
    // The client waits for every version of echo.
    assert_eq!(order, ["echo v1", "echo v2", "client"]);
    assert_eq!(file.service_names(), ["echo", "client"]);
    let echo: Vec<&ServiceSpec> = file.entries("echo").collect();
    assert_eq!(echo.len(), 2);
    assert_eq!(
        (echo[0].version.as_deref(), echo[0].zone.as_deref()),
        (Some("v1"), Some("a"))
    );
    assert_eq!(
        (echo[1].version.as_deref(), echo[1].zone.as_deref()),
        (Some("v2"), None)
    );
    assert_eq!(echo[1].command, ["{bin}/trellis-echo-next", "--fast"]);
    assert_eq!(echo[1].line, 14);
    assert_eq!(echo[0].instance_names(), ["echo-v1-1", "echo-v1-2"]);
    assert_eq!(echo[1].instance_names(), ["echo-v2"]);
    assert_eq!(file.service("client").unwrap().instance_names(), ["client"]);
}

#[test]
fn versions_are_made_safe_for_instance_names() {
    let file = parse(
        "[[service]]\nname = \"a\"\nversion = \"2.0/rc:1\"\ninstances = 2\ncommand = [\"x\"]\n",
    )
    .unwrap();
    assert_eq!(
        file.services[0].instance_names(),
        ["a-2.0_rc_1-1", "a-2.0_rc_1-2"]
    );
    // The version itself is registered as written.
    assert_eq!(file.services[0].version.as_deref(), Some("2.0/rc:1"));
}

#[test]
fn one_name_twice_without_distinct_versions_is_refused_with_the_fix() {
    let neither = refused(
        "[[service]]\nname = \"a\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"a\"\ncommand = [\"y\"]\n",
    );
    assert!(
        neither.starts_with("trellis.toml:5: service \"a\" is listed twice (first on line 1)")
            && neither.contains("give each entry a distinct `version`"),
        "{neither}"
    );

    let one = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"a\"\ncommand = [\"y\"]\n",
    );
    assert!(
        one.starts_with("trellis.toml:6: service \"a\" is listed twice (first on line 1)")
            && one.contains("distinct `version`"),
        "{one}"
    );

    let same = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"y\"]\n",
    );
    assert!(
        same.starts_with(
            "trellis.toml:7: service \"a\" has version \"v1\" twice (first on line 1)"
        ) && same.contains("distinct `version`"),
        "{same}"
    );
}

#[test]
fn bad_versions_and_zones_are_refused_where_they_are() {
    for (bad, shown) in [
        ("\"v 2\"", "\"v 2\""),
        ("\"\"", "\"\""),
        ("\"vé\"", "\"vé\""),
    ] {
        let e = refused(&format!(
            "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nversion = {bad}\n"
        ));
        assert!(
            e.starts_with(&format!("trellis.toml:4: service \"a\": version {shown} must be 1 to 64 printable ASCII characters without spaces")),
            "{e}"
        );
    }
    let long = refused(&format!(
        "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nversion = \"{}\"\n",
        "v".repeat(65)
    ));
    assert!(long.contains(":4:") && long.contains("1 to 64"), "{long}");
    assert!(
        parse(&format!(
            "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nversion = \"{}\"\n",
            "v".repeat(64)
        ))
        .is_ok()
    );

    let zone = refused("[[service]]\nname = \"a\"\ncommand = [\"x\"]\n\nzone = \"eu west\"\n");
    assert!(
        zone.starts_with("trellis.toml:5: service \"a\": zone \"eu west\" must be"),
        "{zone}"
    );
    let number = refused("[[service]]\nname = \"a\"\ncommand = [\"x\"]\nversion = 2\n");
    assert!(number.starts_with("trellis.toml:4:"), "{number}");
}

#[test]
fn entries_of_one_service_must_agree_on_the_database() {
    let explicit = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\ndatabase = true\n\
         [[service]]\nname = \"a\"\nversion = \"v2\"\ncommand = [\"y\"]\ndatabase = false\n",
    );
    assert!(
        explicit.starts_with(
            "trellis.toml:10: service \"a\" has database = false here but database = true on line 1"
        ) && explicit.contains("give each the same `database`"),
        "{explicit}"
    );
    // Left out, it is false; the message points at the entry.
    let left_out = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\ndatabase = true\n\
         [[service]]\nname = \"a\"\nversion = \"v2\"\ncommand = [\"y\"]\n",
    );
    assert!(
        left_out.starts_with("trellis.toml:6: service \"a\" has database = false"),
        "{left_out}"
    );
    let agreed = parse(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\ndatabase = true\n\
         [[service]]\nname = \"a\"\nversion = \"v2\"\ncommand = [\"y\"]\ndatabase = true\n",
    )
    .unwrap();
    assert!(agreed.entries("a").all(|s| s.database));
}

#[test]
fn versions_and_zones_are_keys_not_sidecar_args() {
    for flag in ["\"--service-version\", \"v2\"", "\"--zone=a\""] {
        let e = refused(&format!(
            "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nsidecar_args = [{flag}]\n"
        ));
        assert!(
            e.starts_with("trellis.toml:4: service \"a\": sidecar_args gives --")
                && e.contains("in the [[service]] entry instead"),
            "{e}"
        );
    }
}

#[test]
fn instance_names_that_clash_are_refused() {
    // Pre-existing, and still refused: usage's second instance.
    let numbered = refused(
        "[[service]]\nname = \"usage\"\ninstances = 2\ncommand = [\"x\"]\n\
         [[service]]\nname = \"usage-1\"\ncommand = [\"x\"]\n",
    );
    assert!(
        numbered.starts_with("trellis.toml:6: service \"usage-1\": an instance would be named \"usage-1\", as an instance of service \"usage\" (line 1) is"),
        "{numbered}"
    );
    // A version that reads as another service.
    let versioned = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"a-v1\"\ncommand = [\"x\"]\n",
    );
    assert!(
        versioned.contains(":6:") && versioned.contains("service \"a\" version \"v1\""),
        "{versioned}"
    );
    // Two versions that are made the same name.
    let unsafe_chars = refused(
        "[[service]]\nname = \"a\"\nversion = \"v/1\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"a\"\nversion = \"v:1\"\ncommand = [\"x\"]\n",
    );
    assert!(
        unsafe_chars.contains(":6:") && unsafe_chars.contains("\"a-v_1\""),
        "{unsafe_chars}"
    );
    // A sidecar's name.
    let sidecar = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"a\"\nversion = \"v1-proxy\"\ncommand = [\"x\"]\n",
    );
    assert!(
        sidecar.contains(
            "an instance would be named \"a-v1-proxy\", as the sidecar of an instance of service \"a\" version \"v1\" (line 1) is"
        ),
        "{sidecar}"
    );
    // The mesh's own processes.
    let own = refused("[[service]]\nname = \"edge-tls\"\ncommand = [\"x\"]\n");
    assert!(own.contains("the mesh's own edge-tls process"), "{own}");
}

#[test]
fn a_cycle_names_each_service_once() {
    let cycle = refused(
        "[[service]]\nname = \"a\"\nversion = \"v1\"\ncommand = [\"x\"]\ndepends_on = [\"b\"]\n\
         [[service]]\nname = \"a\"\nversion = \"v2\"\ncommand = [\"x\"]\n\
         [[service]]\nname = \"b\"\ncommand = [\"x\"]\ndepends_on = [\"a\"]\n",
    );
    assert!(cycle.contains("cycle: a, b"), "{cycle}");
}

#[test]
fn registry_replicas_need_an_etcd_store() {
    let service = "[[service]]\nname = \"a\"\ncommand = [\"x\"]\n";
    let no_store = refused(&format!("[registry]\nreplicas = 2\n{service}"));
    assert!(
        no_store.starts_with("trellis.toml:2:") && no_store.contains("needs a shared store"),
        "{no_store}"
    );
    let too_many = refused(&format!(
        "[registry]\nstore = \"etcd://127.0.0.1:2379\"\nreplicas = 9\n{service}"
    ));
    assert!(
        too_many.starts_with("trellis.toml:3:") && too_many.contains("1 to 5"),
        "{too_many}"
    );
    let scheme = refused(&format!(
        "[registry]\nstore = \"http://127.0.0.1:2379\"\n{service}"
    ));
    assert!(
        scheme.starts_with("trellis.toml:2:") && scheme.contains("etcd://"),
        "{scheme}"
    );
    let file = parse(&format!(
        "[registry]\nstore = \"etcd://127.0.0.1:2379\"\nreplicas = 2\n{service}"
    ))
    .unwrap();
    assert_eq!(*file.registry.replicas.get_ref(), 2);
}
