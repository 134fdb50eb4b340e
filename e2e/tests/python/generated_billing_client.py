"""The billing scenario from Python with stubs generated from proto/
(`scripts/gen-clients python`), through the edge in plaintext h2c:

    python generated_billing_client.py HOST:PORT [--stubs DIR] [--msisdn +49...]

Lists the plans, creates a user, subscribes it to "basic", checks that a
bad phone number is INVALID_ARGUMENT naming the field, records data, voice
and SMS usage beyond the plan's allowances (and one of them again, which
must come back as a duplicate), then polls settlement until the month's
bill carries the usage and checks every amount against the plan's prices.
Prints one JSON object on success; on any mismatch prints what differs to
stderr and exits 1.

The stubs are looked for in --stubs, else $TRELLIS_PYTHON_STUBS, else
target/clients/python in this repository.
"""

import argparse
import datetime
import json
import os
import pathlib
import random
import sys
import time

import grpc
from google.protobuf import timestamp_pb2

CALL_TIMEOUT = 10  # seconds, per call
BILL_DEADLINE = 30  # seconds for settlement to catch up with the usage


class Mismatch(Exception):
    """What the mesh answered is not what the scenario expects."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Mismatch(what)


def default_stubs() -> str:
    """$TRELLIS_PYTHON_STUBS, else target/clients/python in this repository."""
    if os.environ.get("TRELLIS_PYTHON_STUBS"):
        return os.environ["TRELLIS_PYTHON_STUBS"]
    here = pathlib.Path(__file__).resolve()
    repo = here.parents[3] if len(here.parents) > 3 else pathlib.Path.cwd()
    return str(repo / "target" / "clients" / "python")


def load_stubs(directory: str):
    if not pathlib.Path(directory, "telco", "user", "v1", "user_pb2.py").is_file():
        sys.exit(
            f"generated_billing_client: no generated stubs in {directory}; "
            "run scripts/gen-clients python (or pass --stubs DIR)"
        )
    sys.path.insert(0, directory)
    # pylint: disable=import-outside-toplevel
    from telco.settlement.v1 import settlement_pb2, settlement_pb2_grpc
    from telco.usage.v1 import usage_pb2, usage_pb2_grpc
    from telco.user.v1 import user_pb2, user_pb2_grpc

    return (
        (user_pb2, user_pb2_grpc),
        (usage_pb2, usage_pb2_grpc),
        (settlement_pb2, settlement_pb2_grpc),
    )


def scenario(edge: str, stubs: str, msisdn: str) -> dict:
    (user_pb2, user_grpc), (usage_pb2, usage_grpc), (settlement_pb2, settlement_grpc) = (
        load_stubs(stubs)
    )
    channel = grpc.insecure_channel(edge)
    users = user_grpc.UserServiceStub(channel)
    usage = usage_grpc.UsageServiceStub(channel)
    settlement = settlement_grpc.SettlementServiceStub(channel)

    # The catalogue.
    plans = users.ListPlans(user_pb2.ListPlansRequest(), timeout=CALL_TIMEOUT).plans
    by_id = {p.id: p for p in plans}
    check("basic" in by_id, f"ListPlans has no basic plan: {sorted(by_id)}")
    plan = by_id["basic"]
    check(plan.currency_code == "EUR", f"basic is priced in {plan.currency_code!r}, not EUR")
    check(plan.monthly_fee_cents > 0, f"basic has no monthly fee: {plan}")
    for name in ("extra_data_mb_cents", "extra_voice_minute_cents", "extra_sms_cents"):
        check(getattr(plan, name) > 0, f"basic has no {name}: {plan}")

    # A user and a subscription.
    user = users.CreateUser(
        user_pb2.CreateUserRequest(msisdn=msisdn, name="Grace Hopper", email="grace@example.com"),
        timeout=CALL_TIMEOUT,
    ).user
    check(bool(user.id), "CreateUser returned no user id")
    check(user.msisdn == msisdn, f"CreateUser stored msisdn {user.msisdn!r}, sent {msisdn!r}")
    subscription = users.Subscribe(
        user_pb2.SubscribeRequest(user_id=user.id, plan_id=plan.id), timeout=CALL_TIMEOUT
    ).subscription
    check(subscription.plan_id == plan.id, f"Subscribe answered plan {subscription.plan_id!r}")
    check(subscription.user_id == user.id, f"Subscribe answered user {subscription.user_id!r}")

    # Bad input is INVALID_ARGUMENT with a message naming the field.
    try:
        users.CreateUser(
            user_pb2.CreateUserRequest(msisdn="not a number", name="X", email="x@example.com"),
            timeout=CALL_TIMEOUT,
        )
        raise Mismatch("CreateUser with msisdn 'not a number' succeeded")
    except grpc.RpcError as error:
        check(
            error.code() == grpc.StatusCode.INVALID_ARGUMENT,
            f"a bad msisdn gave {error.code()}: {error.details()!r}, not INVALID_ARGUMENT",
        )
        check(
            "msisdn" in (error.details() or ""),
            f"the INVALID_ARGUMENT message does not name msisdn: {error.details()!r}",
        )
        invalid = {"code": error.code().name, "message": error.details()}

    # Usage beyond every allowance: 100 MB, 125 s (three started minutes), 3 SMS.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    occurred_at = timestamp_pb2.Timestamp()
    occurred_at.FromDatetime(now)
    over = {
        usage_pb2.USAGE_TYPE_DATA: 100,
        usage_pb2.USAGE_TYPE_VOICE: 125,
        usage_pb2.USAGE_TYPE_SMS: 3,
    }
    included = {
        usage_pb2.USAGE_TYPE_DATA: plan.included_data_mb,
        usage_pb2.USAGE_TYPE_VOICE: plan.included_voice_seconds,
        usage_pb2.USAGE_TYPE_SMS: plan.included_sms,
    }
    rates = {
        usage_pb2.USAGE_TYPE_DATA: plan.extra_data_mb_cents,
        usage_pb2.USAGE_TYPE_VOICE: plan.extra_voice_minute_cents,
        usage_pb2.USAGE_TYPE_SMS: plan.extra_sms_cents,
    }
    used = {kind: included[kind] + extra for kind, extra in over.items()}
    for i, (kind, quantity) in enumerate(used.items()):
        request = usage_pb2.RecordUsageRequest(
            user_id=user.id,
            type=kind,
            quantity=quantity,
            occurred_at=occurred_at,
            idempotency_key=f"gen-py-{i}",
        )
        recorded = usage.RecordUsage(request, timeout=CALL_TIMEOUT)
        check(not recorded.duplicate, f"the first RecordUsage {i} came back as a duplicate")
        check(
            recorded.record.quantity == quantity and recorded.record.type == kind,
            f"RecordUsage {i} stored {recorded.record}",
        )
        if i == 0:
            again = usage.RecordUsage(request, timeout=CALL_TIMEOUT)
            check(again.duplicate, "the same RecordUsage again was not recognised as a duplicate")
            check(
                again.record.id == recorded.record.id,
                f"the duplicate names record {again.record.id}, not {recorded.record.id}",
            )

    # What the bill must say, computed here from the plan's prices.
    amounts = {
        usage_pb2.USAGE_TYPE_DATA: 100 * plan.extra_data_mb_cents,
        usage_pb2.USAGE_TYPE_VOICE: 3 * plan.extra_voice_minute_cents,
        usage_pb2.USAGE_TYPE_SMS: 3 * plan.extra_sms_cents,
    }
    expected_total = plan.monthly_fee_cents + sum(amounts.values())

    # Settlement learns of the usage by events: poll, within a deadline.
    period = settlement_pb2.BillingPeriod(year=now.year, month=now.month)
    deadline = time.monotonic() + BILL_DEADLINE
    bill = None
    last = "no answer yet"
    while True:
        try:
            bill = settlement.GetBill(
                settlement_pb2.GetBillRequest(user_id=user.id, period=period),
                timeout=CALL_TIMEOUT,
            ).bill
            if all(
                any(line.type == kind and line.used_quantity == used[kind] for line in bill.lines)
                for kind in used
            ):
                break
            last = f"bill so far: {bill}"
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            last = f"GetBill: NOT_FOUND: {error.details()}"
        if time.monotonic() > deadline:
            raise Mismatch(
                f"the bill did not show the usage within {BILL_DEADLINE} s; {last}".strip()
            )
        time.sleep(0.2)

    check(bill.user_id == user.id, f"bill of user {bill.user_id!r}, asked for {user.id!r}")
    check(
        (bill.period.year, bill.period.month) == (period.year, period.month),
        f"bill period {bill.period.year}-{bill.period.month}, asked for {period.year}-{period.month}",
    )
    check(bill.plan_id == plan.id, f"bill plan {bill.plan_id!r}, subscribed to {plan.id!r}")
    check(bill.currency_code == plan.currency_code, f"bill currency {bill.currency_code!r}")
    check(
        bill.plan_fee_cents == plan.monthly_fee_cents,
        f"plan fee {bill.plan_fee_cents}, the plan says {plan.monthly_fee_cents}",
    )
    check(
        [line.type for line in bill.lines]
        == [usage_pb2.USAGE_TYPE_DATA, usage_pb2.USAGE_TYPE_VOICE, usage_pb2.USAGE_TYPE_SMS],
        f"bill lines are not DATA, VOICE, SMS: {list(bill.lines)}",
    )
    for line in bill.lines:
        kind = usage_pb2.UsageType.Name(line.type)
        want = (used[line.type], included[line.type], over[line.type], rates[line.type])
        got = (line.used_quantity, line.included_quantity, line.billable_quantity, line.rate_cents)
        check(
            got == want,
            f"{kind} line (used, included, billable, rate) is {got}, expected {want}",
        )
        check(
            line.amount_cents == amounts[line.type],
            f"{kind} line amount {line.amount_cents} cents, expected {amounts[line.type]}",
        )
    check(
        bill.total_cents == expected_total,
        f"bill total {bill.total_cents} cents, expected {expected_total}",
    )

    return {
        "user_id": user.id,
        "plan": plan.id,
        "period": f"{period.year}-{period.month:02d}",
        "used": {usage_pb2.UsageType.Name(k): v for k, v in used.items()},
        "lines": {
            usage_pb2.UsageType.Name(line.type): line.amount_cents for line in bill.lines
        },
        "plan_fee_cents": bill.plan_fee_cents,
        "total_cents": bill.total_cents,
        "expected_total_cents": expected_total,
        "invalid_argument": invalid,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("edge", help="the edge, HOST:PORT (plaintext h2c)")
    parser.add_argument(
        "--stubs",
        default=default_stubs(),
        help="directory of the generated Python stubs",
    )
    parser.add_argument(
        "--msisdn",
        default=f"+4917{random.randrange(10**8, 10**9)}",
        help="the new user's phone number (default: a random German mobile number)",
    )
    args = parser.parse_args()
    try:
        result = scenario(args.edge, args.stubs, args.msisdn)
    except Mismatch as mismatch:
        print(f"generated_billing_client: MISMATCH: {mismatch}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(
            f"generated_billing_client: call failed: {error.code()}: {error.details()}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
