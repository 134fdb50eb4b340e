//! Property tests of the registry's contract checking: whatever bytes a
//! workload registers as its descriptors (garbage, or the mesh's own
//! contracts changed in every way a descriptor can be wrong), the registry
//! refuses them with a reason or accepts them and answers lookups; it
//! never panics. Bounded: 256 cases each, no failure files written.

use std::collections::{BTreeSet, HashSet};

use proptest::prelude::*;
use prost::Message;
use prost_types::FileDescriptorProto;
use trellis_registry::contracts::Contract;
use trellis_registry::validate::MAX_DESCRIPTOR_BYTES;
use trellis_test_support::descriptors::{contract_files, mutate, mutation, trellis_files};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every name a descriptor set defines or mentions: what a caller might
/// look up.
fn symbols_of(blobs: &[Vec<u8>]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in blobs
        .iter()
        .filter_map(|b| FileDescriptorProto::decode(b.as_slice()).ok())
    {
        let package = file.package().to_owned();
        let qualify = |name: &str| {
            if package.is_empty() {
                name.to_owned()
            } else {
                format!("{package}.{name}")
            }
        };
        for service in &file.service {
            out.insert(qualify(service.name()));
            for method in &service.method {
                out.insert(format!("{}.{}", qualify(service.name()), method.name()));
                out.insert(method.input_type().trim_start_matches('.').to_owned());
            }
        }
        for message in &file.message_type {
            out.insert(qualify(message.name()));
            for field in &message.field {
                out.insert(format!("{}.{}", qualify(message.name()), field.name()));
            }
        }
        for en in &file.enum_type {
            out.insert(qualify(en.name()));
        }
    }
    out
}

/// What a registered contract must answer, once accepted.
fn check_accepted(
    contract: &Contract,
    blobs: &[Vec<u8>],
    services: &[String],
) -> Result<(), TestCaseError> {
    for service in services {
        prop_assert!(contract.has_method(service, None), "{} accepted", service);
    }
    for symbol in symbols_of(blobs).iter().chain(services) {
        if let Some(files) = contract.file_containing(symbol) {
            prop_assert!(!files.is_empty());
            let names: Vec<String> = files
                .iter()
                .map(|f| {
                    FileDescriptorProto::decode(f.as_ref())
                        .map(|f| f.name().to_owned())
                        .map_err(|e| TestCaseError::fail(format!("{symbol}: {e}")))
                })
                .collect::<Result<_, _>>()?;
            let distinct: HashSet<&String> = names.iter().collect();
            prop_assert_eq!(distinct.len(), names.len(), "each file once: {:?}", names);
            let located = contract.locate(symbol);
            prop_assert!(located.is_some(), "{} has a file but no place", symbol);
        }
        let _ = contract.has_method(symbol, Some("Echo"));
    }
    Ok(())
}

fn service_names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            Just("trellis.echo.v1.EchoService".to_owned()),
            Just("telco.usage.v1.UsageService".to_owned()),
            Just("trellis.echo.v1.EchoRequest".to_owned()),
            Just(String::new()),
            any::<String>(),
        ],
        0..3,
    )
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes registered as descriptors are refused with the field at
    /// fault, or accepted and answer lookups.
    #[test]
    fn any_bytes_are_refused_or_answer(
        blobs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..96), 0..5),
        services in service_names(),
    ) {
        match Contract::parse(&blobs, &services) {
            Ok(contract) => check_accepted(&contract, &blobs, &services)?,
            Err(e) => {
                prop_assert!(e.field.starts_with("file_descriptors") || e.field.starts_with("grpc_services"), "{:?}", e);
                prop_assert!(!e.reason.is_empty());
            }
        }
    }

    /// The mesh's own contracts, changed in the ways a descriptor can be
    /// wrong (dangling types, bad numbers and labels, duplicates, cycles,
    /// truncated bytes): refused with a reason, or accepted and
    /// answering lookups. Never a panic.
    #[test]
    fn mutated_contracts_are_refused_or_answer(
        mutations in prop::collection::vec(mutation(), 1..6),
        services in service_names(),
    ) {
        let blobs = mutate(contract_files(), &mutations);
        match Contract::parse(&blobs, &services) {
            Ok(contract) => check_accepted(&contract, &blobs, &services)?,
            Err(e) => prop_assert!(!e.reason.is_empty(), "{:?}", e),
        }
    }

}

proptest! {
    // Fewer cases: each builds up to the whole set.
    #![proptest_config(ProptestConfig { cases: 48, ..config() })]

    /// Any set of the mesh's files closed under imports, in any order, is
    /// accepted, and defines the services in it.
    #[test]
    fn complete_subsets_in_any_order_are_accepted(
        chosen in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
        order in any::<u64>(),
    ) {
        let files = trellis_files();
        let mut wanted: BTreeSet<String> = chosen
            .iter()
            .map(|i| files[i.index(files.len())].name().to_owned())
            .collect();
        loop {
            let more: BTreeSet<String> = files
                .iter()
                .filter(|f| wanted.contains(f.name()))
                .flat_map(|f| f.dependency.iter().cloned())
                .collect();
            if more.is_subset(&wanted) {
                break;
            }
            wanted.extend(more);
        }
        let mut subset: Vec<&FileDescriptorProto> =
            files.iter().filter(|f| wanted.contains(f.name())).collect();
        // A cheap deterministic shuffle.
        let len = subset.len();
        let mut state = order;
        for i in (1..len).rev() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            subset.swap(i, (state >> 33) as usize % (i + 1));
        }
        let blobs: Vec<Vec<u8>> = subset.iter().map(|f| f.encode_to_vec()).collect();
        let services: Vec<String> = subset
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| format!("{}.{}", f.package(), s.name())))
            .collect();
        let contract = Contract::parse(&blobs, &services)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        check_accepted(&contract, &blobs, &services)?;
    }
}

/// More descriptor bytes than the registry keeps are refused before any
/// of them is decoded.
#[test]
fn too_many_descriptor_bytes_are_refused_unread() {
    let blobs = vec![
        vec![0xff; MAX_DESCRIPTOR_BYTES / 2],
        vec![0xff; MAX_DESCRIPTOR_BYTES / 2 + 1],
    ];
    let e = Contract::parse(&blobs, &[]).unwrap_err();
    assert_eq!(e.field, "file_descriptors");
    assert!(e.reason.contains("allowed"), "{e:?}");
}

// ------------------------------------------------------------ config files

/// One line of something like a service's config file.
fn config_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("grpc_services"),
        Just("method"),
        Just("timeout"),
        Just("load_balancing"),
        Just("idempotent"),
        Just("max_attempts"),
        Just("retryable_status_codes"),
        Just("initial_backoff"),
        Just("max_backoff"),
        Just("budget_ratio"),
        Just("max_buffered_bytes"),
        Just("callers"),
        Just("methods"),
        Just("action"),
        Just("max_page_size"),
        Just("per_try_timeout"),
        Just("delay"),
        Just("max_concurrent"),
        Just("max_queued"),
        Just("consecutive_failures"),
        Just("failure_rate"),
        Just("minimum_calls"),
        Just("window"),
        Just("open_for"),
        Just("half_open_calls"),
        Just("split"),
        Just("version_header_callers"),
        Just("unknown"),
    ];
    let duration = prop_oneof![
        (any::<u64>(), "(ns|us|ms|s|m|h|d|w|y)").prop_map(|(n, u)| format!("{n}{u}")),
        (0u64..100_000, "(ms|s|m|h|d)").prop_map(|(n, u)| format!("{n}{u}")),
        Just("18446744073709551615s 999999999ns".to_owned()),
        Just("1.5s".to_owned()),
        Just("-1s".to_owned()),
    ];
    let value = prop_oneof![
        duration.prop_map(|d| format!("{d:?}")),
        prop_oneof![
            Just("\"telco.usage.v1.UsageService/RecordUsage\""),
            Just("\"telco.usage.v1.UsageService/*\""),
            Just("\"*\""),
            Just("\"/\""),
            Just("[\"telco.usage.v1.UsageService\"]"),
            Just("[\"edge\", \"spiffe://trellis.local/ns/default/sa/user\", \"\"]"),
            Just("[\"UNAVAILABLE\", \"nope\", \"14\", \"99\"]"),
            Just("\"allow\""),
            Just("\"deny\""),
            Just("\"round_robin\""),
            Just("\"peak_ewma\""),
            Just("\"random\""),
            Just("0"),
            Just("100001"),
            Just("[{ version = \"v1\", weight = 90 }, { version = \"v2\", weight = 10 }]"),
            Just("[{ version = \"v 1\", weight = 100 }]"),
            Just("[{ version = \"v1\", weight = 4294967295 }, { version = \"v2\", weight = 1 }]"),
            Just("true"),
            Just("1e308"),
            Just("nan"),
            Just("-1"),
            Just("4294967296"),
        ]
        .prop_map(str::to_owned),
        any::<String>().prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
    ];
    prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop_oneof![
            Just("[[routes]]"),
            Just("[routes.retry]"),
            Just("[routes.hedge]"),
            Just("[routes.limit]"),
            Just("[circuit_breaker]"),
            Just("[caller_limit]"),
            Just("[traffic]"),
            Just("[[authorization]]"),
            Just("[settings]"),
            Just("[settings.subscribers]"),
        ]
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Whatever an operator writes in a service's config file (durations
    /// too large to represent included), the registry reads it without
    /// panicking: accepted, with every duration within the documented
    /// bound, or refused with the file and a line inside it.
    #[test]
    fn any_config_file_is_accepted_within_bounds_or_refused_with_its_line(
        lines in prop::collection::vec(config_line(), 0..12),
    ) {
        use trellis_registry::config::{ConfigStore, MAX_DURATION};
        use trellis_registry::quota::Quotas;
        use trellis_registry::registry::{MeshScope, Registry};

        let text = lines.join("\n");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("usage.toml"), &text).unwrap();
        let scope = MeshScope {
            trust_domain: "trellis.local".into(),
            namespace: "default".into(),
        };
        let registry = Registry::new(scope, [], Quotas::UNLIMITED);
        let store = ConfigStore::open(dir.path(), registry).unwrap();
        let status = store.status();
        let line_count = text.lines().count() as u32 + 1;
        for problem in &status.problems {
            prop_assert_eq!(&problem.file, "usage.toml");
            prop_assert!(problem.line <= line_count, "{:?}\n{}", problem, text);
            prop_assert!(!problem.message.is_empty());
        }
        let config = store.get("usage").config.unwrap_or_default();
        let max = prost_types::Duration::try_from(MAX_DURATION).unwrap();
        let within = |d: &Option<prost_types::Duration>| {
            d.as_ref().is_none_or(|d| d.seconds >= 0 && d.nanos >= 0 && (d.seconds, d.nanos) <= (max.seconds, max.nanos))
        };
        for route in &config.routes {
            prop_assert!(within(&route.timeout), "{:?}", route);
            prop_assert!(route.load_balancing() != trellis::pb::trellis::config::v1::LoadBalancing::Random);
            if let Some(retry) = &route.retry {
                prop_assert!(within(&retry.initial_backoff) && within(&retry.max_backoff), "{:?}", route);
                prop_assert!(within(&retry.per_try_timeout), "{:?}", route);
            }
            if let Some(hedge) = &route.hedge {
                prop_assert!(within(&hedge.delay) && (2..=5).contains(&hedge.max_attempts), "{:?}", route);
            }
            if let Some(limit) = &route.limit {
                prop_assert!((1..=100_000).contains(&limit.max_concurrent), "{:?}", route);
            }
        }
        if let Some(breaker) = &config.circuit_breaker {
            prop_assert!(within(&breaker.window) && within(&breaker.open_for), "{:?}", breaker);
            prop_assert!(breaker.consecutive_failures > 0 || breaker.failure_rate > 0.0, "{:?}", breaker);
        }
        if let Some(traffic) = &config.traffic {
            let total: u32 = traffic.split.iter().map(|w| w.weight).sum();
            prop_assert!(traffic.split.is_empty() || total == 100, "{:?}", traffic);
        }
    }
}
