// The client module paces its says and whispers under the rate limit the
// server tells in `joined.limits` (`say_rate`, `say_burst`; #15), not under
// constants. One test starts a server of its own with `--rate 2 --burst 2`
// (helpers.mjs `startServer`); the shared one of tests/test_js_client.py has
// rate limits off (`--rate 0`).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DEFAULT_PACING, TriochatClient } from '../../static/triochat-client.js';
import { FakeWebSocket, URL_BASE, record, startServer, uid, until } from './helpers.mjs';

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});
function newClient(options = {}) {
  const c = new TriochatClient({ url: URL_BASE, ...options });
  cleanups.push(() => c.close());
  return c;
}

/** A WebSocket that also keeps every frame the server sent, parsed. */
function spyingWebSocket(received) {
  return class extends WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (ev) => received.push(JSON.parse(ev.data)));
    }
  };
}

/** Joins `lobby` on a FakeWebSocket, the server's `joined` carrying `limits`. */
async function joinedWith(client, limits) {
  const before = FakeWebSocket.instances.length;
  const joined = client.join('lobby', { name: 'alice' });
  await until(() => FakeWebSocket.instances.length > before
    && FakeWebSocket.last.sent.some((f) => f.type === 'join'));
  const ws = FakeWebSocket.last;
  const join = ws.sent.find((f) => f.type === 'join');
  ws.receive({
    type: 'joined', room: 'lobby', name: 'alice', token: 't', members: ['alice'], history: [],
    recovered: true, ref: join.ref, ...(limits === undefined ? {} : { limits }),
  });
  await joined;
  return ws;
}

const says = (ws) => ws.sent.filter((f) => f.type === 'say');

describe('a server with --rate 2 --burst 2', () => {
  let server;
  before(async () => {
    server = await startServer(['--rate', '2', '--burst', '2']);
  });
  after(async () => {
    await server?.stop();
  });

  test('six quick says are all acked; the server never refuses one with rate_limited', async () => {
    const received = [];
    const alice = newClient({ url: server.url, transport: 'ws', WebSocket: spyingWebSocket(received) });
    const failures = record(alice, 'error');
    const room = `pace-${uid()}`;
    const info = await alice.join(room, { name: `alice-${uid()}` });
    assert.equal(info.limits.say_rate, 2);
    assert.equal(info.limits.say_burst, 2);
    // 80 % of the rate, half the burst.
    assert.deepEqual(alice.pacing, { rate: 1.6, burst: 1 });

    const entries = [];
    for (let i = 0; i < 6; i++) entries.push(alice.say(room, `m${i}`));
    const acks = () => received.filter((f) => f.type === 'ack');
    await until(() => acks().length === 6, 20000, 'six acks');
    const refused = received.filter((f) => f.type === 'error');
    assert.deepEqual(refused, [], 'the server refused none');
    assert.deepEqual(entries.map((e) => e.state), Array(6).fill('sent'));
    assert.equal(new Set(entries.map((e) => e.id)).size, 6);
    assert.ok(entries.every((e) => e.tries === 1), 'each sent once');
    assert.deepEqual(acks().map((f) => f.ref), entries.map((e) => e.ref));
    assert.deepEqual(
      received.filter((f) => f.type === 'message' && f.room === room).map((f) => f.msg),
      ['m0', 'm1', 'm2', 'm3', 'm4', 'm5'],
    );
    assert.deepEqual([...failures], [], 'no error event');
  });
});

describe('pacing from joined.limits', () => {
  test('the shared server has rate limits off (--rate 0): no pacing, all at once', async () => {
    const alice = newClient({ transport: 'ws' });
    const room = `nopace-${uid()}`;
    const info = await alice.join(room, { name: `alice-${uid()}` });
    assert.equal(info.limits.say_rate, 0);
    assert.equal(alice.pacing.rate, null);
    const entries = [];
    for (let i = 0; i < 30; i++) entries.push(alice.say(room, `n${i}`));
    // Over the old constant burst (10): nothing waits for a token.
    assert.ok(entries.every((e) => e.state === 'sending'), 'all 30 went out at once');
    await until(() => entries.every((e) => e.state === 'sent'), 10000, 'all 30 acked');
  });

  test('80 % of say_rate and half say_burst; the defaults without limits; options as ceilings', async () => {
    FakeWebSocket.instances.length = 0;
    const alice = newClient({ WebSocket: FakeWebSocket });
    assert.deepEqual(alice.pacing, { ...DEFAULT_PACING });
    assert.deepEqual(DEFAULT_PACING, { rate: 8, burst: 10 });
    let ws = await joinedWith(alice, { say_rate: 2, say_burst: 2 });
    assert.deepEqual(alice.pacing, { rate: 1.6, burst: 1 });
    // One at once, the next after 1 / 1.6 s.
    alice.say('lobby', 'a');
    alice.say('lobby', 'b');
    assert.deepEqual(says(ws).map((f) => f.msg), ['a']);
    await until(() => says(ws).length === 2, 2000, 'the second say after its token');

    // Nonsense is ignored; a say_rate of 0 (the server has no limit) is no pacing,
    // and a fractional rate counts.
    ws.receive({ type: 'joined', room: 'lobby', name: 'alice', token: 't', members: [], history: [],
      recovered: true, limits: { say_rate: -1, say_burst: 'x' } });
    assert.deepEqual(alice.pacing, { rate: 1.6, burst: 1 });
    ws.receive({ type: 'joined', room: 'lobby', name: 'alice', token: 't', members: [], history: [],
      recovered: true, limits: { say_rate: 0.5, say_burst: 40 } });
    assert.deepEqual(alice.pacing, { rate: 0.4, burst: 20 });
    ws.receive({ type: 'joined', room: 'lobby', name: 'alice', token: 't', members: [], history: [],
      recovered: true, limits: { say_rate: 0 } });
    assert.equal(alice.pacing.rate, null);

    // A server without limits: the defaults.
    const bob = newClient({ WebSocket: FakeWebSocket });
    await joinedWith(bob);
    assert.deepEqual(bob.pacing, { rate: 8, burst: 10 });

    // The options are ceilings of the caller's own, kept under the server's figures.
    const carol = newClient({ WebSocket: FakeWebSocket, sendRate: 3, sendBurst: 4 });
    assert.deepEqual(carol.pacing, { rate: 3, burst: 4 });
    ws = await joinedWith(carol, { say_rate: 10, say_burst: 20 });
    assert.deepEqual(carol.pacing, { rate: 3, burst: 4 });
    ws.receive({ type: 'joined', room: 'lobby', name: 'alice', token: 't', members: [], history: [],
      recovered: true, limits: { say_rate: 2, say_burst: 2 } });
    assert.deepEqual(carol.pacing, { rate: 1.6, burst: 1 });
    const dave = newClient({ WebSocket: FakeWebSocket, sendRate: null });
    await joinedWith(dave, { say_rate: 2, say_burst: 2 });
    assert.equal(dave.pacing.rate, null);
  });
});
