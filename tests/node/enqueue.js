// The web tier's side of the enqueue contract (docs/enqueue.md), as TypeScript code would do it
// with node-postgres: its own change and the job_outbox row commit in one transaction.
// Usage: DATABASE_URL=... SUMSUB_WEBHOOK_SECRET=... node enqueue.js <user_id> <applicant_id>
const crypto = require("node:crypto");
const { Client } = require("pg");

async function main() {
  const [userId, applicantId] = process.argv.slice(2);
  const client = new Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();

  // What Sumsub would POST; the web tier forwards the raw text byte-exact with its headers.
  const body = JSON.stringify({
    type: "applicantReviewed",
    applicantId,
    externalUserId: userId,
    reviewResult: { reviewAnswer: "GREEN", rejectLabels: [] },
    levelName: "basic-kyc-level",
    createdAtMs: String(Date.now()),
  });
  const digest = crypto.createHmac("sha256", process.env.SUMSUB_WEBHOOK_SECRET).update(body, "utf8").digest("hex");

  try {
    await client.query("BEGIN");
    await client.query(
      "INSERT INTO users (id, kyc_status, kyc_applicant_id) VALUES ($1, 'pending', $2)",
      [userId, applicantId],
    );
    const idempotencyKey = "sumsub:" + crypto.createHash("sha256").update(body, "utf8").digest("hex");
    const payload = {
      body,
      headers: { "X-Payload-Digest": digest, "X-Payload-Digest-Alg": "HMAC_SHA256_HEX" },
      received_at: new Date().toISOString(),
    };
    const res = await client.query(
      `INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ($1, $2, $3)
       ON CONFLICT (idempotency_key) DO NOTHING RETURNING id`,
      ["kyc.sumsub_webhook", payload, idempotencyKey],
    );
    await client.query("COMMIT");
    console.log(JSON.stringify({ outbox_id: res.rows[0] ? Number(res.rows[0].id) : null }));
  } catch (err) {
    await client.query("ROLLBACK");
    throw err;
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
