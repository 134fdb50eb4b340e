//! Descriptor sets changed in every way a descriptor can be wrong, for
//! the property tests of whatever reads contracts from the network (the
//! registry's checks, the edge's reflection and JSON).

use proptest::prelude::*;

/// The mesh's own contracts, each file as a workload registers it and a
/// registry hands it out.
pub fn trellis_files() -> Vec<FileDescriptorProto> {
    prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes")
        .file
}

/// The contracts to mutate: echo's and usage's files and what they import
/// (the whole set makes each case slow for little gain).
pub fn contract_files() -> Vec<FileDescriptorProto> {
    let all = trellis_files();
    let mut wanted: std::collections::BTreeSet<String> =
        ["trellis/echo/v1/echo.proto", "telco/usage/v1/usage.proto"]
            .into_iter()
            .map(str::to_owned)
            .collect();
    loop {
        let more: std::collections::BTreeSet<String> = all
            .iter()
            .filter(|f| wanted.contains(f.name()))
            .flat_map(|f| f.dependency.iter().cloned())
            .collect();
        if more.is_subset(&wanted) {
            break;
        }
        wanted.extend(more);
    }
    all.into_iter()
        .filter(|f| wanted.contains(f.name()))
        .collect()
}
use prost::Message;
use prost_types::FileDescriptorProto;

/// One change to a valid set of descriptors, each picking its target by
/// index: renames, dangling or self references, bad numbers, labels and
/// types, duplicates, wrong syntax; or a change to the encoded bytes.
#[derive(Clone, Debug)]
pub struct Mutation {
    /// See [`mutate`].
    pub kind: u8,
    /// See [`mutate`].
    pub at: [usize; 3],
    /// See [`mutate`].
    pub text: String,
    /// See [`mutate`].
    pub number: i32,
}

/// Any [`Mutation`].
pub fn mutation() -> impl Strategy<Value = Mutation> {
    (
        0u8..26,
        any::<[usize; 3]>(),
        prop_oneof![
            any::<String>(),
            Just(String::new()),
            Just(".trellis.echo.v1.EchoRequest".to_owned()),
            Just(".google.protobuf.Duration".to_owned()),
            Just(".telco.usage.v1.UsageType".to_owned()),
            Just("trellis/echo/v1/echo.proto".to_owned()),
            Just("google/protobuf/duration.proto".to_owned()),
            Just("trellis.echo.v1.EchoService".to_owned()),
            Just(".".to_owned()),
            Just("a..b".to_owned()),
        ],
        prop_oneof![
            any::<i32>(),
            -2i32..20,
            Just(0),
            Just(536_870_911),
            Just(536_870_912),
            Just(19_000),
        ],
    )
        .prop_map(|(kind, at, text, number)| Mutation {
            kind,
            at,
            text,
            number,
        })
}

/// The item `at` (modulo the length), if there is any.
pub fn pick<T>(items: &mut [T], at: usize) -> Option<&mut T> {
    let len = items.len();
    if len == 0 {
        None
    } else {
        items.get_mut(at % len)
    }
}

/// Applies `mutations` to `files`, then encodes them (byte changes last).
pub fn mutate(mut files: Vec<FileDescriptorProto>, mutations: &[Mutation]) -> Vec<Vec<u8>> {
    let mut byte_changes = Vec::new();
    for m in mutations {
        let [a, b, c] = m.at;
        if m.kind == 23 {
            // A file given twice, or dropped.
            if let Some(f) = pick(&mut files, a).cloned() {
                if b % 2 == 0 {
                    files.push(f);
                } else {
                    let i = a % files.len();
                    files.remove(i);
                }
            }
            continue;
        }
        let Some(file) = pick(&mut files, a) else {
            continue;
        };
        match m.kind {
            0 => file.name = Some(m.text.clone()),
            1 => file.package = Some(m.text.clone()),
            2 => file.dependency.push(m.text.clone()),
            3 => {
                if !file.dependency.is_empty() {
                    let i = b % file.dependency.len();
                    file.dependency.remove(i);
                }
            }
            4 => file.syntax = Some(m.text.clone()),
            5 => {
                if let Some(msg) = pick(&mut file.message_type, b) {
                    msg.name = Some(m.text.clone());
                }
            }
            6..=12 => {
                if let Some(field) =
                    pick(&mut file.message_type, b).and_then(|msg| pick(&mut msg.field, c))
                {
                    match m.kind {
                        6 => field.number = Some(m.number),
                        7 => field.r#type = Some(m.number),
                        8 => field.type_name = Some(m.text.clone()),
                        9 => field.label = Some(m.number),
                        10 => field.oneof_index = Some(m.number),
                        11 => field.json_name = Some(m.text.clone()),
                        _ => {
                            field.default_value = Some(m.text.clone());
                            field.extendee = Some(m.text.clone());
                        }
                    }
                }
            }
            13 => {
                if let Some(msg) = pick(&mut file.message_type, b) {
                    let copy = msg.clone();
                    msg.nested_type.push(copy.clone());
                    msg.options.get_or_insert_with(Default::default).map_entry = Some(true);
                    if let Some(f) = copy.field.first() {
                        msg.field.push(f.clone());
                    }
                }
            }
            14 => {
                let copy = file.message_type.first().cloned();
                file.message_type.extend(copy);
            }
            15..=17 => {
                if let Some(method) =
                    pick(&mut file.service, b).and_then(|s| pick(&mut s.method, c))
                {
                    match m.kind {
                        15 => method.input_type = Some(m.text.clone()),
                        16 => method.output_type = Some(m.text.clone()),
                        _ => method.name = Some(m.text.clone()),
                    }
                }
            }
            18 => {
                if let Some(service) = pick(&mut file.service, b) {
                    let copy = service.method.first().cloned();
                    service.method.extend(copy);
                    service.name = Some(m.text.clone());
                }
            }
            19 => {
                if let Some(en) = pick(&mut file.enum_type, b) {
                    if let Some(v) = pick(&mut en.value, c) {
                        v.number = Some(m.number);
                        v.name = Some(m.text.clone());
                    } else {
                        en.value.clear();
                    }
                }
            }
            20 => {
                if let Some(msg) = pick(&mut file.message_type, b) {
                    msg.oneof_decl.clear();
                    msg.extension_range
                        .push(prost_types::descriptor_proto::ExtensionRange {
                            start: Some(m.number),
                            end: Some(m.number.wrapping_sub(c as i32)),
                            options: None,
                        });
                    msg.reserved_range
                        .push(prost_types::descriptor_proto::ReservedRange {
                            start: Some(m.number),
                            end: Some(m.number.wrapping_add(1)),
                        });
                }
            }
            21 => file.extension.push(prost_types::FieldDescriptorProto {
                name: Some("ext".to_owned()),
                number: Some(m.number),
                label: Some(1),
                r#type: Some(9),
                extendee: Some(m.text.clone()),
                ..Default::default()
            }),
            22 => file.public_dependency.push(m.number),
            _ => byte_changes.push((a, b, c, m.number)),
        }
    }
    let mut blobs: Vec<Vec<u8>> = files.iter().map(Message::encode_to_vec).collect();
    for (a, b, c, n) in byte_changes {
        if let Some(blob) = pick(&mut blobs, a) {
            if blob.is_empty() {
                continue;
            }
            let i = b % blob.len();
            match c % 3 {
                0 => blob[i] ^= n as u8 | 1,
                1 => blob.truncate(i),
                _ => blob.splice(i..i, n.to_le_bytes()).for_each(drop),
            }
        }
    }
    blobs
}
