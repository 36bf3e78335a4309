// The client module on a bad network, against a real server (presence grace
// 1 s, rate limits off; see tests/test_js_client.py): resume with the token
// (rotated) and `since`, reconnect with backoff and jitter, the offline
// queue, the SSE fallback, a takeover (4001), and a long gap filled from
// `history`. The network is a TCP proxy the test controls (helpers.mjs).

import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import { TriochatClient } from '../../static/triochat-client.js';
import {
  FakeWebSocket, Observer, TcpProxy, URL_BASE, nextEvent, record, sleep, uid, until,
} from './helpers.mjs';

const GRACE_MS = 1000; // the test server's --presence-grace

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});
// Node 20's WebSocket never reports a handshake that the proxy cut (no error,
// no close): the client's open timeout ends such an attempt; short here.
function newClient(options = {}) {
  const c = new TriochatClient({ url: URL_BASE, openTimeoutMs: 500, ...options });
  cleanups.push(() => c.close());
  return c;
}
async function newObserver() {
  const o = await Observer.open();
  cleanups.push(() => o.close());
  return o;
}
async function newProxy(options) {
  const p = await new TcpProxy(undefined, options).start();
  cleanups.push(() => p.close());
  return p;
}

describe('resume', () => {
  test('a cut connection rejoins with the rotated token and since: missed messages once, no presence change', async () => {
    const room = `r-${uid()}`;
    const proxy = await newProxy();
    const alice = newClient({ url: proxy.url, backoffBaseMs: 100 });
    const name = `alice-${uid()}`;
    await alice.join(room, { name });
    const bob = await newObserver();
    await bob.join(room, `bob-${uid()}`);
    const got = record(alice, 'message');
    await bob.say(room, 'before');
    await until(() => got.length === 1);
    const firstToken = alice.token;
    proxy.refuse();
    proxy.cut();
    await nextEvent(alice, 'status', (s) => s.state === 'offline');
    const missed = ['one', 'two', 'three'];
    for (const msg of missed) await bob.say(room, msg);
    // The server still holds alice (grace): a say typed now waits in the queue.
    const queued = alice.say(room, 'typed offline');
    assert.equal(queued.state, 'queued');
    proxy.accept();
    const rejoined = nextEvent(alice, 'joined', (j) => j.room === room);
    alice.retryNow();
    const info = await rejoined;
    assert.equal(info.first, false);
    assert.equal(info.recovered, true);
    assert.equal(info.gap, false);
    await until(() => queued.state === 'sent');
    assert.deepEqual(got.map((m) => m.msg), ['before', ...missed, 'typed offline']);
    assert.deepEqual(got.map((m) => m.replay), [false, true, true, true, false]);
    // A new token each time; the old one is dead on the server.
    assert.notEqual(alice.token, firstToken);
    const thief = await newObserver();
    const refused = await thief.request({ type: 'join', room, name, token: firstToken }, 'error');
    assert.equal(refused.code, 'name_taken');
    // Nobody saw her leave or come back, past the cut connection's grace period.
    await sleep(GRACE_MS + 300);
    assert.deepEqual(bob.presence(name), []);
    assert.deepEqual(bob.said(name), ['typed offline']);
  });

  test('the join after a reconnect carries token, rotate and since (what the server is asked)', async () => {
    FakeWebSocket.instances.length = 0;
    const alice = newClient({ WebSocket: FakeWebSocket, backoffBaseMs: 60, backoffCapMs: 60 });
    const joined = alice.join('lobby', { name: 'alice' });
    await until(() => FakeWebSocket.last?.sent.length === 1);
    const first = FakeWebSocket.last;
    first.receive({
      type: 'joined', room: 'lobby', name: 'alice', token: 'tok-1', members: ['alice'],
      history: [{ type: 'message', room: 'lobby', id: 'e-7', name: 'bob', msg: 'hi', ts: 1 }],
      recovered: true, ref: first.sent[0].ref,
    });
    await joined;
    first.drop(1006);
    await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last.sent.length === 1, 3000);
    const join = FakeWebSocket.last.sent[0];
    assert.deepEqual(
      { ...join, ref: undefined },
      { type: 'join', room: 'lobby', name: 'alice', token: 'tok-1', rotate: true, since: 'e-7', ref: undefined },
    );
  });

  test('a new client resumes a stored session: every room, from its last id, nobody sees a flicker', async () => {
    const [a, b] = [`a-${uid()}`, `b-${uid()}`];
    const name = `alice-${uid()}`;
    const tab = newClient();
    await tab.join(a, { name });
    await tab.join(b);
    const bob = await newObserver();
    await bob.join(a, `bob-${uid()}`);
    await bob.join(b);
    const seen = record(tab, 'message');
    await bob.say(a, 'seen in a');
    await until(() => seen.length === 1);
    const session = tab.session();
    assert.equal(session.name, name);
    assert.equal(session.token, tab.token);
    assert.deepEqual(session.rooms.map((r) => r.room), [a, b]);
    assert.equal(session.rooms[0].lastId, seen[0].id);
    tab.close(); // the reload: the connection just goes

    await bob.say(a, 'while reloading');
    const reloaded = newClient();
    const got = record(reloaded, 'message');
    const infos = await reloaded.resume(session);
    assert.deepEqual(infos.map((i) => [i.room, i.first]), [[a, true], [b, true]]);
    assert.equal(reloaded.name, name);
    assert.notEqual(reloaded.token, session.token); // rotated
    assert.deepEqual(got.map((m) => [m.room, m.msg]), [[a, 'while reloading']]);
    await sleep(GRACE_MS + 300);
    assert.deepEqual(bob.presence(name), []);
  });
});

describe('reconnecting', () => {
  test('backoff: full jitter under a ceiling that doubles to the cap, reset by a successful join', async () => {
    const room = `r-${uid()}`;
    const proxy = await newProxy();
    const draws = [0.5, 1, 0.25, 1, 0.999];
    let i = 0;
    const alice = newClient({
      url: proxy.url, transport: 'ws', backoffBaseMs: 80, backoffCapMs: 300, openTimeoutMs: 400,
      random: () => draws[i++ % draws.length],
    });
    await alice.join(room, { name: `alice-${uid()}` });
    const offline = record(alice, 'status');
    proxy.refuse();
    proxy.cut();
    await until(() => offline.filter((s) => s.state === 'offline').length >= 5, 8000);
    const waits = offline.filter((s) => s.state === 'offline').slice(0, 5);
    assert.deepEqual(waits.map((s) => s.ceiling), [80, 160, 300, 300, 300]);
    assert.deepEqual(waits.map((s) => Math.round(s.delay)), [50, 160, 75, 300, 300]); // at least 50 ms
    assert.ok(waits.every((s) => s.lost && typeof s.lost.text === 'string' && !/\d/.test(s.lost.text)));
    assert.equal(waits[0].lost.wasOpen, true);
    assert.equal(waits[1].lost.wasOpen, false);
    assert.equal(waits[1].lost.text, "can't reach the server");
    proxy.accept();
    await nextEvent(alice, 'joined', () => true, 3000);
    offline.length = 0;
    proxy.cut();
    await until(() => offline.some((s) => s.state === 'offline'));
    assert.equal(offline.find((s) => s.state === 'offline').ceiling, 80); // afresh
  });

  test('a first connection that fails is retried within the base delay, and the join goes through', async () => {
    // A page whose very first attempt fails (a busy machine) tries again within
    // backoffBaseMs (500 ms by default), not after a later step's 4 s.
    const room = `r-${uid()}`;
    const proxy = await newProxy();
    proxy.refuse();
    const alice = newClient({ url: proxy.url, transport: 'ws', random: () => 0.999 });
    const statuses = record(alice, 'status');
    const joined = alice.join(room, { name: `alice-${uid()}` });
    await until(() => statuses.some((s) => s.state === 'offline'));
    const first = statuses.find((s) => s.state === 'offline');
    assert.equal(first.ceiling, 500);
    assert.ok(first.delay <= 500, first.delay);
    assert.equal(first.attempt, 1);
    assert.equal(first.lost.wasOpen, false);
    proxy.accept();
    const info = await joined;
    assert.equal(info.first, true);
  });

  test('the offline queue: says typed while refused are sent once each, in order', async () => {
    const room = `r-${uid()}`;
    const proxy = await newProxy();
    const alice = newClient({ url: proxy.url, backoffBaseMs: 100 });
    const name = `alice-${uid()}`;
    await alice.join(room, { name });
    const bob = await newObserver();
    await bob.join(room, `bob-${uid()}`);
    proxy.refuse();
    proxy.cut();
    await nextEvent(alice, 'status', (s) => s.state === 'offline');
    const texts = ['q1', 'q2', 'q3', 'q4'];
    const entries = texts.map((t) => alice.say(room, t));
    assert.ok(entries.every((e) => e.state === 'queued'));
    proxy.accept();
    await until(() => entries.every((e) => e.state === 'sent'), 10000);
    await bob.find((f) => f.type === 'message' && f.msg === 'q4');
    await sleep(300); // a duplicate would come right behind
    assert.deepEqual(bob.said(name), texts);
    assert.equal(alice.outbox.length, 0);
  });

  test('a whisper whose connection dropped before it was confirmed is "uncertain", not resent', async () => {
    FakeWebSocket.instances.length = 0;
    const alice = newClient({ WebSocket: FakeWebSocket, backoffBaseMs: 60, backoffCapMs: 60 });
    const joined = alice.join('lobby', { name: 'alice' });
    await until(() => FakeWebSocket.last?.sent.length === 1);
    const ws = FakeWebSocket.last;
    ws.receive({
      type: 'joined', room: 'lobby', name: 'alice', token: 't', members: ['alice'], history: [],
      recovered: true, ref: ws.sent[0].ref,
    });
    await joined;
    const whisper = alice.whisper('bob', 'psst');
    const say = alice.say('lobby', 'hello');
    assert.deepEqual([whisper.state, say.state], ['sending', 'sending']);
    ws.drop(1006);
    assert.equal(whisper.state, 'uncertain');
    assert.equal(say.state, 'queued'); // says are stored once per ref: resent
    await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last.sent.length === 1, 3000);
    const again = FakeWebSocket.last;
    again.receive({
      type: 'joined', room: 'lobby', name: 'alice', token: 't2', members: ['alice'], history: [],
      recovered: true, ref: again.sent[0].ref,
    });
    await until(() => again.sent.length === 2);
    assert.deepEqual(again.sent[1], { type: 'say', room: 'lobby', msg: 'hello', ref: say.ref });
  });

  test('a rate-limited say is sent again with the same ref, later', async () => {
    FakeWebSocket.instances.length = 0;
    const alice = newClient({ WebSocket: FakeWebSocket, rateRetryMs: 100 });
    const joined = alice.join('lobby', { name: 'alice' });
    await until(() => FakeWebSocket.last?.sent.length === 1);
    const ws = FakeWebSocket.last;
    ws.receive({
      type: 'joined', room: 'lobby', name: 'alice', token: 't', members: ['alice'], history: [],
      recovered: true, ref: ws.sent[0].ref,
    });
    await joined;
    const say = alice.say('lobby', 'hello');
    ws.receive({ type: 'error', code: 'rate_limited', message: 'slow down', ref: say.ref });
    assert.equal(say.state, 'queued');
    await until(() => ws.sent.length === 3);
    assert.deepEqual(ws.sent[2], ws.sent[1]);
  });
});

describe('Server-Sent Events', () => {
  test('forced SSE chats with a WebSocket client; a takeover (4001) stops it for good', async () => {
    const room = `r-${uid()}`;
    const alice = newClient({ transport: 'sse', backoffBaseMs: 100 });
    const name = `alice-${uid()}`;
    await alice.join(room, { name });
    assert.equal(alice.status.transport, 'sse');
    assert.equal(alice.status.fallback, false);
    const bob = await newObserver();
    await bob.join(room, `bob-${uid()}`);
    const got = record(alice, 'message');
    const entry = alice.say(room, 'over SSE');
    await until(() => entry.state === 'sent');
    await bob.find((f) => f.type === 'message' && f.msg === 'over SSE');
    await bob.say(room, 'over WebSocket');
    await until(() => got.length === 2);
    assert.deepEqual(got.map((m) => m.msg), ['over SSE', 'over WebSocket']);

    const statuses = record(alice, 'status');
    const other = await newObserver();
    await other.join(room, name, { token: alice.token });
    await until(() => alice.status.state === 'replaced');
    assert.equal(alice.status.lost.code, 4001);
    await sleep(1000); // several backoff steps: nothing reconnects
    assert.deepEqual(statuses.map((s) => s.state), ['replaced']);
    assert.deepEqual(bob.presence(name), []);
  });

  test('falls back to SSE by itself where WebSocket upgrades are dropped', async () => {
    const room = `r-${uid()}`;
    const proxy = await newProxy({ noUpgrades: true });
    const alice = newClient({ url: proxy.url, backoffBaseMs: 100 });
    const statuses = record(alice, 'status');
    await alice.join(room, { name: `alice-${uid()}` });
    assert.equal(alice.status.transport, 'sse');
    assert.equal(alice.status.fallback, true);
    const kinds = statuses.map((s) => `${s.state}:${s.transport}`);
    assert.equal(kinds.at(-1), 'connected:sse');
    assert.ok(kinds.filter((k) => k === 'connecting:ws').length >= 2, kinds.join(' '));
    const bob = await newObserver();
    await bob.join(room, `bob-${uid()}`);
    const got = record(alice, 'message');
    await bob.say(room, 'hi');
    alice.say(room, 'hello back');
    await until(() => got.length === 2);
    await bob.find((f) => f.type === 'message' && f.msg === 'hello back');
  });
});

describe('a long gap', () => {
  test('more than 200 missed: recovered false, and the gap is filled from history, each once', async () => {
    const room = `g-${uid()}`;
    const proxy = await newProxy();
    const alice = newClient({ url: proxy.url, backoffBaseMs: 100 });
    await alice.join(room, { name: `alice-${uid()}` });
    const bob = await newObserver();
    await bob.join(room, `bob-${uid()}`);
    const got = record(alice, 'message');
    await bob.say(room, 'before');
    await until(() => got.length === 1);
    proxy.refuse();
    proxy.cut();
    await nextEvent(alice, 'status', (s) => s.state === 'offline');
    const missed = Array.from({ length: 230 }, (_, i) => `missed ${i}`);
    const acks = missed.map((_, i) => bob.waitFor((f) => f.type === 'ack' && f.ref === `g${i}`, 10000));
    missed.forEach((msg, i) => bob.send({ type: 'say', room, msg, ref: `g${i}` }));
    await Promise.all(acks);
    const gap = nextEvent(alice, 'gap', (g) => g.state === 'done', 10000);
    const joined = nextEvent(alice, 'joined', (j) => j.room === room);
    proxy.accept();
    alice.retryNow();
    const info = await joined;
    assert.equal(info.recovered, false);
    assert.equal(info.gap, true);
    const filled = await gap;
    assert.equal(filled.complete, true);
    // The join replayed the newest 100; the gap holds the 130 before them.
    const replayed = got.slice(1).map((m) => m.msg);
    assert.deepEqual(replayed, missed.slice(130));
    assert.deepEqual(filled.messages.map((m) => m.msg), missed.slice(0, 130));
  });
});
