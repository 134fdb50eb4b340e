//! The gRPC handlers of `telco.user.v1.UserService` and
//! `telco.user.v1.UserOutboxService`.

use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use trellis::db;
use trellis::pb::telco::user::v1 as pb;
use trellis::pb::telco::user::v1::user_outbox_service_server::UserOutboxService;
use trellis::pb::telco::user::v1::user_service_server::UserService;
use trellis::service::Context;

use crate::store;
use crate::validate;

/// Topic of the event announcing a new user (payload `UserCreatedEvent`).
pub const USER_CREATED: &str = "user.created";

/// Topic of the event announcing a plan change (payload
/// `SubscriptionChangedEvent`).
pub const SUBSCRIPTION_CHANGED: &str = "subscription.changed";

/// `UserService` on the service's database and outbox.
#[derive(Clone, Debug)]
pub struct Api {
    ctx: Context,
}

impl Api {
    /// Handlers sharing `ctx` (pool, outbox, readiness).
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl UserService for Api {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        self.ctx.check_ready()?;
        let new_user = validate::new_user(request.into_inner())?;

        let mut client = self.ctx.pool.get().await.map_err(db::status)?;
        let tx = client.transaction().await.map_err(db::status)?;
        // Concurrent creates of one msisdn meet at the unique index: the
        // loser waits for the winner's commit, then fails here.
        let user = match store::insert_user(&tx, &new_user).await {
            Ok(user) => user,
            Err(e) if db::unique_violation(&e) == Some(store::MSISDN_UNIQUE) => {
                return Err(Status::already_exists(format!(
                    "a user with msisdn {} already exists",
                    new_user.msisdn
                )));
            }
            Err(e) => return Err(db::status(e)),
        };
        let user = pb::User::from(user);
        let event = pb::UserCreatedEvent {
            user: Some(user.clone()),
        };
        self.ctx
            .outbox
            .publish(&tx, USER_CREATED, &user.id, &event)
            .await?;
        tx.commit().await.map_err(db::status)?;
        tracing::info!(user.id = %user.id, "user created");
        Ok(Response::new(pb::CreateUserResponse { user: Some(user) }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let id = validate::user_id("user_id", &request.get_ref().user_id)?;
        let client = self.ctx.pool.get().await.map_err(db::status)?;
        let user = store::get_user(&client, id)
            .await
            .map_err(db::status)?
            .ok_or_else(|| user_not_found(id))?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn list_plans(
        &self,
        _request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let client = self.ctx.pool.get().await.map_err(db::status)?;
        let plans = store::list_plans(&client).await.map_err(db::status)?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_plan(
        &self,
        request: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::GetPlanResponse>, Status> {
        let id = validate::plan_id("plan_id", &request.get_ref().plan_id)?;
        let client = self.ctx.pool.get().await.map_err(db::status)?;
        let plan = store::get_plan(&**client, id)
            .await
            .map_err(db::status)?
            .ok_or_else(|| plan_not_found(id))?;
        Ok(Response::new(pb::GetPlanResponse {
            plan: Some(plan.into()),
        }))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        self.ctx.check_ready()?;
        let command = validate::subscribe(request.into_inner(), OffsetDateTime::now_utc())?;
        let user_id = command.user_id;

        let mut client = self.ctx.pool.get().await.map_err(db::status)?;
        let tx = client.transaction().await.map_err(db::status)?;
        // Everything below reads and rewrites the user's plan history; the
        // row lock makes concurrent Subscribes of one user take turns, so
        // each sees the history the previous one left.
        if !store::lock_user(&tx, user_id).await.map_err(db::status)? {
            return Err(user_not_found(user_id));
        }
        let plan = store::get_plan(&*tx, &command.plan_id)
            .await
            .map_err(db::status)?
            .ok_or_else(|| plan_not_found(&command.plan_id))?;
        let timeline = store::timeline(&*tx, user_id, command.effective_at)
            .await
            .map_err(db::status)?
            .ok_or_else(|| user_not_found(user_id))?;

        if let Some(current) = &timeline.in_force
            && current.plan_id == plan.id
            && timeline.next.is_none()
        {
            // Already on this plan then, and nothing changes later: a retry
            // or a no-op, answered with what is there (dropping tx rolls back
            // nothing but the lock).
            return Ok(Response::new(pb::SubscribeResponse {
                subscription: Some(current.clone().into()),
            }));
        }

        let replaced = store::delete_from(&tx, user_id, command.effective_at)
            .await
            .map_err(db::status)?;
        let subscription = store::insert_subscription(&tx, user_id, &plan.id, command.effective_at)
            .await
            .map_err(db::status)?;
        let subscription = pb::Subscription::from(subscription);
        let event = pb::SubscriptionChangedEvent {
            subscription: Some(subscription.clone()),
            previous_plan_id: timeline.in_force.map(|s| s.plan_id).unwrap_or_default(),
            plan: Some(plan.into()),
        };
        self.ctx
            .outbox
            .publish(&tx, SUBSCRIPTION_CHANGED, &subscription.user_id, &event)
            .await?;
        tx.commit().await.map_err(db::status)?;
        tracing::info!(
            user.id = %user_id,
            plan.id = %subscription.plan_id,
            previous_plan.id = %event.previous_plan_id,
            replaced,
            "subscription changed"
        );
        Ok(Response::new(pb::SubscribeResponse {
            subscription: Some(subscription),
        }))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::GetSubscriptionResponse>, Status> {
        let user_id = validate::user_id("user_id", &request.get_ref().user_id)?;
        let client = self.ctx.pool.get().await.map_err(db::status)?;
        let now = OffsetDateTime::now_utc();
        let timeline = store::timeline(&**client, user_id, now)
            .await
            .map_err(db::status)?
            .ok_or_else(|| user_not_found(user_id))?;
        let Some(in_force) = timeline.in_force else {
            return Err(Status::not_found(format!(
                "user {user_id} has no subscription in force"
            )));
        };
        Ok(Response::new(pb::GetSubscriptionResponse {
            subscription: Some(in_force.into()),
            scheduled: timeline.next.map(Into::into),
        }))
    }
}

fn user_not_found(id: uuid::Uuid) -> Status {
    Status::not_found(format!("user {id} not found"))
}

fn plan_not_found(id: &str) -> Status {
    Status::not_found(format!("plan {id:?} not found"))
}

trellis::outbox_service!(
    /// `UserOutboxService`: the library's outbox operator API under this
    /// service's name.
    pub struct OutboxApi: UserOutboxService
);
