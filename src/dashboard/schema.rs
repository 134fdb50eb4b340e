//! Forms from contracts: what the dashboard's method console needs to build
//! a form for any method of any registered service, and to check what the
//! form sends before it reaches the edge.
//!
//! The registry holds each service's contract as serialized
//! `FileDescriptorProto`s ([`pool_from_files`] turns them into a
//! [`DescriptorPool`]). [`method_form`] describes a method's input message as
//! JSON that `static/form.js` renders; [`check_body`] parses a proto3 JSON
//! body the way the edge's transcoding will, so a mistake is reported with
//! the field's name before a call is made.
//!
//! The schema is keyed by message *name*, not nested, so recursive messages
//! (a `Node` with `repeated Node children`) cost one entry; the browser
//! renders a nested message only when a person sets it.

use std::collections::{HashMap, HashSet, VecDeque};

use prost::Message as _;
use prost_reflect::prost_types::FileDescriptorProto;
use prost_reflect::{
    DescriptorPool, DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor,
};
use serde::Serialize;
use serde_json::{Value, json};

/// Most message types one form describes. Contracts we know use a few
/// dozen; past this the form would be unusable anyway.
pub const MAX_MESSAGES: usize = 500;
/// Most fields, summed over every message type of one form.
pub const MAX_FIELDS: usize = 10_000;
/// Most enum values, summed over every enum type of one form.
pub const MAX_ENUM_VALUES: usize = 10_000;

/// Why a client-streaming method has no form. Says what to use instead.
pub const CLIENT_STREAMING_REASON: &str = "client-streaming methods cannot be called from a form: \
     the edge's JSON transcoding sends one request message; use grpcurl -d @ or buf curl \
     with a stream of messages";

/// Well-known types that proto3 JSON writes as something other than an
/// object of their fields; a form gives them one input each (kind `"wkt"`).
const WELL_KNOWN: &[&str] = &[
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Any",
    "google.protobuf.FieldMask",
    "google.protobuf.Empty",
];

/// Whether `full_name` is a type [`method_form`] describes as kind `"wkt"`.
pub fn is_well_known(full_name: &str) -> bool {
    WELL_KNOWN.contains(&full_name) || full_name == "google.protobuf.NullValue"
}

/// Describes `method`'s input for a form, as JSON:
///
/// ```json
/// {"method": "pkg.Service/Method", "input": "pkg.Request", "output": "pkg.Response",
///  "doc": "…" | null, "client_streaming": false, "server_streaming": false,
///  "supported": true, "unsupported_reason": null,
///  "messages": {"pkg.Request": {"doc": "…" | null,
///      "oneofs": [{"name": "choice", "fields": ["a", "b"]}],
///      "fields": [{"name": "user_id", "json": "userId", "number": 1,
///                  "kind": "string", "type": null, "repeated": false,
///                  "map": null, "oneof": null, "optional": false, "doc": "…" | null}]}},
///  "enums": {"pkg.Kind": [{"name": "KIND_UNSPECIFIED", "number": 0}]}}
/// ```
///
/// `kind` is a scalar type name (`int64`, `string`, …), `enum`, `message`,
/// `wkt` (a well-known type, see [`is_well_known`]) or `map`; `type` is the
/// full name for `enum`, `message` and `wkt`. A map field has
/// `"map": {"key": {"kind": …}, "value": {"kind": …, "type": …}}` and
/// `repeated: false`. `oneof` names a real (not synthetic) oneof; a proto3
/// `optional` field has `optional: true`. `messages` holds every message
/// type reachable from the input (well-known types are not expanded), and
/// `enums` every enum a field uses, values in declaration order.
///
/// `supported` is false, with a reason a person can act on, for a
/// client-streaming method and for an input too large to render (more than
/// [`MAX_MESSAGES`] message types, [`MAX_FIELDS`] fields or
/// [`MAX_ENUM_VALUES`] enum values).
pub fn method_form(method: &MethodDescriptor) -> Value {
    let input = method.input();
    let mut docs = Docs::default();
    let mut reason = None;
    if method.is_client_streaming() {
        reason = Some(CLIENT_STREAMING_REASON.to_owned());
    }
    let described = describe_messages(&input, &mut docs);
    let (messages, enums) = match described {
        Ok(found) => found,
        Err(limit) => {
            reason.get_or_insert(format!(
                "{} is too large for a form: it reaches more than {limit}; \
                 call the method with grpcurl or buf curl instead",
                input.full_name()
            ));
            (serde_json::Map::new(), serde_json::Map::new())
        }
    };
    json!({
        "method": method_path(method),
        "input": input.full_name(),
        "output": method.output().full_name(),
        "doc": docs.get(method.parent_file().file_descriptor_proto(), method.path()),
        "client_streaming": method.is_client_streaming(),
        "server_streaming": method.is_server_streaming(),
        "supported": reason.is_none(),
        "unsupported_reason": reason,
        "messages": messages,
        "enums": enums,
    })
}

/// `pkg.Service/Method`, the form a method is named by in the dashboard
/// (the gRPC path without its leading slash).
pub fn method_path(method: &MethodDescriptor) -> String {
    format!("{}/{}", method.parent_service().full_name(), method.name())
}

/// Finds a method by `pkg.Service/Method` (a leading `/`, as in a gRPC path,
/// is accepted).
pub fn find_method(pool: &DescriptorPool, path: &str) -> Result<MethodDescriptor, String> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let Some((service, method)) = path.split_once('/') else {
        return Err(format!(
            "{path:?} is not a method name: expected package.Service/Method"
        ));
    };
    let service = pool.get_service_by_name(service).ok_or_else(|| {
        format!("service {service} is not described by the contracts the registry holds")
    })?;
    service
        .methods()
        .find(|m| m.name() == method)
        .ok_or_else(|| format!("service {} has no method {method}", service.full_name()))
}

/// `messages` or `enums` of a form, by full name.
type JsonMap = serde_json::Map<String, Value>;

/// Walks the message types reachable from `input`, breadth first, and
/// describes each once. Errs with the limit it would pass.
fn describe_messages(
    input: &MessageDescriptor,
    docs: &mut Docs,
) -> Result<(JsonMap, JsonMap), String> {
    let mut messages = serde_json::Map::new();
    let mut enums = serde_json::Map::new();
    let mut seen = HashSet::from([input.full_name().to_owned()]);
    let mut queue = VecDeque::from([input.clone()]);
    let (mut field_count, mut value_count) = (0usize, 0usize);
    while let Some(message) = queue.pop_front() {
        if messages.len() >= MAX_MESSAGES {
            return Err(format!("{MAX_MESSAGES} message types"));
        }
        let file = message.parent_file();
        let file = file.file_descriptor_proto();
        let mut fields = Vec::new();
        for field in message.fields() {
            field_count += 1;
            if field_count > MAX_FIELDS {
                return Err(format!("{MAX_FIELDS} fields"));
            }
            let mut reached = Vec::new();
            let mut described = describe_field(&field, &mut reached);
            described["doc"] = json!(docs.get(file, field.path()));
            fields.push(described);
            for kind in reached {
                match kind {
                    Kind::Message(m) if seen.insert(m.full_name().to_owned()) => {
                        queue.push_back(m);
                    }
                    Kind::Enum(e) if !enums.contains_key(e.full_name()) => {
                        value_count += e.values().len();
                        if value_count > MAX_ENUM_VALUES {
                            return Err(format!("{MAX_ENUM_VALUES} enum values"));
                        }
                        enums.insert(e.full_name().to_owned(), enum_values(&e));
                    }
                    _ => {}
                }
            }
        }
        let oneofs: Vec<Value> = message
            .oneofs()
            .filter(|o| !o.is_synthetic())
            .map(|o| {
                let members: Vec<String> = o.fields().map(|f| f.json_name().to_owned()).collect();
                json!({ "name": o.name(), "fields": members })
            })
            .collect();
        messages.insert(
            message.full_name().to_owned(),
            json!({
                "doc": docs.get(file, message.path()),
                "oneofs": oneofs,
                "fields": fields,
            }),
        );
    }
    Ok((messages, enums))
}

/// One field's entry (without `doc`); the message and enum types it uses
/// are pushed on `reached` for the caller to describe.
fn describe_field(field: &FieldDescriptor, reached: &mut Vec<Kind>) -> Value {
    let (kind, type_name, map) = match field.kind() {
        Kind::Message(entry) if field.is_map() => {
            let key = describe_type(&entry.map_entry_key_field().kind(), reached);
            let value = describe_type(&entry.map_entry_value_field().kind(), reached);
            (
                "map".to_owned(),
                None,
                json!({ "key": key, "value": value }),
            )
        }
        kind => {
            let described = describe_type(&kind, reached);
            let kind = described["kind"].as_str().unwrap_or_default().to_owned();
            let type_name = described["type"].as_str().map(str::to_owned);
            (kind, type_name, Value::Null)
        }
    };
    let oneof = field
        .containing_oneof()
        .filter(|o| !o.is_synthetic())
        .map(|o| o.name().to_owned());
    json!({
        "name": field.name(),
        "json": field.json_name(),
        "number": field.number(),
        "kind": kind,
        "type": type_name,
        "repeated": field.is_list(),
        "map": map,
        "oneof": oneof,
        "optional": field.field_descriptor_proto().proto3_optional(),
    })
}

/// `{"kind": …, "type": …}` for a field's (or a map key's or value's) type.
fn describe_type(kind: &Kind, reached: &mut Vec<Kind>) -> Value {
    let (name, type_name) = match kind {
        Kind::Double => ("double", None),
        Kind::Float => ("float", None),
        Kind::Int32 => ("int32", None),
        Kind::Int64 => ("int64", None),
        Kind::Uint32 => ("uint32", None),
        Kind::Uint64 => ("uint64", None),
        Kind::Sint32 => ("sint32", None),
        Kind::Sint64 => ("sint64", None),
        Kind::Fixed32 => ("fixed32", None),
        Kind::Fixed64 => ("fixed64", None),
        Kind::Sfixed32 => ("sfixed32", None),
        Kind::Sfixed64 => ("sfixed64", None),
        Kind::Bool => ("bool", None),
        Kind::String => ("string", None),
        Kind::Bytes => ("bytes", None),
        Kind::Message(m) if is_well_known(m.full_name()) => ("wkt", Some(m.full_name())),
        Kind::Enum(e) if is_well_known(e.full_name()) => ("wkt", Some(e.full_name())),
        Kind::Message(m) => {
            reached.push(kind.clone());
            ("message", Some(m.full_name()))
        }
        Kind::Enum(e) => {
            reached.push(kind.clone());
            ("enum", Some(e.full_name()))
        }
    };
    json!({ "kind": name, "type": type_name })
}

fn enum_values(e: &EnumDescriptor) -> Value {
    e.values()
        .map(|v| json!({ "name": v.name(), "number": v.number() }))
        .collect()
}

/// Source comments by file, indexed on first use: one form looks up many
/// fields of the same few files.
#[derive(Debug, Default)]
struct Docs {
    by_file: HashMap<String, HashMap<Vec<i32>, String>>,
}

impl Docs {
    /// The leading (else trailing) comment of the element at `path`; `None`
    /// when the file was registered without source info.
    fn get(&mut self, file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
        let comments = self
            .by_file
            .entry(file.name().to_owned())
            .or_insert_with(|| {
                let Some(info) = &file.source_code_info else {
                    return HashMap::new();
                };
                info.location
                    .iter()
                    .filter_map(|l| {
                        let text = l
                            .leading_comments
                            .as_deref()
                            .or(l.trailing_comments.as_deref())?;
                        let text = tidy_comment(text);
                        (!text.is_empty()).then(|| (l.path.clone(), text))
                    })
                    .collect()
            });
        comments.get(path).cloned()
    }
}

/// Rejoins a comment's lines into paragraphs: comments are wrapped at 80
/// columns for the source, not for a tooltip.
fn tidy_comment(text: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
        } else {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(line);
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    paragraphs.join("\n\n")
}

/// A method as listed for a `<select>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MethodEntry {
    /// `pkg.Service/Method`, as [`find_method`] and [`method_form`] name it.
    pub path: String,
    /// The method's own name, `Method`.
    pub name: String,
    /// The caller sends a stream; such a method has no form.
    pub client_streaming: bool,
    /// The method answers with a stream of responses.
    pub server_streaming: bool,
}

/// The methods of one gRPC service, for a `<select>`'s option group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceMethods {
    /// Full name of the service, `pkg.Service`.
    pub service: String,
    /// False when the pool does not describe the service (it was
    /// registered without its contract); `methods` is then empty.
    pub described: bool,
    /// In declaration order.
    pub methods: Vec<MethodEntry>,
}

/// Lists the methods of `services` (full names, as instances register
/// them), in the order given. A service the pool does not describe is kept
/// with `described: false` so the page can say so rather than drop it.
pub fn method_list(pool: &DescriptorPool, services: &[String]) -> Vec<ServiceMethods> {
    services
        .iter()
        .map(|name| {
            let service = pool.get_service_by_name(name);
            let methods = service
                .iter()
                .flat_map(|s| s.methods())
                .map(|m| MethodEntry {
                    path: method_path(&m),
                    name: m.name().to_owned(),
                    client_streaming: m.is_client_streaming(),
                    server_streaming: m.is_server_streaming(),
                })
                .collect();
            ServiceMethods {
                service: name.clone(),
                described: service.is_some(),
                methods,
            }
        })
        .collect()
}

/// Builds a pool from serialized `FileDescriptorProto`s, as the registry's
/// `GetServiceDescriptors` returns them (the service's file, then its
/// dependencies, in any order). A file sent twice is used once; a
/// `google/protobuf/*.proto` import missing from `files` is taken from the
/// well-known types prost-reflect carries.
pub fn pool_from_files<B: AsRef<[u8]>>(files: &[B]) -> Result<DescriptorPool, String> {
    let mut protos: Vec<FileDescriptorProto> = Vec::with_capacity(files.len());
    let mut names = HashSet::new();
    for (index, bytes) in files.iter().enumerate() {
        let proto = FileDescriptorProto::decode(bytes.as_ref()).map_err(|e| {
            format!("file descriptor #{index} is not a serialized FileDescriptorProto: {e}")
        })?;
        if names.insert(proto.name().to_owned()) {
            protos.push(proto);
        } else if protos
            .iter()
            .any(|p| p.name() == proto.name() && *p != proto)
        {
            return Err(format!(
                "{} was sent twice with different contents; the service's registration \
                 carries two versions of one file",
                proto.name()
            ));
        }
    }
    let well_known = DescriptorPool::global();
    let missing: Vec<FileDescriptorProto> = protos
        .iter()
        .flat_map(|p| p.dependency.iter())
        .filter(|d| !names.contains(d.as_str()))
        .filter_map(|d| well_known.get_file_by_name(d))
        .map(|f| f.file_descriptor_proto().clone())
        .collect();
    for file in missing {
        if names.insert(file.name().to_owned()) {
            protos.push(file);
        }
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(protos)
        .map_err(|e| match e.file() {
            Some(file) => format!("contract file {file}: {e}"),
            None => format!("contract files: {e}"),
        })?;
    Ok(pool)
}

/// Parses `body` as the proto3 JSON of `method`'s input, as the edge will,
/// and returns a sentence naming the field when it does not fit, e.g.
/// `quantity: invalid value: string "12x", expected an integer`.
pub fn check_body(method: &MethodDescriptor, body: &Value) -> Result<(), String> {
    if !body.is_object() {
        return Err(format!(
            "the request body must be a JSON object (the fields of {}), not {}",
            method.input().full_name(),
            json_kind(body)
        ));
    }
    // The path of the value that failed (`items[2].quantity`), tracked
    // while prost-reflect parses: its own errors say what is wrong but not
    // where.
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(body, &mut track);
    match DynamicMessage::deserialize(method.input(), de) {
        Ok(_) => Ok(()),
        Err(e) => Err(explain(
            &method.input(),
            body,
            &track.path(),
            &e.to_string(),
        )),
    }
}

/// Turns prost-reflect's parse error into a sentence that says where and
/// what: the field's path, the value sent, and for an unknown field the
/// fields the message does have.
fn explain(
    input: &MessageDescriptor,
    body: &Value,
    path: &serde_path_to_error::Path,
    error: &str,
) -> String {
    use serde_path_to_error::Segment;

    /// What sits at a point of the path: the value sent and its type.
    enum At {
        Message(MessageDescriptor),
        List(Kind),
        Map(Kind),
        Other,
    }
    fn at_kind(kind: Kind) -> At {
        match kind {
            Kind::Message(m) if !is_well_known(m.full_name()) => At::Message(m),
            _ => At::Other,
        }
    }

    let mut value = Some(body);
    let mut at = At::Message(input.clone());
    for segment in path.iter() {
        let (next_value, next_at) = match (segment, at) {
            (Segment::Map { key }, At::Message(m)) => {
                let field = m
                    .get_field_by_json_name(key)
                    .or_else(|| m.get_field_by_name(key));
                let next = match field {
                    Some(f) if f.is_map() => match f.kind() {
                        Kind::Message(entry) => At::Map(entry.map_entry_value_field().kind()),
                        _ => At::Other,
                    },
                    Some(f) if f.is_list() => At::List(f.kind()),
                    Some(f) => at_kind(f.kind()),
                    None => At::Other,
                };
                (value.and_then(|v| v.get(key)), next)
            }
            (Segment::Map { key }, At::Map(kind)) => {
                (value.and_then(|v| v.get(key)), at_kind(kind))
            }
            (Segment::Seq { index }, At::List(kind)) => {
                (value.and_then(|v| v.get(index)), at_kind(kind))
            }
            _ => (None, At::Other),
        };
        value = next_value;
        at = next_at;
    }

    let path = path.to_string();
    let prefix = if path == "." || path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    };
    if error.starts_with("unrecognized field name")
        && let At::Message(m) = at
    {
        let fields: Vec<String> = m
            .fields()
            .take(30)
            .map(|f| f.json_name().to_owned())
            .collect();
        let more = if m.fields().len() > fields.len() {
            ", …"
        } else {
            ""
        };
        return format!(
            "{prefix}{error}: {} has no such field; its fields are {}{more}",
            m.full_name(),
            if fields.is_empty() {
                "none".to_owned()
            } else {
                fields.join(", ")
            },
        );
    }
    match value {
        // serde's type errors quote the value already.
        Some(v) if !v.is_object() && !v.is_array() && !error.starts_with("invalid type") => {
            format!("{prefix}{error} (sent {v})")
        }
        _ => format!("{prefix}{error}"),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
