// Lists the plans of the Trellis billing system through the mesh edge, with
// the TypeScript stubs generated from proto/ (`npm run gen`: ts-proto with
// @grpc/grpc-js services).
//
//   node dist/list-plans.js [EDGE] [PLAN_ID]
//
// EDGE is host:port in plaintext h2c (default 127.0.0.1:8080, or
// $TRELLIS_EDGE). With PLAN_ID it also fetches that plan with GetPlan.
import { credentials, Metadata, ServiceError, status } from "@grpc/grpc-js";

import {
  GetPlanRequest,
  GetPlanResponse,
  ListPlansRequest,
  ListPlansResponse,
  UserServiceClient,
} from "./gen/telco/user/v1/user";

const edge = process.argv[2] ?? process.env.TRELLIS_EDGE ?? "127.0.0.1:8080";
const planId = process.argv[3];
const timeoutMs = 10_000;

function deadline(): { deadline: Date } {
  return { deadline: new Date(Date.now() + timeoutMs) };
}

function describe(error: ServiceError): string {
  return `${status[error.code] ?? error.code}: ${error.details}`;
}

function listPlans(client: UserServiceClient): Promise<ListPlansResponse> {
  return new Promise((resolve, reject) =>
    client.listPlans(ListPlansRequest.create(), new Metadata(), deadline(), (err, res) =>
      err ? reject(err) : resolve(res),
    ),
  );
}

function getPlan(client: UserServiceClient, id: string): Promise<GetPlanResponse> {
  return new Promise((resolve, reject) =>
    client.getPlan(GetPlanRequest.create({ planId: id }), new Metadata(), deadline(), (err, res) =>
      err ? reject(err) : resolve(res),
    ),
  );
}

async function main(): Promise<void> {
  const client = new UserServiceClient(edge, credentials.createInsecure());
  try {
    const { plans } = await listPlans(client);
    if (plans.length === 0) {
      throw new Error("ListPlans: the catalogue is empty");
    }
    for (const p of plans) {
      console.log(
        `${p.id.padEnd(6)} ${p.name.padEnd(12)} ${String(p.monthlyFeeCents).padStart(6)} ` +
          `${p.currencyCode} cents/month  ${p.includedDataMb} MB, ` +
          `${p.includedVoiceSeconds} s voice, ${p.includedSms} SMS included`,
      );
    }
    if (planId) {
      const { plan } = await getPlan(client, planId);
      console.log(`GetPlan ${plan?.id}: ${plan?.monthlyFeeCents} ${plan?.currencyCode} cents/month`);
    }
  } finally {
    client.close();
  }
}

main().catch((error: unknown) => {
  const text =
    error && typeof error === "object" && "code" in error && "details" in error
      ? describe(error as ServiceError)
      : String(error);
  console.error(`list-plans: ${text}`);
  process.exit(1);
});
