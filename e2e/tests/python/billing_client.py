"""The billing scenario from Python, knowing nothing of the contracts:
every message is built from what the edge's server reflection returns.

    python billing_client.py HOST:PORT MSISDN

Creates a user, subscribes it to the "basic" plan, records data, voice and
SMS usage beyond the plan's allowances, waits until settlement's bill
carries them, and prints one JSON object: the plan, the usage, the bill,
and the total this script computed on its own.
"""

import datetime
import json
import sys
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


class Mesh:
    """Calls methods by name with dict requests, through reflection."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.pool = descriptor_pool.DescriptorPool(
            ProtoReflectionDescriptorDatabase(self.channel)
        )

    def call(self, service: str, method: str, request: dict) -> dict:
        descriptor = self.pool.FindServiceByName(service).FindMethodByName(method)
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        stub = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        message = json_format.ParseDict(request, request_class())
        return json_format.MessageToDict(stub(message, timeout=10))


def main() -> None:
    mesh = Mesh(sys.argv[1])
    user = mesh.call(
        "telco.user.v1.UserService",
        "CreateUser",
        {"msisdn": sys.argv[2], "name": "Grace Hopper", "email": "grace@example.com"},
    )["user"]
    plan = mesh.call("telco.user.v1.UserService", "GetPlan", {"planId": "basic"})["plan"]
    mesh.call(
        "telco.user.v1.UserService", "Subscribe", {"userId": user["id"], "planId": "basic"}
    )
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    used = {
        "USAGE_TYPE_DATA": int(plan["includedDataMb"]) + 100,
        "USAGE_TYPE_VOICE": int(plan["includedVoiceSeconds"]) + 125,
        "USAGE_TYPE_SMS": int(plan["includedSms"]) + 3,
    }
    for i, (kind, quantity) in enumerate(used.items()):
        mesh.call(
            "telco.usage.v1.UsageService",
            "RecordUsage",
            {
                "userId": user["id"],
                "type": kind,
                "quantity": str(quantity),
                "occurredAt": now.isoformat().replace("+00:00", "Z"),
                "idempotencyKey": f"py-{i}",
            },
        )
    expected = (
        int(plan["monthlyFeeCents"])
        + 100 * int(plan["extraDataMbCents"])
        + 3 * int(plan["extraVoiceMinuteCents"])  # 125 s over: three started minutes
        + 3 * int(plan["extraSmsCents"])
    )
    bill = {}
    for _ in range(100):
        try:
            bill = mesh.call(
                "telco.settlement.v1.SettlementService",
                "GetBill",
                {"userId": user["id"], "period": {"year": now.year, "month": now.month}},
            )["bill"]
            if int(bill.get("totalCents", "0")) == expected:
                break
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        time.sleep(0.2)
    print(json.dumps({"plan": plan, "used": used, "bill": bill, "expected": expected}))


if __name__ == "__main__":
    main()
