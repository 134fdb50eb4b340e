//! The gRPC services: ArchiveEventsService (delivery) and ArchiveService
//! (status).

use tonic::{Request, Response, Status};
use trellis::pb::telco::archive::v1::archive_events_service_server::ArchiveEventsService;
use trellis::pb::telco::archive::v1::archive_service_server::ArchiveService;
use trellis::pb::telco::archive::v1::{GetArchiveStatusRequest, GetArchiveStatusResponse};
use trellis::pb::telco::usage::v1::UsageRecordedEvent;
use trellis::pb::trellis::events::v1::{DeliverRequest, DeliverResponse};

use crate::record::{ArchivedRecord, TOPIC};
use crate::store::{AppendError, Outcome};
use crate::writer::{ArchiveHandle, WriterError};

pub use trellis::pb::telco::archive::v1::archive_events_service_server::ArchiveEventsServiceServer;
pub use trellis::pb::telco::archive::v1::archive_service_server::ArchiveServiceServer;

/// gRPC name of the delivery service.
pub const EVENTS_SERVICE: &str = "telco.archive.v1.ArchiveEventsService";
/// gRPC name of the status service.
pub const ARCHIVE_SERVICE: &str = "telco.archive.v1.ArchiveService";

/// ArchiveEventsService: archives each `usage.recorded` event once.
#[derive(Clone, Debug)]
pub struct EventsApi {
    archive: ArchiveHandle,
}

impl EventsApi {
    /// Delivery into `archive`.
    pub fn new(archive: ArchiveHandle) -> Self {
        Self { archive }
    }
}

#[tonic::async_trait]
impl ArchiveEventsService for EventsApi {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let event = trellis::events::accept(request.get_ref())?;
        if event.topic != TOPIC {
            // The delivery contract: topics a subscriber does not handle are
            // acknowledged and ignored.
            tracing::debug!(topic = %event.topic, event.id = %event.id, "ignoring an event of another topic");
            return Ok(Response::new(DeliverResponse { duplicate: false }));
        }
        let payload = trellis::events::decode::<UsageRecordedEvent>(event)?;
        let record = ArchivedRecord::from_event(event, &payload)?;
        let outcome = self.archive.append(record).await.map_err(status)?;
        Ok(Response::new(DeliverResponse {
            duplicate: outcome == Outcome::Duplicate,
        }))
    }
}

/// ArchiveService: what the archive holds.
#[derive(Clone, Debug)]
pub struct StatusApi {
    archive: ArchiveHandle,
}

impl StatusApi {
    /// Status of `archive`.
    pub fn new(archive: ArchiveHandle) -> Self {
        Self { archive }
    }
}

#[tonic::async_trait]
impl ArchiveService for StatusApi {
    async fn get_archive_status(
        &self,
        _request: Request<GetArchiveStatusRequest>,
    ) -> Result<Response<GetArchiveStatusResponse>, Status> {
        let status = self.archive.status().await.map_err(status)?;
        let records = status
            .committed_records
            .saturating_add(status.journal_records);
        Ok(Response::new(GetArchiveStatusResponse {
            records: i64::try_from(records).unwrap_or(i64::MAX),
            files: i64::try_from(status.files).unwrap_or(i64::MAX),
            journal_records: i64::try_from(status.journal_records).unwrap_or(i64::MAX),
            days: status.days,
            last_commit_at: status.last_commit_at.map(|t| prost_types::Timestamp {
                seconds: t.unix_timestamp(),
                // Always within 0..1e9.
                nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
            }),
        }))
    }
}

/// What a caller sees when the writer could not archive a record.
fn status(error: WriterError) -> Status {
    match error {
        WriterError::Append(AppendError::TooManyKeys(_)) => {
            Status::resource_exhausted(error.to_string())
        }
        WriterError::Append(AppendError::Unwritable(_)) => {
            // The detail (paths, OS error) is in the writer's log.
            Status::unavailable("the archive cannot write its directory; try again")
        }
        WriterError::Stopped => Status::unavailable("the archive is shutting down; try again"),
    }
}
