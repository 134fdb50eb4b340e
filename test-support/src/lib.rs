//! Fixtures for Trellis tests: fresh PostgreSQL databases, certificate
//! authorities made at test time, and child processes that are killed when
//! the test ends.

pub mod billing;
pub mod descriptors;
pub mod etcd;
pub mod mesh;
pub mod otlp;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod registry;

pub use billing::{BillingMesh, Databases, Instance, binary_dir, repo_root, workspace_binary};
pub use etcd::EtcdCluster;
pub use mesh::{
    EchoLoad, ProxyOptions, RunningEcho, RunningProxy, TestMesh, http_get, metric_value,
    sibling_binary, spawn_echo, spawn_proxy, write_atomically,
};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use pki::TestPki;
pub use postgres::{PgCluster, TestDb, server_url};
pub use process::{ChildGuard, free_port, set_child_env, wait_for_tcp};
pub use registry::{
    RunningRegistry, config_status, spawn_registry, spawn_registry_at, spawn_registry_with,
};
