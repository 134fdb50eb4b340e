//! The gRPC API: `telco.usage.v1.UsageService` and
//! `telco.usage.v1.UsageOutboxService`.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use trellis::db;
use trellis::pb::telco::usage::v1 as pb;
use trellis::pb::telco::usage::v1::usage_outbox_service_server::UsageOutboxService;
use trellis::pb::telco::usage::v1::usage_service_server::UsageService;
use trellis::service::Context;

use crate::domain::{self, NewUsage, StoredUsage};
use crate::store::{self, StoreError};
use crate::subscribers::{self, SubscribedCache};

/// The topic of the event RecordUsage publishes.
pub const TOPIC_USAGE_RECORDED: &str = "usage.recorded";
/// What `limit` 0 means, unless the `max_page_size` setting says otherwise.
pub const DEFAULT_MAX_PAGE_SIZE: u64 = 500;

/// Implements `telco.usage.v1.UsageService` over the service's database,
/// its outbox and (for RecordUsage) the user service.
#[derive(Clone)]
pub struct UsageApi {
    ctx: Context,
    subscribed: Arc<SubscribedCache>,
}

impl fmt::Debug for UsageApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageApi")
            .field("subscribed_cached", &self.subscribed.len())
            .finish_non_exhaustive()
    }
}

impl UsageApi {
    /// The API on `ctx`, with the default cache of subscribed users.
    pub fn new(ctx: Context) -> Self {
        Self::with_cache(ctx, SubscribedCache::default())
    }

    /// The API on `ctx` with a given cache (a zero TTL disables it).
    pub fn with_cache(ctx: Context, cache: SubscribedCache) -> Self {
        Self {
            ctx,
            subscribed: Arc::new(cache),
        }
    }

    /// Answers a request whose key is already taken by `existing`.
    fn answer_existing(
        usage: &NewUsage,
        existing: &StoredUsage,
    ) -> Result<pb::RecordUsageResponse, Status> {
        if usage.same_as(existing) {
            return Ok(pb::RecordUsageResponse {
                record: Some(existing.into()),
                duplicate: true,
            });
        }
        Err(Status::already_exists(format!(
            "idempotency_key {:?} was already used for user {} with different parameters (record {})",
            usage.idempotency_key, usage.user_id, existing.id
        )))
    }
}

/// One record per message, from a page read in full before the first is
/// sent: a page is small (at most `max_page_size`) and the database
/// connection goes back to the pool at once, whatever the client's pace.
type UsageStream = Pin<Box<dyn Stream<Item = Result<pb::ListUsageResponse, Status>> + Send>>;

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn record_usage(
        &self,
        request: Request<pb::RecordUsageRequest>,
    ) -> Result<Response<pb::RecordUsageResponse>, Status> {
        self.ctx.check_ready()?;
        let usage = domain::validate_record(request.get_ref(), OffsetDateTime::now_utc())?;

        // A retry is answered from the database alone: no call to the user
        // service, no event.
        {
            let client = self.ctx.pool.get().await.map_err(db::status)?;
            if let Some(existing) =
                store::find_by_key(&client, &usage.user_id, &usage.idempotency_key)
                    .await
                    .map_err(StoreError::into_status)?
            {
                return Self::answer_existing(&usage, &existing).map(Response::new);
            }
        }

        subscribers::ensure_subscribed(&self.ctx.channel, &self.subscribed, &usage.user_id).await?;

        let mut client = self.ctx.pool.get().await.map_err(db::status)?;
        let tx = client.transaction().await.map_err(db::status)?;
        let Some(created) = store::insert(&tx, &usage)
            .await
            .map_err(StoreError::into_status)?
        else {
            // A concurrent twin (on this instance or another) committed the
            // same key since we looked; the insert waited for it, so it is
            // visible now.
            tracing::debug!(user.id = %usage.user_id, "a concurrent twin recorded the key first");
            let existing = store::find_by_key(&tx, &usage.user_id, &usage.idempotency_key)
                .await
                .map_err(StoreError::into_status)?
                .ok_or_else(|| {
                    Status::aborted("concurrent update of the same idempotency key; try again")
                })?;
            return Self::answer_existing(&usage, &existing).map(Response::new);
        };
        let record = pb::UsageRecord::from(&created);
        self.ctx
            .outbox
            .publish(
                &tx,
                TOPIC_USAGE_RECORDED,
                &created.user_id,
                &pb::UsageRecordedEvent {
                    record: Some(record.clone()),
                },
            )
            .await?;
        tx.commit().await.map_err(db::status)?;
        tracing::debug!(
            usage.id = %created.id,
            user.id = %created.user_id,
            usage.kind = ?created.kind,
            usage.quantity = created.quantity,
            "usage recorded"
        );
        Ok(Response::new(pb::RecordUsageResponse {
            record: Some(record),
            duplicate: false,
        }))
    }

    type ListUsageStream = UsageStream;

    async fn list_usage(
        &self,
        request: Request<pb::ListUsageRequest>,
    ) -> Result<Response<Self::ListUsageStream>, Status> {
        self.ctx.check_ready()?;
        let max = self
            .ctx
            .settings
            .u64_or("max_page_size", DEFAULT_MAX_PAGE_SIZE);
        let query = domain::validate_list(request.get_ref(), max)?;
        let client = self.ctx.pool.get().await.map_err(db::status)?;
        let db = &client;
        let records = store::list(db, &query)
            .await
            .map_err(StoreError::into_status)?;
        let messages = records.into_iter().map(|r| {
            Ok(pb::ListUsageResponse {
                record: Some((&r).into()),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn get_usage_summary(
        &self,
        request: Request<pb::GetUsageSummaryRequest>,
    ) -> Result<Response<pb::GetUsageSummaryResponse>, Status> {
        self.ctx.check_ready()?;
        let request = request.into_inner();
        let query = domain::validate_summary(&request)?;
        let client = self.ctx.pool.get().await.map_err(db::status)?;
        let db = &client;
        let totals = store::summary(db, &query)
            .await
            .map_err(StoreError::into_status)?;
        Ok(Response::new(pb::GetUsageSummaryResponse {
            user_id: query.user_id,
            start_time: request.start_time,
            end_time: request.end_time,
            totals: totals
                .into_iter()
                .map(|t| pb::UsageTotal {
                    r#type: t.kind.to_proto().into(),
                    quantity: t.quantity,
                    record_count: t.records,
                })
                .collect(),
        }))
    }
}

trellis::outbox_service!(
    /// Implements `telco.usage.v1.UsageOutboxService` by handing each call
    /// to the library's outbox operator API.
    pub struct OutboxApi: UsageOutboxService
);
