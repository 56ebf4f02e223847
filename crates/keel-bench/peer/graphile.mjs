// graphile-worker benchmark peer for Keel's queue (keel-bench S4): no-op `ping` jobs.
//
//   node graphile.mjs burst N          N jobs inserted at once (one add_jobs statement) into an
//                                      idle, listening worker; timed from just before the insert
//                                      until all N have run and been deleted.
//   node graphile.mjs rate R SECONDS   R jobs/s enqueued one by one (add_job) for SECONDS s over
//                                      GW_ENQUEUERS connections; enqueue-to-start latency per job.
//
// Each prints ONE line of JSON on stdout; diagnostics go to stderr. `rate` adds
// enqueued_per_second: the rate the enqueuers achieved, which can fall short of R (add_job
// NOTIFYs inside its own transaction, and PostgreSQL serialises notifying commits).
//
// Environment (defaults in brackets):
//   PGHOST [/tmp/gwpeer] PGPORT [5499] PGUSER [postgres] PGDATABASE [postgres]  (libpq-style)
//   GW_CONCURRENCY [64]           preset.worker.concurrentJobs
//   GW_LOCAL_QUEUE [1000]         preset.worker.localQueue.size (-1 disables the local queue)
//   GW_MAX_POOL [max(10, concurrency+2)]  preset.worker.maxPoolSize (as the docs recommend)
//   GW_ENQUEUERS [8]              connections enqueuing in `rate` mode
//
// Each run starts from an empty jobs table (TRUNCATE of graphile_worker._private_jobs), so run
// it against a database where nothing else uses graphile-worker.
import { performance } from "node:perf_hooks";
import { EventEmitter } from "node:events";
import pg from "pg";
import { Logger, run, runMigrations } from "graphile-worker";

process.env.PGHOST ??= "/tmp/gwpeer";
process.env.PGPORT ??= "5499";
process.env.PGUSER ??= "postgres";
process.env.PGDATABASE ??= "postgres"; // graphile builds its own pool from PG* when this is set

const concurrency = Number(process.env.GW_CONCURRENCY ?? 64);
const localQueueSize = Number(process.env.GW_LOCAL_QUEUE ?? 1000);
const maxPoolSize = Number(process.env.GW_MAX_POOL ?? Math.max(10, concurrency + 2));
const enqueuers = Number(process.env.GW_ENQUEUERS ?? 8);

// graphile-worker's documented batched configuration (docs/performance#batching), as a preset.
const preset = {
  worker: {
    concurrentJobs: concurrency,
    maxPoolSize,
    localQueue: { size: localQueueSize },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};
// The default console logger prints info lines on stdout; keep stdout for the JSON line.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") process.stderr.write(`[graphile ${level}] ${message}\n`);
});

// Wall-clock milliseconds with sub-ms resolution (same clock as PostgreSQL's clock_timestamp()).
const wallMs = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const [mode, ...args] = process.argv.slice(2);
if (!(mode === "burst" && args.length === 1) && !(mode === "rate" && args.length === 2)) {
  process.stderr.write("usage: node graphile.mjs burst N | rate R SECONDS\n");
  process.exit(2);
}

const db = new pg.Pool({ max: Math.max(enqueuers, 1) }); // ours, for inserts and checks
await runMigrations({ preset, logger }); // installs/updates the graphile_worker schema
await db.query("TRUNCATE graphile_worker._private_jobs"); // no jobs left over from a previous run

// The no-op task: records which jobs ran (graphile is at-least-once, so count distinct ids) and,
// in `rate` mode, the latency from the enqueue time the job carries in its payload.
const done = new Set();
let runs = 0;
const latencies = [];
let allDone = null; // resolves once `expected` distinct jobs have run
let expected = Infinity;
const ping = async (payload, helpers) => {
  const now = wallMs();
  runs++;
  done.add(helpers.job.id);
  if (payload && payload.t !== undefined) latencies.push(now - payload.t);
  if (done.size >= expected && allDone) allDone();
};

// Start the worker first and wait until it LISTENs, so the insert finds it idle and waiting.
const events = new EventEmitter();
const listening = new Promise((r) => events.once("pool:listen:success", r));
// parsedCronItems: [] so that no `crontab` file in the working directory is picked up.
const runner = await run({ preset, logger, events, taskList: { ping }, parsedCronItems: [], noHandleSignals: true });
await listening;
await sleep(500); // let the local queue's first (empty) fetch finish

// Waits until `n` distinct jobs have run in-process, then until the jobs table is empty (their
// completions are batched, so a job's row is deleted shortly after its task returns).
async function drained(n) {
  const guard = setTimeout(() => {
    process.stderr.write(`gave up: ${done.size} of ${n} jobs ran in 300 s\n`);
    process.exit(1);
  }, 300_000);
  expected = n;
  if (done.size < n) await new Promise((r) => (allDone = r));
  while ((await db.query("SELECT EXISTS (SELECT 1 FROM graphile_worker._private_jobs) AS left")).rows[0].left) {
    await sleep(2);
  }
  clearTimeout(guard);
}

let result;
if (mode === "burst") {
  const n = Number(args[0]);
  const started = wallMs();
  // The documented bulk insert: one add_jobs call with N specs; it NOTIFYs jobs:insert once.
  // count(*) so that the N inserted rows aren't sent back.
  await db.query(
    `SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
       SELECT ROW('ping', '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
       FROM generate_series(1, $1::int)))`,
    [n],
  );
  const inserted = wallMs();
  await drained(n);
  const seconds = (wallMs() - started) / 1000;
  process.stderr.write(
    `burst: insert took ${((inserted - started) / 1000).toFixed(3)} s; ${done.size} distinct jobs ran; jobs table empty\n`,
  );
  result = { mode: "burst", jobs: n, seconds: round(seconds, 3), per_second: Math.round(n / seconds) };
} else {
  const [rate, seconds] = args.map(Number);
  // Open loop: job i is due at start + i/R; whatever is due is sent, each on the next free of
  // the `enqueuers` connections. The enqueue time is the database's clock_timestamp() at the
  // insert (as Keel's created_at), so a backlog on the client side is not counted as latency.
  const total = Math.floor(rate * seconds);
  const start = wallMs();
  const inserts = [];
  let sent = 0;
  let maxBehind = 0;
  while (sent < total) {
    const due = Math.min(total, Math.floor(((wallMs() - start) * rate) / 1000) + 1);
    maxBehind = Math.max(maxBehind, due - sent - 1);
    for (; sent < due; sent++) {
      inserts.push(db.query({
        name: "add_ping",
        text: "SELECT graphile_worker.add_job('ping', json_build_object('t', extract(epoch FROM clock_timestamp()) * 1000)) IS NOT NULL",
      }));
    }
    await sleep(1);
  }
  await Promise.all(inserts);
  const enqueueSeconds = (wallMs() - start) / 1000;
  await drained(total);
  latencies.sort((a, b) => a - b);
  process.stderr.write(
    `rate: ${total} enqueued in ${enqueueSeconds.toFixed(2)} s (${Math.round(total / enqueueSeconds)}/s), ` +
      `at most ${maxBehind} due but unsent at a tick; ${latencies.length} latencies\n`,
  );
  result = {
    mode: "rate", rate, jobs: total,
    // What the enqueuers achieved: add_job commits can fall behind R (see the report's caveats).
    enqueued_per_second: Math.round(total / enqueueSeconds),
    p50_ms: round(quantile(latencies, 0.5), 2),
    p99_ms: round(quantile(latencies, 0.99), 2),
    p999_ms: round(quantile(latencies, 0.999), 2),
  };
}

if (runs !== done.size) process.stderr.write(`note: ${runs - done.size} job(s) ran more than once\n`);
await runner.stop();
await db.end();
console.log(JSON.stringify(result));

// Linear interpolation between closest ranks, as PostgreSQL's percentile_cont (Keel's figures).
function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}
function round(x, digits) {
  return Number(x.toFixed(digits));
}
