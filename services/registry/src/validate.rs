//! Input checks shared by the Registry and Config APIs.

use std::time::Duration;

/// Longest mesh service name (a DNS label).
pub const MAX_SERVICE_NAME: usize = 63;
/// Most gRPC services one instance may claim.
pub const MAX_GRPC_SERVICES: usize = 128;
/// Most metadata entries per instance.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key.
pub const MAX_METADATA_KEY: usize = 63;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE: usize = 1024;
/// Most metadata bytes (keys and values) per instance.
pub const MAX_METADATA_TOTAL: usize = 16 * 1024;
/// Longest version or zone string.
pub const MAX_LABEL: usize = 64;
/// Most descriptor bytes one registration may carry.
pub const MAX_DESCRIPTOR_BYTES: usize = 4 * 1024 * 1024;
/// Shortest lease a registration may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest lease a registration may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Lease given when a registration does not ask for one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// A mesh service name: a DNS label (lower-case letters, digits and '-',
/// starting with a letter, not ending with '-').
pub fn service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(format!("must be at most {MAX_SERVICE_NAME} characters"));
    }
    let bytes = name.as_bytes();
    if !bytes[0].is_ascii_lowercase()
        || bytes[bytes.len() - 1] == b'-'
        || !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(format!(
            "{name:?} is not a mesh service name (lower-case letters, digits and '-', starting with a letter)"
        ));
    }
    Ok(())
}

/// A fully qualified protobuf name such as `telco.usage.v1.UsageService`:
/// at least two dot-separated identifiers.
pub fn qualified_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    let parts: Vec<&str> = name.split('.').collect();
    let ident = |p: &&str| {
        let mut chars = p.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if parts.len() < 2 || !parts.iter().all(ident) {
        return Err(format!(
            "{name:?} is not a fully qualified gRPC service name such as telco.usage.v1.UsageService"
        ));
    }
    Ok(())
}

/// gRPC services every server carries, and the control plane's own APIs:
/// never routable names. A sidecar that routed `grpc.health.v1.Health` to
/// one mesh service would send every health check in the mesh there, and
/// the Config and Registry APIs are answered by the registry alone.
const INFRASTRUCTURE: &[&str] = &["grpc.health.v1.Health"];
/// Package prefixes that are infrastructure as a whole (every version).
const INFRASTRUCTURE_PACKAGES: &[&str] =
    &["grpc.reflection.", "trellis.registry.", "trellis.config."];

/// Whether `name` is infrastructure rather than a routable gRPC service.
pub fn is_infrastructure(name: &str) -> bool {
    INFRASTRUCTURE.contains(&name) || INFRASTRUCTURE_PACKAGES.iter().any(|p| name.starts_with(p))
}

/// A gRPC service name an instance may serve and config may declare: a
/// qualified name that is not infrastructure.
pub fn routable_name(name: &str) -> Result<(), String> {
    qualified_name(name)?;
    if is_infrastructure(name) {
        return Err(format!(
            "{name} is infrastructure (health, reflection or the control plane's own API), never a routable name; leave it out"
        ));
    }
    Ok(())
}

/// A version as a traffic split names it (and instances should register
/// it to be picked by one): 1 to [`MAX_LABEL`] printable ASCII characters
/// without spaces, so that it reads the same in a file, a header and a log.
pub fn version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err(
            "must not be empty: name the version as its instances register it (e.g. \"v2\")".into(),
        );
    }
    if version.len() > MAX_LABEL || !version.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{version:?} is not a version: use 1 to {MAX_LABEL} printable ASCII characters without spaces, as instances register it (e.g. \"v2\")"
        ));
    }
    Ok(())
}

/// A `host:port` address: an IP address or a DNS host name, and a port
/// other than 0.
pub fn address(addr: &str) -> Result<(), String> {
    if addr.is_empty() {
        return Err("must not be empty".into());
    }
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        return if sock.port() == 0 {
            Err(format!("{addr:?} has port 0"))
        } else {
            Ok(())
        };
    }
    let bad = || format!("{addr:?} is not host:port (e.g. 10.0.0.7:7443 or usage-1.internal:7443)");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("{addr:?} has port 0"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!(service_name("usage").is_ok());
        assert!(service_name("billing-report2").is_ok());
        for bad in ["", "Usage", "9lives", "usage-", "us age", &"a".repeat(64)] {
            assert!(service_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn qualified_names() {
        assert!(qualified_name("telco.usage.v1.UsageService").is_ok());
        for bad in ["", "UsageService", "telco..v1", "telco.1usage", "a.b/c"] {
            assert!(qualified_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn infrastructure_is_not_routable() {
        for name in [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "trellis.registry.v1.RegistryService",
            "trellis.config.v1.ConfigService",
        ] {
            let e = routable_name(name).unwrap_err();
            assert!(e.contains(name), "{e}");
        }
        assert!(routable_name("telco.usage.v1.UsageService").is_ok());
        assert!(routable_name("trellis.events.v1.Example").is_ok());
        assert!(routable_name("grpc.healthy.v1.Health").is_ok());
    }

    #[test]
    fn versions() {
        for good in [
            "v2",
            "1.0.0",
            "canary-2024.06+build.7",
            &"v".repeat(MAX_LABEL),
        ] {
            assert!(version(good).is_ok(), "{good}");
        }
        assert!(version("").unwrap_err().contains("must not be empty"));
        for bad in ["v 2", "v2\n", "\tv2", "v\u{e9}", &"v".repeat(MAX_LABEL + 1)] {
            let e = version(bad).unwrap_err();
            assert!(e.contains("printable ASCII"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn addresses() {
        for good in [
            "127.0.0.1:7443",
            "[::1]:80",
            "usage-1.internal:7443",
            "localhost:1",
        ] {
            assert!(address(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "host:99999",
            "bad_host:80",
            ":80",
            "a b:1",
        ] {
            assert!(address(bad).is_err(), "{bad}");
        }
    }
}
