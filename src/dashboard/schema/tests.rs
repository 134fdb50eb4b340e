use prost::Message as _;
use prost_reflect::prost_types::{
    DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    MethodDescriptorProto, OneofDescriptorProto, ServiceDescriptorProto,
    field_descriptor_proto::{Label, Type},
};
use serde_json::{Value, json};

use super::*;

/// The repository's contracts, one serialized file each, as the registry
/// hands them out.
fn repo_files() -> Vec<Vec<u8>> {
    FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
        .unwrap()
        .file
        .iter()
        .map(|f| f.encode_to_vec())
        .collect()
}

fn repo_pool() -> DescriptorPool {
    pool_from_files(&repo_files()).unwrap()
}

fn form_for(pool: &DescriptorPool, method: &str) -> Value {
    method_form(&find_method(pool, method).unwrap())
}

fn field<'a>(form: &'a Value, message: &str, json_name: &str) -> &'a Value {
    form["messages"][message]["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("{message} not in the form: {form:#}"))
        .iter()
        .find(|f| f["json"] == json_name)
        .unwrap_or_else(|| panic!("{message} has no field {json_name}"))
}

#[test]
fn create_user_lists_its_string_fields_with_their_comments() {
    let form = form_for(&repo_pool(), "telco.user.v1.UserService/CreateUser");
    assert_eq!(form["method"], "telco.user.v1.UserService/CreateUser");
    assert_eq!(form["input"], "telco.user.v1.CreateUserRequest");
    assert_eq!(form["output"], "telco.user.v1.CreateUserResponse");
    assert_eq!(form["supported"], true);
    assert_eq!(form["unsupported_reason"], Value::Null);
    assert_eq!(form["client_streaming"], false);
    assert_eq!(form["server_streaming"], false);
    assert!(
        form["doc"]
            .as_str()
            .unwrap()
            .starts_with("CreateUser creates a user.")
    );

    let fields = form["messages"]["telco.user.v1.CreateUserRequest"]["fields"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = fields.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["msisdn", "name", "email"]);
    let msisdn = &fields[0];
    assert_eq!(
        *msisdn,
        json!({
            "name": "msisdn", "json": "msisdn", "number": 1, "kind": "string",
            "type": null, "repeated": false, "map": null, "oneof": null, "optional": false,
            "doc": "Phone number in E.164 format, e.g. \"+4915112345678\". Required, unique.",
        })
    );
    // Only the input's types: the response's User is not part of the form.
    assert_eq!(form["messages"].as_object().unwrap().len(), 1);
    assert_eq!(form["enums"], json!({}));
}

#[test]
fn record_usage_has_an_enum_an_int64_and_a_timestamp() {
    let form = form_for(&repo_pool(), "telco.usage.v1.UsageService/RecordUsage");
    let input = "telco.usage.v1.RecordUsageRequest";
    let kind = field(&form, input, "type");
    assert_eq!(kind["kind"], "enum");
    assert_eq!(kind["type"], "telco.usage.v1.UsageType");
    assert_eq!(
        form["enums"]["telco.usage.v1.UsageType"],
        json!([
            {"name": "USAGE_TYPE_UNSPECIFIED", "number": 0},
            {"name": "USAGE_TYPE_DATA", "number": 1},
            {"name": "USAGE_TYPE_VOICE", "number": 2},
            {"name": "USAGE_TYPE_SMS", "number": 3},
        ])
    );
    assert_eq!(field(&form, input, "quantity")["kind"], "int64");
    let occurred = field(&form, input, "occurredAt");
    assert_eq!(occurred["name"], "occurred_at");
    assert_eq!(occurred["kind"], "wkt");
    assert_eq!(occurred["type"], "google.protobuf.Timestamp");
    // Well-known types are one input each, not expanded.
    assert!(form["messages"].get("google.protobuf.Timestamp").is_none());
}

#[test]
fn nested_messages_maps_and_well_known_types_are_described_by_name() {
    let pool = repo_pool();
    let form = form_for(&pool, "trellis.events.v1.EventSubscriberService/Deliver");
    let event = field(&form, "trellis.events.v1.DeliverRequest", "event");
    assert_eq!(event["kind"], "message");
    assert_eq!(event["type"], "trellis.events.v1.Event");
    let payload = field(&form, "trellis.events.v1.Event", "payload");
    assert_eq!(
        (&payload["kind"], &payload["type"]),
        (&json!("wkt"), &json!("google.protobuf.Any"))
    );
    assert_eq!(
        field(&form, "trellis.events.v1.Event", "sequence")["kind"],
        "uint64"
    );

    let form = form_for(&pool, "trellis.registry.v1.RegistryService/Register");
    let input = "trellis.registry.v1.RegisterRequest";
    let metadata = field(&form, input, "metadata");
    assert_eq!(metadata["kind"], "map");
    assert_eq!(metadata["repeated"], false);
    assert_eq!(
        metadata["map"],
        json!({"key": {"kind": "string", "type": null}, "value": {"kind": "string", "type": null}})
    );
    let services = field(&form, input, "grpcServices");
    assert_eq!(
        (&services["kind"], &services["repeated"]),
        (&json!("string"), &json!(true))
    );
    assert_eq!(field(&form, input, "fileDescriptors")["kind"], "bytes");
    assert_eq!(
        field(&form, input, "leaseTtl")["type"],
        "google.protobuf.Duration"
    );
    assert!(form["enums"]["trellis.registry.v1.ServingStatus"].is_array());
}

#[test]
fn client_streaming_methods_are_refused_with_what_to_use_instead() {
    let pool = repo_pool();
    let form = form_for(&pool, "trellis.registry.v1.RegistryService/KeepAlive");
    assert_eq!(form["client_streaming"], true);
    assert_eq!(form["server_streaming"], true);
    assert_eq!(form["supported"], false);
    let reason = form["unsupported_reason"].as_str().unwrap();
    assert!(reason.contains("grpcurl -d @"), "{reason}");
    assert_eq!(reason, CLIENT_STREAMING_REASON);

    let form = form_for(&pool, "trellis.echo.v1.EchoService/Collect");
    assert_eq!(form["supported"], false);
}

#[test]
fn server_streaming_methods_are_supported() {
    let form = form_for(&repo_pool(), "telco.usage.v1.UsageService/ListUsage");
    assert_eq!(form["server_streaming"], true);
    assert_eq!(form["client_streaming"], false);
    assert_eq!(form["supported"], true);
}

#[test]
fn method_list_names_every_method_and_keeps_services_without_a_contract() {
    let pool = repo_pool();
    let list = method_list(
        &pool,
        &["telco.usage.v1.UsageService".into(), "acme.Missing".into()],
    );
    assert_eq!(list.len(), 2);
    assert!(list[0].described);
    let names: Vec<&str> = list[0].methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["RecordUsage", "ListUsage", "GetUsageSummary"]);
    assert_eq!(
        list[0].methods[1].path,
        "telco.usage.v1.UsageService/ListUsage"
    );
    assert!(list[0].methods[1].server_streaming);
    assert!(!list[0].methods[1].client_streaming);
    assert_eq!(
        list[1],
        ServiceMethods {
            service: "acme.Missing".into(),
            described: false,
            methods: vec![]
        }
    );
}

#[test]
fn find_method_says_what_is_missing() {
    let pool = repo_pool();
    assert!(find_method(&pool, "/telco.user.v1.UserService/GetUser").is_ok());
    let err = find_method(&pool, "telco.user.v1.UserService/Nope").unwrap_err();
    assert_eq!(err, "service telco.user.v1.UserService has no method Nope");
    let err = find_method(&pool, "acme.Svc/Do").unwrap_err();
    assert!(err.contains("acme.Svc"), "{err}");
    assert!(
        find_method(&pool, "GetUser")
            .unwrap_err()
            .contains("package.Service/Method")
    );
}

#[test]
fn check_body_accepts_proto3_json() {
    let pool = repo_pool();
    let method = find_method(&pool, "telco.usage.v1.UsageService/RecordUsage").unwrap();
    let body = json!({
        "userId": "9b2f0c1e-0000-4000-8000-000000000001",
        "type": "USAGE_TYPE_DATA",
        "quantity": "1500",
        "occurred_at": "2026-12-02T10:00:00Z",
        "idempotencyKey": "cdr-1",
    });
    check_body(&method, &body).unwrap();
    check_body(&method, &json!({})).unwrap();
}

#[test]
fn check_body_names_the_field_that_does_not_fit() {
    let pool = repo_pool();
    let method = find_method(&pool, "telco.usage.v1.UsageService/RecordUsage").unwrap();

    let err = check_body(&method, &json!({"quantity": "12x"})).unwrap_err();
    assert!(err.starts_with("quantity: "), "{err}");
    assert!(err.ends_with("(sent \"12x\")"), "{err}");
    let err = check_body(&method, &json!({"quantity": 1, "bogus": 1})).unwrap_err();
    assert_eq!(
        err,
        "unrecognized field name 'bogus': telco.usage.v1.RecordUsageRequest has no such field; \
         its fields are userId, type, quantity, occurredAt, idempotencyKey"
    );
    let err = check_body(&method, &json!({"type": "USAGE_TYPE_LOTS"})).unwrap_err();
    assert!(
        err.starts_with("type: ") && err.contains("USAGE_TYPE_LOTS"),
        "{err}"
    );
    let err = check_body(&method, &json!({"occurredAt": "yesterday"})).unwrap_err();
    assert!(err.starts_with("occurredAt: "), "{err}");
    let err = check_body(&method, &json!(["quantity"])).unwrap_err();
    assert!(
        err.contains("JSON object") && err.contains("an array"),
        "{err}"
    );

    // Inside a nested message and a list.
    let method = find_method(&pool, "trellis.events.v1.EventSubscriberService/Deliver").unwrap();
    let err = check_body(&method, &json!({"event": {"sequence": -1}})).unwrap_err();
    assert!(err.starts_with("event.sequence: "), "{err}");
    let err = check_body(&method, &json!({"event": {"nope": 1}})).unwrap_err();
    assert!(
        err.starts_with(
            "event: unrecognized field name 'nope': trellis.events.v1.Event has no such field"
        ),
        "{err}"
    );
    let method = find_method(&pool, "trellis.registry.v1.RegistryService/Register").unwrap();
    let err = check_body(&method, &json!({"fileDescriptors": ["AAAA", "%%"]})).unwrap_err();
    assert!(err.starts_with("fileDescriptors[1]: "), "{err}");
}

#[test]
fn pool_from_files_takes_any_order_and_fills_in_well_known_imports() {
    let mut files = repo_files();
    files.reverse();
    // The registry may leave out the well-known types' files.
    let files: Vec<Vec<u8>> = files
        .into_iter()
        .filter(|f| {
            !FileDescriptorProto::decode(f.as_slice())
                .unwrap()
                .name()
                .starts_with("google/protobuf/")
        })
        .collect();
    let mut twice = files.clone();
    twice.push(files[0].clone());
    let pool = pool_from_files(&twice).unwrap();
    assert!(
        pool.get_service_by_name("telco.usage.v1.UsageService")
            .is_some()
    );
}

#[test]
fn pool_from_files_names_what_is_wrong() {
    let err = pool_from_files(&[b"\xff\xff".to_vec()]).unwrap_err();
    assert!(
        err.starts_with("file descriptor #0 is not a serialized FileDescriptorProto"),
        "{err}"
    );

    let mut lonely = test_file();
    lonely.dependency.push("acme/missing.proto".into());
    let err = pool_from_files(&[lonely.encode_to_vec()]).unwrap_err();
    assert!(
        err.contains("acme/test.proto") && err.contains("acme/missing.proto"),
        "{err}"
    );

    let mut other = test_file();
    other.message_type.truncate(1);
    let err = pool_from_files(&[test_file().encode_to_vec(), other.encode_to_vec()]).unwrap_err();
    assert!(err.contains("acme/test.proto was sent twice"), "{err}");
}

fn field_proto(name: &str, number: i32, ty: Type, type_name: Option<&str>) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        json_name: Some(to_json_name(name)),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(Into::into),
        ..Default::default()
    }
}

fn to_json_name(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A contract with what the repository's contracts lack: a recursive
/// message, a map of messages, a oneof and a proto3 `optional` field.
///
/// ```proto
/// package acme;
/// message Node {
///   string name = 1;
///   repeated Node children = 2;
///   map<string, Node> by_name = 3;
///   oneof choice { string label = 4; google.protobuf.Timestamp at = 5; }
///   optional int32 limit = 6;
/// }
/// service Tree { rpc Plant(Node) returns (Node); }
/// ```
fn test_file() -> FileDescriptorProto {
    let mut label = field_proto("label", 4, Type::String, None);
    label.oneof_index = Some(0);
    let mut at = field_proto("at", 5, Type::Message, Some(".google.protobuf.Timestamp"));
    at.oneof_index = Some(0);
    let mut limit = field_proto("limit", 6, Type::Int32, None);
    limit.oneof_index = Some(1);
    limit.proto3_optional = Some(true);
    let mut children = field_proto("children", 2, Type::Message, Some(".acme.Node"));
    children.label = Some(Label::Repeated as i32);
    let mut by_name = field_proto("by_name", 3, Type::Message, Some(".acme.Node.ByNameEntry"));
    by_name.label = Some(Label::Repeated as i32);
    let entry = DescriptorProto {
        name: Some("ByNameEntry".into()),
        field: vec![
            field_proto("key", 1, Type::String, None),
            field_proto("value", 2, Type::Message, Some(".acme.Node")),
        ],
        options: Some(prost_reflect::prost_types::MessageOptions {
            map_entry: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node = DescriptorProto {
        name: Some("Node".into()),
        field: vec![
            field_proto("name", 1, Type::String, None),
            children,
            by_name,
            label,
            at,
            limit,
        ],
        nested_type: vec![entry],
        oneof_decl: vec![
            OneofDescriptorProto {
                name: Some("choice".into()),
                ..Default::default()
            },
            OneofDescriptorProto {
                name: Some("_limit".into()),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let unused = DescriptorProto {
        name: Some("Unused".into()),
        ..Default::default()
    };
    FileDescriptorProto {
        name: Some("acme/test.proto".into()),
        package: Some("acme".into()),
        dependency: vec!["google/protobuf/timestamp.proto".into()],
        message_type: vec![node, unused],
        service: vec![ServiceDescriptorProto {
            name: Some("Tree".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Plant".into()),
                input_type: Some(".acme.Node".into()),
                output_type: Some(".acme.Node".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

#[test]
fn recursive_messages_oneofs_and_optional_fields() {
    // Without source info: every doc is null.
    let pool = pool_from_files(&[test_file().encode_to_vec()]).unwrap();
    let form = form_for(&pool, "acme.Tree/Plant");
    assert_eq!(form["supported"], true);
    assert_eq!(form["doc"], Value::Null);
    let messages = form["messages"].as_object().unwrap();
    assert_eq!(messages.keys().collect::<Vec<_>>(), ["acme.Node"]);
    let node = &messages["acme.Node"];
    assert_eq!(
        node["oneofs"],
        json!([{"name": "choice", "fields": ["label", "at"]}])
    );

    let children = field(&form, "acme.Node", "children");
    assert_eq!(
        (&children["kind"], &children["type"], &children["repeated"]),
        (&json!("message"), &json!("acme.Node"), &json!(true))
    );
    let by_name = field(&form, "acme.Node", "byName");
    assert_eq!(by_name["kind"], "map");
    assert_eq!(
        by_name["map"]["value"],
        json!({"kind": "message", "type": "acme.Node"})
    );
    assert_eq!(field(&form, "acme.Node", "label")["oneof"], "choice");
    assert_eq!(field(&form, "acme.Node", "at")["kind"], "wkt");
    let limit = field(&form, "acme.Node", "limit");
    // The synthetic oneof of an optional field is not a choice to offer.
    assert_eq!(
        (&limit["oneof"], &limit["optional"]),
        (&Value::Null, &json!(true))
    );
    assert_eq!(field(&form, "acme.Node", "name")["doc"], Value::Null);

    let method = find_method(&pool, "acme.Tree/Plant").unwrap();
    check_body(
        &method,
        &json!({"children": [{"byName": {"x": {"label": "a"}}}], "limit": 0}),
    )
    .unwrap();
    let err = check_body(
        &method,
        &json!({"children": [{}, {"byName": {"x": {"limit": "many"}}}]}),
    )
    .unwrap_err();
    assert!(err.starts_with("children[1].byName.x.limit: "), "{err}");
}

#[test]
fn an_input_too_large_for_a_form_is_refused() {
    // A chain of MAX_MESSAGES + 1 messages, each with a field of the next.
    let count = MAX_MESSAGES + 1;
    let messages = (0..count)
        .map(|i| DescriptorProto {
            name: Some(format!("M{i}")),
            field: (i + 1 < count)
                .then(|| field_proto("next", 1, Type::Message, Some(&format!(".big.M{}", i + 1))))
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .collect();
    let file = FileDescriptorProto {
        name: Some("big.proto".into()),
        package: Some("big".into()),
        message_type: messages,
        service: vec![ServiceDescriptorProto {
            name: Some("Big".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Call".into()),
                input_type: Some(".big.M0".into()),
                output_type: Some(".big.M0".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    };
    let pool = pool_from_files(&[file.encode_to_vec()]).unwrap();
    let form = form_for(&pool, "big.Big/Call");
    assert_eq!(form["supported"], false);
    let reason = form["unsupported_reason"].as_str().unwrap();
    assert!(
        reason
            .starts_with("big.M0 is too large for a form: it reaches more than 500 message types"),
        "{reason}"
    );
}

#[test]
fn comments_are_rejoined_into_paragraphs() {
    assert_eq!(
        tidy_comment(" One\n two.\n\n Three.\n"),
        "One two.\n\nThree."
    );
    assert_eq!(tidy_comment("\n"), "");
}

/// form.js's conversions and checks, through node's own test runner (no
/// packages needed). Skipped, saying so, where node is not installed.
#[test]
fn form_js_passes_its_node_tests() {
    let test_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/dashboard/static/form.test.js"
    );
    let output = match std::process::Command::new("node")
        .args(["--test", test_file])
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: node is not on PATH, so {test_file} was not run");
            return;
        }
        Err(e) => panic!("running node --test {test_file}: {e}"),
    };
    assert!(
        output.status.success(),
        "node --test {test_file} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// form.js in a real browser: renders forms from [`method_form`] schemas,
/// fills and collects them (`static/form.browser-test.js`), and each body it
/// collects passes [`check_body`]. Skipped, saying so, where no headless
/// Chromium is installed.
#[test]
fn form_js_renders_and_collects_in_a_browser() {
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok()
        })
    else {
        eprintln!("skipped: no chromium on PATH to run static/form.browser-test.js");
        return;
    };
    let repo = repo_pool();
    let acme = pool_from_files(&[test_file().encode_to_vec()]).unwrap();
    let methods = [
        (&repo, "telco.usage.v1.UsageService/RecordUsage"),
        (&repo, "trellis.registry.v1.RegistryService/Register"),
        (&repo, "trellis.registry.v1.RegistryService/KeepAlive"),
        (&repo, "trellis.events.v1.EventSubscriberService/Deliver"),
        (&acme, "acme.Tree/Plant"),
    ];
    let schemas: serde_json::Map<String, Value> = methods
        .iter()
        .map(|(pool, m)| ((*m).to_owned(), form_for(pool, m)))
        .collect();
    // `</` would end the script element early.
    let schemas = Value::Object(schemas).to_string().replace("</", "<\\/");
    let page = format!(
        "<!doctype html><meta charset=utf-8><body><pre id=result></pre>\
         <script>const SCHEMAS = {schemas};</script><script>{}</script><script>{}</script>",
        include_str!("../static/form.js"),
        include_str!("../static/form.browser-test.js"),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("form.html");
    std::fs::write(&file, page).unwrap();

    let mut child = std::process::Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("file://{}", file.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Read while it runs: the page's DOM is larger than a pipe's buffer.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(&mut stdout));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{browser} did not finish within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let dom = reader.join().unwrap().unwrap();
    let result = dom
        .split_once("<pre id=\"result\">")
        .and_then(|(_, rest)| rest.split_once("</pre>"))
        .map(|(text, _)| {
            text.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&")
        })
        .unwrap_or_else(|| panic!("no result in the page:\n{dom}"));
    let result: Value = serde_json::from_str(&result)
        .unwrap_or_else(|e| panic!("result is not JSON ({e}): {result}"));

    let checks = result["checks"].as_array().unwrap();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["pass"] != true).collect();
    assert!(failed.is_empty(), "failed in the browser: {failed:#?}");
    assert!(
        checks.len() >= 20,
        "only {} checks ran: {result:#}",
        checks.len()
    );
    for (pool, method) in methods {
        if let Some(body) = result["bodies"].get(method) {
            let descriptor = find_method(pool, method).unwrap();
            check_body(&descriptor, body).unwrap_or_else(|e| panic!("{method} {body}: {e}"));
        }
    }
    assert_eq!(result["bodies"].as_object().unwrap().len(), 4);
}
