//! The local service's life in the mesh: wait until it reports SERVING on
//! grpc.health.v1, learn its gRPC services and contracts through its own
//! server reflection (whatever language it is written in), register it
//! under a lease, keep the lease alive, mirror its health, and deregister
//! it on shutdown. A registry that forgot the instance (restarted) gets it
//! registered again, as soon as the watch reconnects to it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as AppStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
use trellis::pb::trellis::registry::v1 as pb;
use trellis::top::ADMIN_METADATA_KEY;

use crate::discovery::ControlPlane;
use crate::settings;

/// What to register.
#[derive(Clone, Debug)]
pub struct Registration {
    /// The mesh service.
    pub service: String,
    /// The address peers reach this sidecar's inbound side on.
    pub advertise: String,
    /// Free-form version label.
    pub version: String,
    /// Zone label.
    pub zone: String,
    /// Labels registered with the instance (see [`metadata`]: the admin
    /// address is among them).
    pub metadata: std::collections::HashMap<String, String>,
    /// gRPC services given by configuration; empty: ask reflection.
    pub grpc_services: Vec<String>,
    /// The lease's time to live.
    pub lease_ttl: Duration,
}

/// The labels to register: the operator's, and the admin port's address
/// under [`ADMIN_METADATA_KEY`] (where `trellis top` reads this sidecar's
/// metrics) unless the operator gave that key (an address that differs
/// as seen from elsewhere) or gave as many labels as the registry takes.
pub fn metadata(
    operator: impl IntoIterator<Item = (String, String)>,
    admin: SocketAddr,
    advertise: SocketAddr,
) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = operator.into_iter().collect();
    if labels.contains_key(ADMIN_METADATA_KEY) {
        return labels;
    }
    if labels.len() >= crate::config::MAX_METADATA {
        tracing::warn!(
            limit = crate::config::MAX_METADATA,
            "no room among the --metadata labels for {ADMIN_METADATA_KEY}: `trellis top` will not find this sidecar's metrics"
        );
        return labels;
    }
    labels.insert(
        ADMIN_METADATA_KEY.to_owned(),
        admin_address(admin, advertise).to_string(),
    );
    labels
}

/// Where peers reach the admin port: its own address, or, when it
/// listens on every address (`0.0.0.0`, `::`), the advertised host with
/// its port.
pub fn admin_address(admin: SocketAddr, advertise: SocketAddr) -> SocketAddr {
    if admin.ip().is_unspecified() {
        SocketAddr::new(advertise.ip(), admin.port())
    } else {
        admin
    }
}

/// Services every gRPC server carries that are not part of its contract.
fn is_infrastructure(service: &str) -> bool {
    service == "grpc.health.v1.Health" || service.starts_with("grpc.reflection.")
}

/// A running lifecycle; dropping it leaves the instance registered until
/// its lease runs out, so call [`Lifecycle::deregister`] on shutdown.
#[derive(Debug)]
pub struct Lifecycle {
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    /// True while the instance is registered.
    pub registered: watch::Receiver<bool>,
}

impl Lifecycle {
    /// Starts following the local service at `app`; `snapshots` moves
    /// whenever the registry watch is (re)established (see
    /// [`crate::discovery::MeshView::snapshots`]); waits and retries as
    /// `settings` say.
    pub fn start(
        app: SocketAddr,
        control: ControlPlane,
        registration: Registration,
        snapshots: watch::Receiver<u64>,
        settings: settings::ControlPlane,
    ) -> Self {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (registered_tx, registered) = watch::channel(false);
        let channel = TonicEndpoint::from_shared(format!("http://{app}"))
            .expect("ip:port makes an endpoint")
            .connect_timeout(settings.app_connect_timeout)
            .connect_lazy();
        let done = tokio::spawn(run(
            channel,
            control,
            registration,
            stop_rx,
            registered_tx,
            snapshots,
            settings,
        ));
        Self {
            stop: Some(stop_tx),
            done: Some(done),
            registered,
        }
    }

    /// Deregisters the instance (waiting at most `within`).
    pub async fn deregister(&mut self, within: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take()
            && tokio::time::timeout(within, done).await.is_err()
        {
            tracing::warn!("deregistration did not finish in time; the lease will expire instead");
        }
    }
}

async fn run(
    app: Channel,
    control: ControlPlane,
    registration: Registration,
    mut stop: oneshot::Receiver<()>,
    registered: watch::Sender<bool>,
    mut snapshots: watch::Receiver<u64>,
    settings: settings::ControlPlane,
) {
    let (health_tx, mut health) = watch::channel(pb::ServingStatus::NotServing);
    let follow = tokio::spawn(follow_health(
        app.clone(),
        health_tx,
        settings.app_health_retry,
    ));
    let _follow = AbortOnDrop(follow);

    // Registration waits until the service first says SERVING.
    tokio::select! {
        _ = health.wait_for(|s| *s == pb::ServingStatus::Serving) => {}
        _ = &mut stop => return,
    }
    let (grpc_services, files) = tokio::select! {
        found = discover(&app, &registration.grpc_services, settings.app_reflection_retry) => found,
        _ = &mut stop => return,
    };
    tracing::info!(service = %registration.service, grpc_services = ?grpc_services, "local service is serving");

    let reconnect = settings.reconnect;
    let mut backoff = reconnect.min;
    loop {
        let request = pb::RegisterRequest {
            service: registration.service.clone(),
            version: registration.version.clone(),
            zone: registration.zone.clone(),
            address: registration.advertise.clone(),
            grpc_services: grpc_services.clone(),
            metadata: registration.metadata.clone(),
            health: *health.borrow_and_update() as i32,
            lease_ttl: Some(duration(registration.lease_ttl)),
            file_descriptors: files.clone(),
        };
        // Every replica is tried in turn before the backoff.
        let registered_now = tokio::select! {
            r = control.call(|mut c| {
                let request = request.clone();
                async move { c.registry.register(request).await }
            }) => r,
            _ = &mut stop => return,
        };
        let response = match registered_now {
            Ok(r) => r.into_inner(),
            Err(status) => {
                tracing::warn!(registry = %control.replica(), code = ?status.code(), message = status.message(), retry_ms = backoff.as_millis() as u64, "cannot register with the registry");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return,
                }
                backoff = reconnect.next(backoff);
                continue;
            }
        };
        backoff = reconnect.min;
        let instance_id = response.instance_id;
        let lease_id = response.lease_id;
        let ttl = response
            .ttl
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or(registration.lease_ttl);
        tracing::info!(instance = %instance_id, address = %registration.advertise, registry = %control.replica(), ttl_ms = ttl.as_millis() as u64, "registered");
        let _ = registered.send(true);

        // Hold the lease; mirror health; until stopped or forgotten. Each
        // call goes to the replica in use (a lease granted through one
        // replica of a shared store renews through any other); NOT_FOUND
        // means the replica does not know the instance (a restarted
        // registry, or a replica with a store of its own): register again.
        let renew_lease = || {
            control.call(|mut c| {
                let request = pb::RenewLeaseRequest {
                    lease_id: lease_id.clone(),
                };
                async move { c.registry.renew_lease(request).await }
            })
        };
        let mut renew = tokio::time::interval(ttl / 3);
        renew.tick().await;
        // Snapshots before this registration say nothing about it.
        snapshots.mark_unchanged();
        let forgotten = loop {
            tokio::select! {
                // A new watch may be a restarted registry, or another
                // replica, that does not know the lease: renewing now finds
                // out at once (NOT_FOUND) rather than up to a third of the
                // lease later, while callers route from a view that lacks
                // this instance.
                Ok(()) = snapshots.changed() => {
                    match renew_lease().await {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::NotFound => break true,
                        Err(s) => tracing::warn!(registry = %control.replica(), code = ?s.code(), message = s.message(), "cannot renew the lease after the registry watch reconnected; will keep trying"),
                    }
                }
                _ = renew.tick() => {
                    match renew_lease().await {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::NotFound => break true,
                        Err(s) => tracing::warn!(registry = %control.replica(), code = ?s.code(), message = s.message(), "cannot renew the lease; will keep trying"),
                    }
                }
                changed = health.changed() => {
                    if changed.is_err() { break false; }
                    let status = *health.borrow_and_update();
                    tracing::info!(health = ?status, "local service health changed");
                    let r = control.call(|mut c| {
                        let request = pb::SetHealthRequest { instance_id: instance_id.clone(), health: status as i32 };
                        async move { c.registry.set_health(request).await }
                    }).await;
                    match r {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::NotFound => break true,
                        Err(s) => tracing::warn!(registry = %control.replica(), code = ?s.code(), message = s.message(), "cannot report health"),
                    }
                }
                _ = &mut stop => {
                    let _ = registered.send(false);
                    let r = control.call(|mut c| {
                        let request = pb::DeregisterRequest { instance_id: instance_id.clone() };
                        async move { c.registry.deregister(request).await }
                    }).await;
                    match r {
                        Ok(_) => tracing::info!(instance = %instance_id, "deregistered"),
                        Err(s) => tracing::warn!(code = ?s.code(), message = s.message(), "deregistration failed; the lease will expire instead"),
                    }
                    return;
                }
            }
        };
        let _ = registered.send(false);
        if forgotten {
            tracing::warn!(instance = %instance_id, registry = %control.replica(), "the registry no longer knows this instance; registering again");
        } else {
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Mirrors the local service's overall health (`""` on grpc.health.v1)
/// into `out`: Watch when the service supports it, Check polling when
/// not, NOT_SERVING while it cannot be reached; asks again `retry` after
/// the stream ends.
async fn follow_health(app: Channel, out: watch::Sender<pb::ServingStatus>, retry: Duration) {
    let mut client = HealthClient::new(app);
    let mut waiting_logged = false;
    loop {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match client.watch(request.clone()).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    out.send_replace(mesh_status(update.status()));
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                match client.check(request).await {
                    Ok(r) => {
                        out.send_replace(mesh_status(r.into_inner().status()));
                    }
                    Err(_) => {
                        out.send_replace(pb::ServingStatus::NotServing);
                    }
                }
            }
            Err(status) => {
                if !waiting_logged {
                    tracing::info!(code = ?status.code(), "waiting for the local service's grpc.health.v1");
                    waiting_logged = true;
                }
            }
        }
        // The watch ended: the service stopped or restarted.
        if *out.borrow() == pb::ServingStatus::Serving {
            tracing::warn!("lost the local service's health stream; marking it NOT_SERVING");
        }
        out.send_replace(pb::ServingStatus::NotServing);
        tokio::time::sleep(retry).await;
    }
}

fn mesh_status(status: AppStatus) -> pb::ServingStatus {
    match status {
        AppStatus::Serving => pb::ServingStatus::Serving,
        _ => pb::ServingStatus::NotServing,
    }
}

/// The local service's gRPC services (configured, or listed by its
/// reflection) and the file descriptors defining them, dependencies
/// included. A service without reflection registers without contracts.
async fn discover(
    app: &Channel,
    configured: &[String],
    retry: Duration,
) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut logged = false;
    loop {
        match reflect(app.clone(), configured).await {
            Ok(found) => return found,
            Err(status) if !configured.is_empty() => {
                tracing::info!(code = ?status.code(), message = status.message(), "no server reflection; registering the configured services without contracts");
                return (configured.to_vec(), Vec::new());
            }
            Err(status) => {
                if !logged {
                    tracing::error!(code = ?status.code(), message = status.message(), "cannot list the local service's gRPC services through server reflection; give them with --grpc-services");
                    logged = true;
                }
                tokio::time::sleep(retry).await;
            }
        }
    }
}

const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// Opens a reflection conversation at `path`. v1 and v1alpha messages are
/// the same on the wire, so the v1 types serve for both.
async fn open_reflection(
    app: Channel,
    path: &'static str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<ServerReflectionRequest>,
        tonic::Streaming<ServerReflectionResponse>,
    ),
    tonic::Status,
> {
    let mut grpc = tonic::client::Grpc::new(app);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("local service: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // Ask something at once: some servers (gRPC Python) send response
    // headers only with the first answer, so an empty request stream would
    // never see the call open.
    tx.try_send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .expect("a new channel has room");
    let codec =
        tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
    let responses = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await?
        .into_inner();
    Ok((tx, responses))
}

async fn reflect(
    app: Channel,
    configured: &[String],
) -> Result<(Vec<String>, Vec<Vec<u8>>), tonic::Status> {
    let (tx, mut responses) = match open_reflection(app.clone(), REFLECTION_V1).await {
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            // Some servers (gRPC Python, older gRPC Go) serve only v1alpha.
            open_reflection(app, REFLECTION_V1ALPHA).await?
        }
        other => other?,
    };
    let mut pending_list = true;
    let mut ask = async |request: MessageRequest| -> Result<MessageResponse, tonic::Status> {
        // The list request went out with the call itself.
        if !(pending_list && matches!(request, MessageRequest::ListServices(_))) {
            tx.send(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            })
            .await
            .map_err(|_| tonic::Status::unavailable("reflection stream closed"))?;
        }
        pending_list = false;
        let response = responses
            .message()
            .await?
            .and_then(|r| r.message_response)
            .ok_or_else(|| tonic::Status::unavailable("reflection stream ended"))?;
        match response {
            MessageResponse::ErrorResponse(e) => Err(tonic::Status::new(
                tonic::Code::from_i32(e.error_code),
                e.error_message,
            )),
            other => Ok(other),
        }
    };
    let listed = ask(MessageRequest::ListServices(String::new())).await?;
    let services: Vec<String> = if configured.is_empty() {
        match listed {
            MessageResponse::ListServicesResponse(list) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .filter(|s| !is_infrastructure(s))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            _ => {
                return Err(tonic::Status::internal(
                    "unexpected reflection answer to list",
                ));
            }
        }
    } else {
        configured.to_vec()
    };
    // Files by name, following imports until every dependency is present
    // (some servers send only the file asked for).
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut have: HashSet<String> = HashSet::new();
    let mut wanted: Vec<String> = Vec::new();
    let mut take = |bytes: Vec<Vec<u8>>, have: &mut HashSet<String>, wanted: &mut Vec<String>| {
        for b in bytes {
            let Ok(file) = prost_types::FileDescriptorProto::decode(b.as_slice()) else {
                continue;
            };
            if have.insert(file.name().to_owned()) {
                wanted.extend(file.dependency.iter().cloned());
                files.push(b);
            }
        }
    };
    for service in &services {
        if let MessageResponse::FileDescriptorResponse(r) =
            ask(MessageRequest::FileContainingSymbol(service.clone())).await?
        {
            take(r.file_descriptor_proto, &mut have, &mut wanted);
        }
    }
    while let Some(name) = wanted.pop() {
        if have.contains(&name) {
            continue;
        }
        if let MessageResponse::FileDescriptorResponse(r) =
            ask(MessageRequest::FileByFilename(name.clone())).await?
        {
            take(r.file_descriptor_proto, &mut have, &mut wanted);
        }
    }
    Ok((services, files))
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_admin_address_is_registered_where_peers_can_reach_it() {
        let advertise = addr("10.0.0.7:4143");
        let labels = metadata(
            [("zone".to_owned(), "a".to_owned())],
            addr("127.0.0.1:4191"),
            advertise,
        );
        assert_eq!(labels[ADMIN_METADATA_KEY], "127.0.0.1:4191");
        assert_eq!(labels["zone"], "a");
        let labels = metadata([], addr("0.0.0.0:4191"), advertise);
        assert_eq!(labels[ADMIN_METADATA_KEY], "10.0.0.7:4191");
        let labels = metadata([], addr("[::]:4191"), addr("[fd00::7]:4143"));
        assert_eq!(labels[ADMIN_METADATA_KEY], "[fd00::7]:4191");

        // The operator's own value wins.
        let given = [(
            ADMIN_METADATA_KEY.to_owned(),
            "proxy.example:4191".to_owned(),
        )];
        let labels = metadata(given, addr("0.0.0.0:4191"), advertise);
        assert_eq!(labels[ADMIN_METADATA_KEY], "proxy.example:4191");

        // No room: the registration must not be refused for it.
        let full = (0..crate::config::MAX_METADATA).map(|i| (format!("k{i}"), "v".to_owned()));
        let labels = metadata(full, addr("127.0.0.1:4191"), advertise);
        assert_eq!(labels.len(), crate::config::MAX_METADATA);
        assert!(!labels.contains_key(ADMIN_METADATA_KEY));
    }
}
