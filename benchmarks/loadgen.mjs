// Load generator for benchmarks/run.py: one Node process, many WebSocket clients.
//
//   node benchmarks/loadgen.mjs '<json config>'
//
// The config names a scenario (saturation, latency, memory, churn, cluster, workers, pauses),
// the server's URL and pid (its CPU and RSS are read from /proc around the
// measured window, so the window is exactly the load generator's) and the
// scenario's numbers. For several server processes (cluster mode), `urls` and
// `serverPids` list them all: clients are spread over the URLs round-robin
// (client i on urls[i % urls.length]) and "server CPU" is the sum over the
// pids; `sidePids` ({name: pid}, e.g. redis-server) are measured separately. Progress goes to stderr; the result is one JSON line on
// stdout. The clients (rawws.mjs) locate frames by their headers and never
// copy, decode or JSON-parse them on the hot path: the type is read from the
// byte after `{"type":"`, and the latency scenario reads only the send
// timestamp the sender put at the start of `msg`.
//
// Every wait is bounded; a watchdog ends the process (exit 2) past its
// deadline. Loopback only: the URL comes from run.py.

import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { CLOSED, OPEN, RawWs } from "./rawws.mjs";

const cfg = JSON.parse(process.argv[2] ?? "{}");
const SERVER_PIDS = cfg.serverPids ?? [cfg.serverPid];
const SERVER_PID = SERVER_PIDS[0]; // RSS: the memory and churn scenarios have one server
const SIDE_PIDS = cfg.sidePids ?? {}; // other processes of the system under test
const URLS = cfg.urls ?? [cfg.url];
const urlOf = (i) => URLS[i % URLS.length];
const CLK_TCK = cfg.clkTck ?? 100;
const TAG = Math.random().toString(36).slice(2, 6); // names unique per run (grace periods)
const WS_OPTIONS = { handshakeTimeoutMs: 10_000, closeTimeoutMs: 5_000 };

const watchdog = setTimeout(() => {
  emit({ ok: false, error: `load generator deadline (${cfg.deadlineS} s) passed` });
  process.exit(2);
}, (cfg.deadlineS ?? 600) * 1000);

// --- helpers -----------------------------------------------------------------

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function log(...args) {
  if (cfg.verbose) process.stderr.write(`[loadgen ${cfg.scenario}] ${args.join(" ")}\n`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const nowMs = () => performance.now();
const nowUs = () => Math.floor(Number(process.hrtime.bigint()) / 1000); // CLOCK_MONOTONIC

function cpuOfS(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK; // utime + stime
}

/** CPU time of every server process, summed. */
function serverCpuS() {
  return SERVER_PIDS.reduce((sum, pid) => sum + cpuOfS(pid), 0);
}

function sideCpuS() {
  return Object.values(SIDE_PIDS).reduce((sum, pid) => sum + cpuOfS(pid), 0);
}

function serverRssKiB() {
  const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${SERVER_PID}/status`, "utf8"));
  return m ? Number(m[1]) : Number.NaN;
}

/** CPU time used by the whole machine (every CPU, every process), in seconds. */
function machineBusyS() {
  const f = readFileSync("/proc/stat", "utf8").split("\n", 1)[0].trim().split(/\s+/);
  // user nice system idle iowait irq softirq steal: everything but idle and iowait.
  const busy = [1, 2, 3, 6, 7, 8].reduce((sum, i) => sum + Number(f[i] ?? 0), 0);
  return busy / CLK_TCK;
}

function selfCpuS() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** A snapshot of the clocks a measured window needs. */
function snapshot() {
  const servers = SERVER_PIDS.map(cpuOfS);
  const side = Object.fromEntries(Object.entries(SIDE_PIDS).map(([k, pid]) => [k, cpuOfS(pid)]));
  return {
    wall: nowMs() / 1000,
    server: servers.reduce((x, y) => x + y, 0),
    servers,
    side,
    sideTotal: Object.values(side).reduce((x, y) => x + y, 0),
    self: selfCpuS(),
    machine: machineBusyS(),
  };
}

function windowOf(a, b) {
  const wall = b.wall - a.wall;
  const side = b.sideTotal - a.sideTotal;
  const w = {
    wallS: wall,
    serverCpuS: b.server - a.server,
    serverCpuPct: (100 * (b.server - a.server)) / wall,
    loadgenCpuPct: (100 * (b.self - a.self)) / wall,
    // Everything else on the machine (other processes, kernel threads such
    // as ksoftirqd): noise when it is more than a few percent.
    otherCpuPct: Math.max(
      0,
      (100 * (b.machine - a.machine - (b.server - a.server) - (b.self - a.self) - side)) / wall,
    ),
  };
  if (SERVER_PIDS.length > 1) {
    w.serversCpuS = b.servers.map((cpu, i) => cpu - a.servers[i]);
    w.serversCpuPct = w.serversCpuS.map((cpu) => (100 * cpu) / wall);
  }
  for (const key of Object.keys(b.side)) {
    w.sideCpuS = { ...w.sideCpuS, [key]: b.side[key] - a.side[key] };
    w.sideCpuPct = { ...w.sideCpuPct, [key]: (100 * (b.side[key] - a.side[key])) / wall };
  }
  return w;
}

/** Wait until the server (all its processes, side ones included) used under
 * `pct`% of a core over `stepMs` (setup done). */
async function waitServerIdle(timeoutMs = 60_000, pct = 5, stepMs = 250) {
  return (await serverIdleSince(timeoutMs, pct, stepMs)) !== null;
}

/** Like `waitServerIdle`: when (nowMs) the first step under `pct`% began, the
 * server's CPU seconds until then, or null after `timeoutMs`. */
async function serverIdleSince(timeoutMs, pct, stepMs) {
  const end = nowMs() + timeoutMs;
  let at = nowMs();
  let last = serverCpuS() + sideCpuS();
  while (nowMs() < end) {
    await sleep(stepMs);
    const cpu = serverCpuS() + sideCpuS();
    const now = nowMs();
    if ((100 * (cpu - last)) / ((now - at) / 1000) < pct) return { at, serverCpuS: last };
    at = now;
    last = cpu;
  }
  return null;
}

async function waitUntil(pred, timeoutMs, stepMs = 20) {
  const end = nowMs() + timeoutMs;
  while (!pred()) {
    if (nowMs() > end) return false;
    await sleep(stepMs);
  }
  return true;
}

/** Run fn(i) for i in [0, n) with at most `limit` at once. */
async function pool(n, limit, fn) {
  let next = 0;
  async function worker() {
    while (next < n) {
      const i = next++;
      await fn(i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, n) }, worker));
}

/** The p-th percentile of `sorted` (ascending) among `total` values, the
 * missing ones (total - sorted.length) counting as infinitely late: null. */
function percentile(sorted, p, total = sorted.length) {
  if (total === 0) return Number.NaN;
  const idx = Math.min(total - 1, Math.max(0, Math.ceil((p / 100) * total) - 1));
  return idx < sorted.length ? sorted[idx] : null;
}

const PREFIX = Buffer.from('{"type":"');
// The first letter of a server frame's type; unique among the frames the
// server sends to these clients.
const T_MESSAGE = "m".charCodeAt(0);
const T_ACK = "a".charCodeAt(0);
const T_JOINED = "j".charCodeAt(0);
const T_ERROR = "e".charCodeAt(0);

/** The first letter of the type of the frame in buf[start:end]. */
function frameType(buf, start, end) {
  if (end - start > 10 && buf.compare(PREFIX, 0, 9, start, start + 9) === 0) return buf[start + 9];
  try {
    const type = JSON.parse(buf.toString("utf8", start, end)).type;
    return typeof type === "string" && type ? type.charCodeAt(0) : 0;
  } catch {
    return 0;
  }
}

/** Errors and unexpected closes, counted, with the first few described. */
class Problems {
  constructor() {
    this.count = 0;
    this.kinds = {};
    this.examples = [];
  }
  add(kind, detail) {
    this.count++;
    this.kinds[kind] = (this.kinds[kind] ?? 0) + 1;
    if (this.examples.length < 5) this.examples.push(`${kind}: ${detail}`);
  }
  toJSON() {
    return { count: this.count, kinds: this.kinds, examples: this.examples };
  }
}

/** The start of a frame, for error reports. */
function excerpt(buf, start, end) {
  return buf.toString("utf8", start, Math.min(end, start + 200));
}

/**
 * Open a connection and join `room` as `name`. Resolves with the socket once
 * `joined` arrived; later frames go to `onFrame(buf, start, end, ws)`.
 * Unexpected closes and errors are recorded in `problems`. Rejects on failure
 * or timeout.
 */
function openAndJoin(url, name, room, onFrame, problems, timeoutMs = 15_000) {
  return new Promise((resolve, reject) => {
    const t0 = nowMs();
    const ws = new RawWs(url, WS_OPTIONS);
    ws.expectedClose = false;
    ws.delivered = 0; // message frames (saturation and cluster count them)
    ws.probe = false;
    ws.node = 0;
    let joined = false;
    const timer = setTimeout(() => {
      if (!joined) {
        ws.expectedClose = true;
        ws.terminate();
        reject(new Error(`join timeout after ${timeoutMs} ms`));
      }
    }, timeoutMs);
    ws.onOpen = () => {
      ws.send(JSON.stringify({ type: "join", room, name }));
    };
    ws.onText = (buf, start, end) => {
      if (joined) {
        onFrame(buf, start, end, ws);
        return;
      }
      const t = frameType(buf, start, end);
      if (t === T_JOINED) {
        joined = true;
        clearTimeout(timer);
        resolve({ ws, joinMs: nowMs() - t0 });
      } else if (t === T_ERROR) {
        clearTimeout(timer);
        ws.expectedClose = true;
        ws.terminate();
        reject(new Error(`error frame on join: ${excerpt(buf, start, end)}`));
      }
    };
    ws.onError = (err) => {
      if (!joined) {
        clearTimeout(timer);
        reject(err);
      } else if (!ws.expectedClose) {
        problems.add("socket error", err.message);
      }
    };
    ws.onClose = (code, reason) => {
      if (!joined) {
        clearTimeout(timer);
        reject(new Error(`closed before joined: ${code} ${reason}`));
      } else if (!ws.expectedClose) {
        problems.add(`close ${code}`, `${reason}`);
      }
    };
  });
}

/** `url`: one URL, or a function of the client's index. */
async function openMany(url, n, limit, nameOf, roomOf, onFrame, problems) {
  const conns = new Array(n);
  let failed = 0;
  const joinMs = [];
  await pool(n, limit, async (i) => {
    try {
      const where = typeof url === "function" ? url(i) : url;
      const c = await openAndJoin(where, nameOf(i), roomOf(i), onFrame, problems);
      conns[i] = c.ws;
      joinMs.push(c.joinMs);
    } catch (err) {
      failed++;
      problems.add("connect/join failed", err.message);
    }
  });
  return { conns, failed, joinMs };
}

async function closeAll(conns, timeoutMs = 5_000) {
  let open = 0;
  for (const ws of conns) {
    if (!ws) continue;
    ws.expectedClose = true;
    if (ws.readyState === OPEN) {
      open++;
      const onClose = ws.onClose;
      ws.onClose = (...args) => {
        open--;
        onClose(...args);
      };
      ws.close(1000, "done");
    }
  }
  await waitUntil(() => open <= 0, timeoutMs, 50);
  for (const ws of conns) if (ws && ws.readyState !== CLOSED) ws.terminate();
}

// --- scenario 1: saturation (and 5: cluster) ---------------------------------------

/**
 * A closed loop: `senders` clients each keep `inflight` says in flight, all
 * `clients` in one room. With `probes` (the cluster scenario) the clients are
 * spread over every URL, each sender puts its send time and number at the
 * start of `msg`, and one receiver per URL (a probe) computes end-to-end
 * latencies from them: split by whether the sender is on the probe's node.
 * Then, if `pacedRate` > 0, a paced phase: `pacedRate` says per second in
 * all (the senders in turn) for `pacedS` seconds, the same latencies measured
 * without the closed loop's queues.
 */
async function saturation({ probes = false } = {}) {
  const { clients, senders, inflight, warmupS, durationS, msgChars } = cfg;
  const problems = new Problems();
  const room = "sat";
  const nodes = URLS.length;
  let delivered = 0;
  let errorFrames = 0;
  // Where probes and acks record: `closed` during the measured window,
  // `paced` during the paced phase, nowhere (null) otherwise.
  const closed = { same: [], cross: [], ack: [] };
  const paced = { same: [], cross: [], ack: [] };
  let sink = null;
  const KEY = Buffer.from('"msg":"t');
  const probe = (buf, start, end, ws) => {
    const at = nowUs();
    let i = buf.indexOf(KEY, start);
    if (i < 0 || i >= end) return;
    i += KEY.length;
    let ts = 0;
    for (let c = buf[i]; c >= 48 && c <= 57; c = buf[++i]) ts = ts * 10 + (c - 48);
    if (buf[i] !== 115) return; // "s"
    let from = 0;
    for (let c = buf[++i]; c >= 48 && c <= 57; c = buf[++i]) from = from * 10 + (c - 48);
    (from % nodes === ws.node ? sink.same : sink.cross).push((at - ts) / 1000);
  };
  const onFrame = (buf, start, end, ws) => {
    const t = frameType(buf, start, end);
    if (t === T_MESSAGE) {
      delivered++;
      ws.delivered++;
      if (ws.probe && sink) probe(buf, start, end, ws);
    } else if (t === T_ACK) ws.onAck?.();
    else if (t === T_ERROR) {
      errorFrames++;
      problems.add("error frame", excerpt(buf, start, end));
    }
  };
  log(`opening ${clients} clients on ${nodes} server(s)`);
  const tOpen = nowMs();
  const { conns, failed } = await openMany(
    urlOf,
    clients,
    50,
    (i) => `${TAG}u${i}`,
    () => room,
    onFrame,
    problems,
  );
  if (failed) return { ok: false, error: `${failed} clients failed to join`, problems };
  const probeIdx = [];
  if (probes) {
    // The first receiver (not a sender) on each node.
    for (let k = 0; k < nodes; k++) {
      let i = senders;
      while (i < clients && i % nodes !== k) i++;
      if (i < clients) {
        conns[i].probe = true;
        conns[i].node = k;
        probeIdx.push(i);
      }
    }
  }
  const idle = await waitServerIdle(180_000); // the joins' presence frames are all out
  const setupS = (nowMs() - tOpen) / 1000;
  /** Messages received by the clients of each node so far. */
  const byNode = () => {
    const counts = new Array(nodes).fill(0);
    conns.forEach((ws, i) => {
      counts[i % nodes] += ws.delivered;
    });
    return counts;
  };

  const payload = "x".repeat(msgChars);
  let running = true;
  let sent = 0;
  let acked = 0;
  let outstanding = 0;
  const sendFns = [];
  for (let s = 0; s < senders; s++) {
    const ws = conns[s];
    let seq = 0;
    const sentAt = []; // acks come back in send order
    const send = probes
      ? () => {
          sentAt.push(nowMs());
          const head = `t${nowUs()}s${s}|`; // the clock the probes read
          const msg = head + payload.slice(Math.min(head.length, msgChars));
          ws.send(`{"type":"say","room":"${room}","msg":"${msg}","ref":"${s}-${seq++}"}`);
          sent++;
          outstanding++;
        }
      : () => {
          sentAt.push(nowMs());
          ws.send(`{"type":"say","room":"${room}","msg":"${payload}","ref":"${s}-${seq++}"}`);
          sent++;
          outstanding++;
        };
    ws.onAck = () => {
      const t = sentAt.shift();
      if (sink) sink.ack.push(nowMs() - t); // say -> ack round trip
      acked++;
      outstanding--;
      if (running) send();
    };
    sendFns.push(send);
    for (let k = 0; k < inflight; k++) send();
  }
  log("warming up");
  await sleep(warmupS * 1000);
  const a = snapshot();
  const d0 = delivered;
  const n0 = byNode();
  const acked0 = acked;
  sink = closed;
  await sleep(durationS * 1000);
  sink = null;
  const b = snapshot();
  const d1 = delivered;
  const n1 = byNode();
  const acked1 = acked;
  running = false;
  const drained = await waitUntil(() => outstanding === 0, 10_000);
  await waitUntil(() => delivered >= acked * clients, 5_000);
  const pacedRate = probes ? (cfg.pacedRate ?? 0) : 0;
  const pacedS = cfg.pacedS ?? 0;
  let pacedSent = 0;
  if (pacedRate > 0 && pacedS > 0) {
    log(`paced: ${pacedRate} says/s for ${pacedS} s`);
    const total = Math.round(pacedRate * pacedS);
    const periodMs = 1000 / pacedRate;
    const t0 = nowMs();
    sink = paced;
    while (pacedSent < total) {
      const wait = t0 + pacedSent * periodMs - nowMs();
      if (wait > 0) await sleep(wait);
      sendFns[pacedSent % senders]();
      pacedSent++;
    }
    await waitUntil(() => outstanding === 0 && delivered >= acked * clients, 5_000);
    sink = null;
  }
  const w = windowOf(a, b);
  const perS = (d1 - d0) / w.wallS;
  const result = {
    ok: true,
    clients,
    senders,
    inflight,
    setupS,
    idle,
    window: w,
    deliveredPerS: perS,
    acceptedPerS: (acked1 - acked0) / w.wallS,
    serverCpuUsPerDelivered: (w.serverCpuS * 1e6) / (d1 - d0),
    ackMs: summarise(closed.ack),
    sent,
    acked,
    delivered,
    missingDeliveries: acked * clients - delivered,
    unacked: outstanding,
    drained,
    errorFrames,
    problems,
  };
  if (probes) {
    const all = [...closed.same, ...closed.cross];
    const pacedAll = [...paced.same, ...paced.cross];
    Object.assign(result, {
      nodes,
      clientsByNode: Array.from({ length: nodes }, (_, k) =>
        conns.reduce((sum, _ws, i) => sum + (i % nodes === k ? 1 : 0), 0),
      ),
      sendersByNode: Array.from({ length: nodes }, (_, k) =>
        Array.from({ length: senders }, (_x, s) => s).filter((s) => s % nodes === k).length,
      ),
      deliveredPerSByNode: n1.map((d, k) => (d - n0[k]) / w.wallS),
      probeClients: probeIdx,
      // End-to-end: the sender's send() to a probe's receipt, in the window.
      e2eMs: summarise(all),
      e2eSameNodeMs: summarise(closed.same),
      e2eCrossNodeMs: summarise(closed.cross),
      e2eSamples: all.length,
      pacedRate,
      pacedS,
      pacedSent,
      pacedE2eMs: summarise(pacedAll),
      pacedE2eSameNodeMs: summarise(paced.same),
      pacedE2eCrossNodeMs: summarise(paced.cross),
      pacedE2eSamples: pacedAll.length,
      pacedAckMs: summarise(paced.ack),
    });
    for (const [key, cpu] of Object.entries(w.sideCpuS ?? {})) {
      result[`${key}CpuUsPerDelivered`] = (cpu * 1e6) / (d1 - d0);
    }
  }
  await closeAll(conns);
  return result;
}

// --- scenario 2: latency -----------------------------------------------------------

async function latency() {
  const { url, clients, rate, warmupS, durationS, drainS, msgChars } = cfg;
  const problems = new Problems();
  const room = "lat";
  const capacity = Math.ceil(clients * rate * (durationS + 2)) + 1024;
  const samples = new Float64Array(capacity);
  let n = 0;
  let received = 0; // deliveries of measured messages
  let deliveredAll = 0; // every message delivery, measured or not (for CPU per delivery)
  let windowStartUs = Number.POSITIVE_INFINITY;
  let windowEndUs = Number.POSITIVE_INFINITY;
  const KEY = Buffer.from('"msg":"t');
  let acked = 0;
  const onFrame = (buf, start, end) => {
    const t = frameType(buf, start, end);
    if (t !== T_MESSAGE) {
      if (t === T_ACK) acked++;
      else if (t === T_ERROR) problems.add("error frame", excerpt(buf, start, end));
      return;
    }
    const at = nowUs();
    deliveredAll++;
    let i = buf.indexOf(KEY, start);
    if (i < 0 || i >= end) return;
    i += KEY.length;
    let ts = 0;
    for (let c = buf[i]; c >= 48 && c <= 57; c = buf[++i]) ts = ts * 10 + (c - 48);
    if (ts < windowStartUs || ts >= windowEndUs) return;
    received++;
    if (n < capacity) samples[n++] = at - ts;
  };
  log(`opening ${clients} clients`);
  const tOpen = nowMs();
  const cpuOpen = serverCpuS() + sideCpuS();
  const { conns, failed } = await openMany(
    url,
    clients,
    50,
    (i) => `${TAG}u${i}`,
    () => room,
    onFrame,
    problems,
  );
  if (failed) return { ok: false, error: `${failed} clients failed to join`, problems };
  // The join storm: until the joins' presence frames are all out, read in
  // 50 ms steps (5 % of a core: 2.5 ms of CPU); the server's CPU until then.
  const idleSince = await serverIdleSince(180_000, 5, 50);
  const idle = idleSince !== null;
  const setupS = ((idle ? idleSince.at : nowMs()) - tOpen) / 1000;
  const setupCpuS = idle ? idleSince.serverCpuS - cpuOpen : Number.NaN;

  const sender = conns[0];
  const pad = "p".repeat(Math.max(0, msgChars - 18));
  const periodMs = 1000 / rate;
  const total = Math.round(rate * (warmupS + durationS));
  const warmupCount = Math.round(rate * warmupS);
  let sent = 0;
  let measuredSent = 0;
  let a = null;
  const t0 = nowMs();
  log(`sending ${total} messages at ${rate}/s`);
  while (sent < total) {
    const due = t0 + sent * periodMs;
    const wait = due - nowMs();
    if (wait > 0) await sleep(wait);
    if (sent === warmupCount) {
      a = snapshot();
      a.delivered = deliveredAll;
      windowStartUs = nowUs();
    }
    const ts = nowUs();
    sender.send(`{"type":"say","room":"${room}","msg":"t${ts}|${pad}","ref":"${sent}"}`);
    sent++;
    if (sent > warmupCount) measuredSent++;
  }
  await sleep(periodMs);
  windowEndUs = nowUs();
  const b = snapshot();
  b.delivered = deliveredAll;
  const expected = measuredSent * clients;
  await waitUntil(() => received >= expected && acked >= sent, drainS * 1000);
  const sorted = samples.subarray(0, n).sort();
  const ms = (us) => (us === null ? null : us / 1000);
  const w = windowOf(a, b);
  const result = {
    ok: true,
    clients,
    rate,
    setupS,
    setupCpuS,
    idle,
    window: w,
    measuredSent,
    expected,
    received,
    lost: expected - received,
    lossPct: (100 * (expected - received)) / expected,
    acked,
    // Over every expected delivery; one not delivered within the drain counts
    // as infinitely late (null).
    p50Ms: ms(percentile(sorted, 50, expected)),
    p90Ms: ms(percentile(sorted, 90, expected)),
    p99Ms: ms(percentile(sorted, 99, expected)),
    maxMs: received < expected ? null : ms(sorted[sorted.length - 1] ?? Number.NaN),
    p99DeliveredMs: ms(percentile(sorted, 99)),
    maxDeliveredMs: ms(sorted[sorted.length - 1] ?? Number.NaN),
    drainS,
    // Every delivery in the window (a backlogged server is still delivering
    // older messages): CPU per delivered message, whichever message it was.
    deliveredInWindow: b.delivered - a.delivered,
    serverCpuUsPerDelivered: (w.serverCpuS * 1e6) / Math.max(1, b.delivered - a.delivered),
    problems,
  };
  await closeAll(conns);
  return result;
}

// --- scenario 3: memory --------------------------------------------------------

async function memory() {
  const { url, conns: count, roomSize, settleS, holdS } = cfg;
  const problems = new Problems();
  const ignore = () => {};
  // A few connections first, so lazy imports and first-use caches are not
  // counted as per-connection memory.
  const warm = await openMany(url, 10, 10, (i) => `${TAG}w${i}`, () => "warm", ignore, problems);
  await closeAll(warm.conns);
  await sleep(1000);
  const rssBase = serverRssKiB();
  log(`opening ${count} connections in rooms of ${roomSize}`);
  const t0 = nowMs();
  const before = snapshot();
  const { conns, failed, joinMs } = await openMany(
    url,
    count,
    100,
    (i) => `${TAG}m${i}`,
    (i) => `r${Math.floor(i / roomSize)}`,
    ignore,
    problems,
  );
  const setupS = (nowMs() - t0) / 1000;
  // The connect phase as a window: the server's CPU per connection is steadier
  // than the rate when the machine's speed varies, and shows who was the limit.
  const setup = windowOf(before, snapshot());
  const idle = await waitServerIdle(180_000); // the joins' presence frames are all out
  const settledS = (nowMs() - t0) / 1000 - setupS;
  await sleep(settleS * 1000);
  const rssJoined = serverRssKiB();
  await sleep(holdS * 1000);
  const rssHeld = serverRssKiB();
  const open = conns.filter((ws) => ws && ws.readyState === OPEN).length;
  joinMs.sort((x, y) => x - y);
  const result = {
    ok: true,
    conns: count,
    roomSize,
    failed,
    held: open,
    setupS,
    settledS,
    idle,
    connectsPerS: count / setupS,
    window: setup,
    setupCpuUsPerConn: (setup.serverCpuS * 1e6) / count,
    joinP99Ms: percentile(joinMs, 99),
    rssBaseKiB: rssBase,
    rssJoinedKiB: rssJoined,
    rssHeldKiB: rssHeld,
    kibPerConn: (rssHeld - rssBase) / count,
    problems,
  };
  log("closing");
  await closeAll(conns, 20_000);
  return result;
}

// --- scenario 4: churn -------------------------------------------------------------

/** One connection's life: connect, join, say one message, leave, close. */
function lifecycle(url, name, room, timeoutMs, stats) {
  return new Promise((resolve) => {
    const t0 = nowMs();
    let tJoin = 0;
    let done = false;
    let failed = false;
    stats.open++;
    stats.maxOpen = Math.max(stats.maxOpen, stats.open);
    const ws = new RawWs(url, WS_OPTIONS);
    const fail = (kind, detail) => {
      if (failed || done) return;
      failed = true;
      stats.problems.add(kind, detail);
      ws.terminate();
    };
    const timer = setTimeout(() => fail("timeout", `${name} not done in ${timeoutMs} ms`), timeoutMs);
    ws.onOpen = () => {
      stats.connectMs.push(nowMs() - t0);
      tJoin = nowMs();
      ws.send(JSON.stringify({ type: "join", room, name }));
    };
    ws.onText = (buf, start, end) => {
      const t = frameType(buf, start, end);
      if (t === T_JOINED) {
        stats.joinMs.push(nowMs() - tJoin);
        ws.send(JSON.stringify({ type: "say", room, msg: `hello from ${name}`, ref: "1" }));
      } else if (t === T_ACK) {
        ws.send(JSON.stringify({ type: "leave", room }));
        done = true;
        ws.close(1000, "bye");
      } else if (t === T_ERROR) {
        fail("error frame", excerpt(buf, start, end));
      }
    };
    ws.onError = (err) => fail("socket error", err.message);
    ws.onClose = (code, reason) => {
      clearTimeout(timer);
      if (!done) fail(`close ${code} before done`, `${reason}`);
      else stats.totalMs.push(nowMs() - t0);
      if (done && !failed) stats.ok++;
      stats.open--;
      resolve();
    };
  });
}

async function churnPhase(url, rate, durationS, tag, stats) {
  const total = Math.round(rate * durationS);
  const pending = [];
  const t0 = nowMs();
  let launched = 0;
  while (launched < total) {
    const due = Math.min(total, Math.floor(((nowMs() - t0) * rate) / 1000) + 1);
    while (launched < due) {
      pending.push(lifecycle(url, `${TAG}${tag}${launched}`, "churn", 10_000, stats));
      launched++;
    }
    await sleep(2);
  }
  const launchS = (nowMs() - t0) / 1000;
  await Promise.all(pending);
  return { launched, launchS, achievedRate: launched / launchS };
}

function newChurnStats() {
  return {
    ok: 0,
    open: 0,
    maxOpen: 0,
    connectMs: [],
    joinMs: [],
    totalMs: [],
    problems: new Problems(),
  };
}

function summarise(ms) {
  ms.sort((x, y) => x - y);
  return { p50: percentile(ms, 50), p99: percentile(ms, 99), max: ms[ms.length - 1] ?? Number.NaN };
}

async function churn() {
  const { url, rate, warmupS, durationS, settleS } = cfg;
  const rssStart = serverRssKiB();
  log(`warm-up: ${warmupS} s at ${rate}/s`);
  const warmStats = newChurnStats();
  await churnPhase(url, rate, warmupS, "w", warmStats);
  await sleep(settleS * 1000);
  const rssBefore = serverRssKiB();
  log(`churn: ${durationS} s at ${rate}/s`);
  const stats = newChurnStats();
  let rssMax = rssBefore;
  const sampler = setInterval(() => {
    rssMax = Math.max(rssMax, serverRssKiB());
  }, 250);
  const a = snapshot();
  const phase = await churnPhase(url, rate, durationS, "c", stats);
  const b = snapshot();
  clearInterval(sampler);
  await sleep(settleS * 1000);
  const rssAfter = serverRssKiB();
  const w = windowOf(a, b);
  return {
    ok: true,
    rate,
    durationS,
    ...phase,
    window: w,
    completed: stats.ok,
    errors: stats.problems.count + warmStats.problems.count,
    warmupErrors: warmStats.problems.count,
    problems: stats.problems,
    warmupProblems: warmStats.problems,
    connectMs: summarise(stats.connectMs),
    joinMs: summarise(stats.joinMs),
    lifecycleMs: summarise(stats.totalMs),
    serverCpuMsPerConn: (w.serverCpuS * 1000) / Math.max(1, phase.launched),
    rssStartKiB: rssStart,
    rssBeforeKiB: rssBefore,
    rssAfterKiB: rssAfter,
    rssMaxDuringKiB: rssMax,
    maxConcurrent: stats.maxOpen,
    rssGrowthPct: (100 * (rssAfter - rssBefore)) / rssBefore,
  };
}

// --- scenario 7: pauses ------------------------------------------------------------

/** The samples of the server's /metrics (Prometheus text) whose name starts
 * with one of `prefixes`, as {"name{labels}": value}; null if it cannot be read. */
async function scrapeMetrics(prefixes) {
  const where = new URL(cfg.url);
  where.protocol = "http:";
  where.pathname = "/metrics";
  try {
    const response = await fetch(where, { signal: AbortSignal.timeout(5_000) });
    if (!response.ok) return null;
    const found = {};
    for (const line of (await response.text()).split("\n")) {
      if (line.startsWith("#") || !prefixes.some((p) => line.startsWith(p))) continue;
      const cut = line.lastIndexOf(" ");
      found[line.slice(0, cut)] = Number(line.slice(cut + 1));
    }
    return found;
  } catch {
    return null;
  }
}

/**
 * `conns` connections held: one room of `receivers` (the first of them the
 * sender) and the rest idle in rooms of `roomSize`. After the joins and
 * `settleS`, the sender says `rate` messages/s for `durationS`; every
 * receiver computes each one's delivery latency (as the latency scenario
 * does), so a stall of the server shows in the highest percentiles. With
 * `metrics` (triochat) the server's /metrics is read after the joins and at
 * both ends of the window (pauses and stalls: src/triochat/pauses.py).
 */
async function pauses() {
  const { url, conns: count, roomSize, receivers, rate, settleS, durationS, drainS } = cfg;
  const problems = new Problems();
  const prefixes = ["triochat_loop_stall", "triochat_gc_pause", "python_gc_collections"];
  const scrape = async () => (cfg.metrics ? await scrapeMetrics(prefixes) : null);
  const capacity = Math.ceil(receivers * rate * (durationS + 2)) + 1024;
  const samples = new Float64Array(capacity);
  let n = 0;
  let received = 0;
  let acked = 0;
  let windowStartUs = Number.POSITIVE_INFINITY;
  let windowEndUs = Number.POSITIVE_INFINITY;
  const KEY = Buffer.from('"msg":"t');
  const onFrame = (buf, start, end) => {
    const t = frameType(buf, start, end);
    if (t !== T_MESSAGE) {
      if (t === T_ACK) acked++;
      else if (t === T_ERROR) problems.add("error frame", excerpt(buf, start, end));
      return;
    }
    const at = nowUs();
    let i = buf.indexOf(KEY, start);
    if (i < 0 || i >= end) return;
    i += KEY.length;
    let ts = 0;
    for (let c = buf[i]; c >= 48 && c <= 57; c = buf[++i]) ts = ts * 10 + (c - 48);
    if (ts < windowStartUs || ts >= windowEndUs) return;
    received++;
    if (n < capacity) samples[n++] = at - ts;
  };
  const ignore = () => {};
  log(`opening ${count} connections: ${receivers} receivers, the rest in rooms of ${roomSize}`);
  const t0 = nowMs();
  const { conns, failed } = await openMany(
    url,
    count,
    100,
    (i) => `${TAG}p${i}`,
    (i) => (i < receivers ? "probe" : `r${Math.floor((i - receivers) / roomSize)}`),
    (buf, start, end, ws) => (ws.probe ? onFrame(buf, start, end) : ignore()),
    problems,
  );
  const setupS = (nowMs() - t0) / 1000;
  if (failed) {
    await closeAll(conns, 20_000);
    return { ok: false, error: `${failed} clients failed to join`, problems };
  }
  for (let i = 0; i < receivers; i++) conns[i].probe = true;
  const idle = await waitServerIdle(180_000); // the joins' presence frames are all out
  const settledS = (nowMs() - t0) / 1000 - setupS;
  const afterJoins = await scrape();
  await sleep(settleS * 1000);

  const sender = conns[0];
  const pad = "p".repeat(Math.max(0, (cfg.msgChars ?? 40) - 18));
  const periodMs = 1000 / rate;
  const total = Math.round(rate * durationS);
  const atStart = await scrape();
  const a = snapshot();
  windowStartUs = nowUs();
  const tSend = nowMs();
  log(`sending ${total} messages at ${rate}/s to ${receivers} receivers`);
  for (let sent = 0; sent < total; sent++) {
    const wait = tSend + sent * periodMs - nowMs();
    if (wait > 0) await sleep(wait);
    const ts = nowUs();
    sender.send(`{"type":"say","room":"probe","msg":"t${ts}|${pad}","ref":"${sent}"}`);
  }
  await sleep(periodMs);
  windowEndUs = nowUs();
  const b = snapshot();
  const atEnd = await scrape();
  const expected = total * receivers;
  await waitUntil(() => received >= expected && acked >= total, drainS * 1000);
  const held = conns.filter((ws) => ws && ws.readyState === OPEN).length;
  const rssHeld = serverRssKiB();
  const sorted = samples.subarray(0, n).sort();
  const ms = (us) => (us === null ? null : us / 1000);
  const result = {
    ok: true,
    conns: count,
    held,
    receivers,
    rate,
    setupS,
    settledS,
    idle,
    connectsPerS: count / setupS,
    window: windowOf(a, b),
    sent: total,
    expected,
    received,
    lossPct: (100 * (expected - received)) / expected,
    // Over every expected delivery; one not delivered within the drain
    // counts as infinitely late (null), as in the latency scenario.
    p50Ms: ms(percentile(sorted, 50, expected)),
    p99Ms: ms(percentile(sorted, 99, expected)),
    p999Ms: ms(percentile(sorted, 99.9, expected)),
    maxMs: received < expected ? null : ms(sorted[sorted.length - 1] ?? Number.NaN),
    drainS,
    rssHeldKiB: rssHeld,
    metrics: cfg.metrics ? { afterJoins, atStart, atEnd } : null,
    problems,
  };
  log("closing");
  await closeAll(conns, 20_000);
  return result;
}

// --- main ------------------------------------------------------------------------

const SCENARIOS = {
  saturation: () => saturation(),
  latency,
  memory,
  churn,
  cluster: () => saturation({ probes: true }),
  workers: () => saturation(), // the processes of --workers as `serverPids`, one URL
  pauses,
};

async function main() {
  const run = SCENARIOS[cfg.scenario];
  if (!run) {
    emit({ ok: false, error: `unknown scenario ${cfg.scenario}` });
    process.exit(2);
  }
  let result;
  try {
    result = await run();
  } catch (err) {
    result = { ok: false, error: String(err?.stack ?? err) };
  }
  clearTimeout(watchdog);
  emit(result);
  process.exit(0);
}

main();
