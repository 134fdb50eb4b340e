"""telco.profile.v1.ProfileService: a Trellis service written in Python.

It joins a user with the plan in force, asking telco.user.v1.UserService
(GetUser and GetSubscription) through the mesh, and stores nothing. Like
every service of the mesh it is plain gRPC on a loopback port, and its
sidecar does the rest: it follows the service's grpc.health.v1, learns its
gRPC services through server reflection, registers it, and carries every
call in (mTLS, authorization) and out (discovery, retries, deadlines).

Environment (as `trellis up` sets it):
  TRELLIS_LISTEN    host:port to serve on (plaintext h2c); required
  TRELLIS_OUTBOUND  the own sidecar's outbound port, the way to every other
                    service (default 127.0.0.1:4140, the sidecar's default)
  TRELLIS_GRACE     how long calls in flight may take to finish after
                    SIGTERM or SIGINT, e.g. "10s" or "500ms" (default 10s)
  TRELLIS_LOG       log level: debug, info, warning, error (default info)

The stubs come from target/python-gen (examples/profile/generate.sh):

    scripts/pytools && examples/profile/generate.sh
    TRELLIS_LISTEN=127.0.0.1:7500 TRELLIS_OUTBOUND=127.0.0.1:7501 \\
        target/pytools/bin/python examples/profile/server.py
"""

import logging
import os
import re
import signal
import sys
import threading
from concurrent import futures
from datetime import timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "target" / "python-gen"
sys.path.insert(0, str(GENERATED))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

try:
    from telco.profile.v1 import profile_pb2, profile_pb2_grpc
    from telco.user.v1 import user_pb2, user_pb2_grpc
except ImportError as e:
    sys.exit(f"profile: cannot import the stubs from {GENERATED} ({e}); run examples/profile/generate.sh")

log = logging.getLogger("profile")

PROFILE_SERVICE = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name

# Statuses of the user service a caller of GetProfile can act on, passed on
# as they are: a bad or unknown ID is theirs to fix; unavailability, a
# deadline or overload is worth retrying later. Anything else (say the mesh
# refusing profile's own call: PERMISSION_DENIED) is this service's problem,
# and the caller sees INTERNAL with the detail only in the log.
PASSED_ON = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}

# Trace context continued from the incoming call to the calls it makes, so
# that the whole request is one trace.
TRACE_HEADERS = ("traceparent", "tracestate")

# Rich error details (google.rpc.Status, e.g. the field violations of an
# INVALID_ARGUMENT), passed on with the status they belong to.
STATUS_DETAILS = "grpc-status-details-bin"


class Profiles(profile_pb2_grpc.ProfileServiceServicer):
    """ProfileService over a UserService client on the own sidecar."""

    def __init__(self, users):
        self.users = users

    def GetProfile(self, request, context):
        if not request.user_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: is required")
        forwarded = tuple((k, v) for k, v in context.invocation_metadata() if k in TRACE_HEADERS)
        # Both calls at once, each with what is left of the caller's
        # deadline (None: no deadline; the mesh route's timeout applies).
        options = dict(timeout=context.time_remaining(), metadata=forwarded)
        user_call = self.users.GetUser.future(user_pb2.GetUserRequest(user_id=request.user_id), **options)
        subscription_call = self.users.GetSubscription.future(
            user_pb2.GetSubscriptionRequest(user_id=request.user_id), **options
        )
        try:
            user = user_call.result().user
        except grpc.RpcError as e:
            subscription_call.cancel()
            pass_on(context, "GetUser", e)
        try:
            subscription = subscription_call.result()
        except grpc.RpcError as e:
            # The user exists (GetUser said so): NOT_FOUND here means no plan
            # in force now, which a profile shows rather than fails on.
            if e.code() != grpc.StatusCode.NOT_FOUND:
                pass_on(context, "GetSubscription", e)
            subscription = user_pb2.GetSubscriptionResponse()
        return profile_pb2.GetProfileResponse(profile=profile(user, subscription))


def profile(user, subscription):
    """The profile of `user` (telco.user.v1.User) on `subscription`."""
    p = profile_pb2.Profile(
        user_id=user.id,
        msisdn=user.msisdn,
        name=user.name,
        email=user.email,
        created_at=user.created_at,
    )
    summary = f"{user.name} ({user.msisdn}, {user.email}): "
    if subscription.HasField("subscription"):
        now = subscription.subscription
        p.plan.plan_id = now.plan_id
        p.plan.effective_at.CopyFrom(now.started_at)
        summary += f"plan {now.plan_id} since {when(now.started_at)}"
    else:
        summary += "no plan"
    if subscription.HasField("scheduled"):
        next_ = subscription.scheduled
        p.scheduled.plan_id = next_.plan_id
        p.scheduled.effective_at.CopyFrom(next_.started_at)
        summary += f", then plan {next_.plan_id} from {when(next_.started_at)}"
    p.summary = summary
    return p


def when(timestamp):
    """A google.protobuf.Timestamp as an ISO 8601 time to the second, in UTC."""
    return timestamp.ToDatetime(tzinfo=timezone.utc).isoformat(timespec="seconds")


def pass_on(context, method, error):
    """Ends the call with the status the user service's `method` failed with
    (see PASSED_ON), or INTERNAL. Never returns."""
    code = error.code()
    if code in PASSED_ON:
        log.debug("UserService/%s: %s: %s", method, code.name, error.details())
        details = [(k, v) for k, v in (error.trailing_metadata() or ()) if k == STATUS_DETAILS]
        if details:
            context.set_trailing_metadata(details)
        context.abort(code, error.details() or f"telco.user.v1.UserService/{method}: {code.name}")
    log.warning("UserService/%s failed: %s: %s", method, code.name, error.details())
    context.abort(grpc.StatusCode.INTERNAL, "the user service could not be asked; see the profile service's log")


class Health(health.HealthServicer):
    """grpc.health.v1 whose Watch streams can be ended: the sidecar keeps one
    open for as long as the service runs, and a stop would otherwise wait
    the whole grace period for it as for a call in flight."""

    def __init__(self):
        super().__init__()
        self._watches_lock = threading.Lock()
        self._watches = set()

    def Watch(self, request, context, send_response_callback=None):
        with self._watches_lock:
            self._watches.add(context)
        context.add_callback(lambda: self._forget(context))
        return super().Watch(request, context, send_response_callback)

    def _forget(self, context):
        with self._watches_lock:
            self._watches.discard(context)

    def end_watches(self):
        """Ends every open Watch (the watcher sees the stream end and takes
        the service for NOT_SERVING)."""
        with self._watches_lock:
            watches = list(self._watches)
        for context in watches:
            context.cancel()


def duration(text):
    """Seconds in a duration with a unit: "750ms", "10s", "1m"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)\s*", text)
    if not m:
        raise ValueError(f"{text!r}: expected a number with a unit (ms, s, m), e.g. 10s")
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m[2]]


def main():
    level = os.environ.get("TRELLIS_LOG", "info")
    if not isinstance(logging.getLevelName(level.upper()), int):
        sys.exit(f"profile: TRELLIS_LOG={level!r}: expected debug, info, warning or error")
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    listen = os.environ.get("TRELLIS_LISTEN")
    outbound = os.environ.get("TRELLIS_OUTBOUND", "127.0.0.1:4140")
    if not listen:
        sys.exit("profile: TRELLIS_LISTEN (host:port to serve on) is not set")
    try:
        grace = duration(os.environ.get("TRELLIS_GRACE", "10s"))
    except ValueError as e:
        sys.exit(f"profile: TRELLIS_GRACE: {e}")

    # Every call to another service goes to the own sidecar, in plaintext;
    # an HTTP proxy from the environment must not come in between.
    channel = grpc.insecure_channel(outbound, options=[("grpc.enable_http_proxy", 0)])
    users = user_pb2_grpc.UserServiceStub(channel)

    # No SO_REUSEPORT (grpcio's default on Linux): a second process on the
    # same address must fail to start rather than share its calls.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(Profiles(users), server)
    status = Health()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    # Reflection lists the service's own gRPC service, which the sidecar
    # registers, besides health and reflection, which it leaves out.
    reflection.enable_server_reflection((PROFILE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        server.add_insecure_port(listen)
    except RuntimeError as e:
        sys.exit(f"profile: cannot listen on {listen}: {e}")

    stop = threading.Event()
    stopped_by = []

    def on_signal(signum, _frame):
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server.start()
    for name in ("", PROFILE_SERVICE):
        status.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s, calling the mesh through %s", PROFILE_SERVICE, listen, outbound)

    stop.wait()
    log.info("%s: draining (grace %gs)", stopped_by[0], grace)
    # NOT_SERVING first, so the sidecar stops sending calls here; then no
    # new calls, and those in flight get the grace period to finish (the
    # sidecar's health Watch is not one of them).
    status.enter_graceful_shutdown()
    done = server.stop(grace)
    status.end_watches()
    done.wait()
    channel.close()
    log.info("stopped")


if __name__ == "__main__":
    main()
