//! The verified caller identity reaches the code that handles a request,
//! and a request without mTLS has none.

use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use trellis::Workload;
use trellis::pb::trellis::events::v1::event_subscriber_service_client::EventSubscriberServiceClient;
use trellis::pb::trellis::events::v1::event_subscriber_service_server::{
    EventSubscriberService, EventSubscriberServiceServer,
};
use trellis::pb::trellis::events::v1::{DeliverRequest, DeliverResponse, Event};
use trellis::tls::{ExpectedPeer, PeerIdentity, channel, peer_identity};
use trellis_test_support::TestPki;

/// Records who called it.
#[derive(Default)]
struct Recorder {
    callers: Arc<Mutex<Vec<PeerIdentity>>>,
}

#[tonic::async_trait]
impl EventSubscriberService for Recorder {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let caller = peer_identity(&request)?.clone();
        self.callers.lock().unwrap().push(caller);
        Ok(Response::new(DeliverResponse { duplicate: false }))
    }
}

fn event() -> DeliverRequest {
    DeliverRequest {
        event: Some(Event {
            id: "e-1".into(),
            topic: "usage.recorded".into(),
            key: "user-1".into(),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn handler_sees_the_verified_caller() {
    let pki = TestPki::new("trellis.local");
    let server = Workload::load(&pki.issue("settlement", "settlement")).unwrap();
    let client = Workload::load(&pki.issue("usage", "usage")).unwrap();

    let recorder = Recorder::default();
    let callers = recorder.callers.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = trellis::tls::serve_incoming(listener, server.server_config().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EventSubscriberServiceServer::new(recorder))
            .serve_with_incoming(incoming),
    );

    let mut stub = EventSubscriberServiceClient::new(
        channel(&client, addr, ExpectedPeer::Exactly(pki.id("settlement"))).unwrap(),
    );
    stub.deliver(event()).await.unwrap();
    let seen = callers.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, pki.id("usage"));
    assert_eq!(seen[0].id.service(), Some("usage"));
    assert_eq!(seen[0].remote_addr.ip(), addr.ip());
}

#[tokio::test]
async fn plaintext_request_has_no_identity() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EventSubscriberServiceServer::new(Recorder::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut stub = EventSubscriberServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = stub.deliver(event()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("mTLS"), "{status:?}");
}
