// The client module with connection tokens (docs/protocol.md §15) and the
// server API's moderation (§16), against a real server that
// tests/test_js_client.py starts with --jwt-secret and --api-key (presence
// grace 1 s, rate limits off), passing both in TRIOCHAT_TEST_JWT_SECRET and
// TRIOCHAT_TEST_API_KEY. Tokens are HS256 JWTs made here with node:crypto.
//
// What the server did is read back from the server (the API's presence) or
// from what went over the wire: a WebSocket subclass that keeps every frame
// sent and a fetch wrapper that keeps every SSE request, both real.

import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import { ChatError, TriochatClient, describeClose } from '../../static/triochat-client.js';
import {
  PORT, TcpProxy, URL_BASE, api, makeJwt, nextEvent, record, sleep, uid, until,
} from './helpers.mjs';

const SECRET = process.env.TRIOCHAT_TEST_JWT_SECRET;
const KEY = process.env.TRIOCHAT_TEST_API_KEY;
if (!SECRET || !KEY) {
  throw new Error('TRIOCHAT_TEST_JWT_SECRET/TRIOCHAT_TEST_API_KEY are not set: run through tests/test_js_client.py');
}
const GRACE_MS = 1000; // the test server's --presence-grace

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

/** A token for `sub`, running out `ttl` seconds from now (at a whole second, as `exp` is). */
function tokenFor(sub, { name, rooms, ttl = 60, secret = SECRET } = {}) {
  const claims = { sub, exp: Math.floor(Date.now() / 1000) + ttl };
  if (name !== undefined) claims.name = name;
  if (rooms !== undefined) claims.rooms = rooms;
  return makeJwt(claims, secret);
}

/** A token function that counts its calls (`fn.calls`) and the reasons it was given. */
function tokenSource(sub, options) {
  const fn = async (info) => {
    fn.calls.push(info?.reason);
    return tokenFor(sub, options);
  };
  fn.calls = [];
  return fn;
}

/**
 * The client's connections, as they went over the wire: `sockets` (WebSockets,
 * each with `sent`, the frames sent on it) and `streams` (GET /sse) and `posts`
 * (the frames POSTed to /sse, in order).
 */
function wire() {
  const seen = { sockets: [], streams: 0, posts: [] };
  seen.WebSocket = class extends WebSocket {
    constructor(url) {
      super(url);
      this.sent = [];
      seen.sockets.push(this);
    }

    send(text) {
      this.sent.push(JSON.parse(text));
      super.send(text);
    }
  };
  seen.fetch = (url, init = {}) => {
    if (/\/sse$/.test(String(url))) {
      if (init.method === 'POST') seen.posts.push(JSON.parse(init.body));
      else seen.streams += 1;
    }
    return fetch(url, init);
  };
  seen.connections = () => seen.sockets.length + seen.streams;
  return seen;
}

function newClient(options = {}) {
  const w = wire();
  const c = new TriochatClient({
    url: URL_BASE, openTimeoutMs: 3000, WebSocket: w.WebSocket, fetch: w.fetch, ...options,
  });
  c.wire = w;
  cleanups.push(() => c.close());
  return c;
}

async function presence(room) {
  const res = await api('GET', `/api/presence?room=${room}`, { key: KEY });
  assert.equal(res.status, 200);
  return (await res.json()).members;
}

/** Poll the server's presence of `room` until it is `members` (a leave waits out the grace period). */
async function untilPresence(room, members, ms = GRACE_MS + 4000) {
  const deadline = Date.now() + ms;
  let now;
  for (;;) {
    now = await presence(room);
    if (JSON.stringify(now) === JSON.stringify(members)) return;
    if (Date.now() > deadline) assert.fail(`presence of ${room} stayed ${JSON.stringify(now)}, not ${JSON.stringify(members)}`);
    await sleep(50);
  }
}

describe('authenticating', () => {
  test('auth goes first, the join only after authed, and the name is the token\'s', async () => {
    const room = `r-${uid()}`;
    const sub = `u-${uid()}`;
    const name = `Alice-${uid()}`;
    const token = tokenFor(sub, { name });
    const alice = newClient({ token });
    const authed = nextEvent(alice, 'authed');
    const info = await alice.join(room); // no name: the token has one
    const who = await authed;
    assert.equal(who.user, sub);
    assert.equal(who.name, name);
    assert.equal(who.refreshed, false);
    assert.deepEqual(alice.identity, { user: sub, name, exp: who.exp });
    assert.ok(who.exp > Date.now() / 1000);
    assert.equal(info.name, name);
    assert.equal(alice.name, name);
    assert.deepEqual(info.members, [name]);
    const [ws] = alice.wire.sockets;
    assert.equal(alice.wire.sockets.length, 1);
    assert.deepEqual(ws.sent.map((f) => f.type), ['auth', 'join']);
    assert.equal(ws.sent[0].token, token);
    // Authenticated, a join carries no name and no resume token (§15).
    assert.deepEqual(Object.keys(ws.sent[1]).sort(), ['ref', 'room', 'type']);

    // Another user sees alice's messages under the token's name.
    const bob = newClient({ token: tokenFor(`u-${uid()}`) });
    await bob.join(room);
    const onBob = nextEvent(bob, 'message', (m) => m.msg === 'hi');
    alice.say(room, 'hi');
    assert.equal((await onBob).name, name);
  });

  test('over SSE too: the first POST of the session is auth, the join comes after authed', async () => {
    const room = `r-${uid()}`;
    const sub = `u-${uid()}`;
    const alice = newClient({ token: tokenSource(sub), transport: 'sse' });
    const info = await alice.join(room);
    assert.equal(info.name, sub); // no `name` claim: the name is the sub
    assert.equal(alice.status.transport, 'sse');
    assert.equal(alice.wire.sockets.length, 0);
    assert.deepEqual(alice.wire.posts.map((f) => f.type), ['auth', 'join']);
    const shown = nextEvent(alice, 'message', (m) => m.msg === 'over SSE');
    alice.say(room, 'over SSE');
    assert.equal((await shown).mine, true);
  });

  test('a room the token does not grant is forbidden, like any refused request', async () => {
    const sub = `u-${uid()}`;
    const alice = newClient({ token: tokenFor(sub, { rooms: ['team-*'] }) });
    await alice.join(`team-${uid()}`);
    await assert.rejects(alice.join(`other-${uid()}`), (err) => {
      assert.ok(err instanceof ChatError);
      assert.equal(err.code, 'forbidden');
      return true;
    });
    assert.equal(alice.status.state, 'connected'); // the granted room stays joined
  });

  for (const [what, token] of [
    ['signed with another key', () => tokenFor(`u-${uid()}`, { secret: 'not-the-server-secret' })],
    ['expired already', () => tokenFor(`u-${uid()}`, { ttl: -10 })],
  ]) {
    test(`a refused token (${what}) stops the client: no reconnect loop`, async () => {
      const source = async () => {
        source.calls += 1;
        return token();
      };
      source.calls = 0;
      const alice = newClient({ token: source, backoffBaseMs: 20, backoffCapMs: 40 });
      const errors = record(alice, 'error');
      const stopped = nextEvent(alice, 'status', (s) => s.state === 'stopped');
      await assert.rejects(alice.join(`r-${uid()}`), (err) => err.code === 'unauthorized');
      const s = await stopped;
      assert.equal(s.reason, 'unauthorized');
      assert.equal(s.error.code, 'unauthorized');
      assert.ok(s.error.message.length > 0);
      assert.equal(errors.length, 1);
      assert.equal(errors[0].auth, true);
      // With a 20-40 ms backoff a loop would have made dozens of attempts by now.
      await sleep(500);
      assert.equal(alice.wire.connections(), 1);
      assert.equal(source.calls, 1);
      assert.equal(alice.status.state, 'stopped');
      assert.deepEqual(alice.wire.sockets[0].sent.map((f) => f.type), ['auth']);
    });
  }
});

describe('expiry and refresh', () => {
  test('an expired token (close 4003) brings a fresh one from the function, and the room is rejoined', async () => {
    const room = `r-${uid()}`;
    const sub = `u-${uid()}`;
    const source = tokenSource(sub, { ttl: 3 });
    const alice = newClient({ token: source, refresh: false, backoffBaseMs: 100 });
    await alice.join(room);
    const firstExp = alice.identity.exp;
    const bob = newClient({ token: tokenFor(`u-${uid()}`) });
    await bob.join(room);
    const bobPresence = record(bob, 'presence');

    const lost = await nextEvent(alice, 'status', (s) => s.state === 'offline', 6000);
    assert.equal(lost.lost.code, 4003);
    assert.equal(lost.lost.text, describeClose(4003));
    const rejoined = await nextEvent(alice, 'joined', (j) => j.room === room, 5000);
    assert.equal(rejoined.first, false);
    assert.deepEqual(source.calls, ['connect', 'connect']);
    assert.equal(alice.wire.sockets.length, 2);
    assert.equal(alice.wire.sockets[1].sent[0].type, 'auth');
    assert.notEqual(alice.wire.sockets[1].sent[0].token, alice.wire.sockets[0].sent[0].token);
    assert.ok(alice.identity.exp > firstExp);
    // Back within the grace period: bob saw no leave, and hears alice again.
    const heard = nextEvent(bob, 'message', (m) => m.msg === 'back');
    alice.say(room, 'back');
    assert.equal((await heard).name, sub);
    assert.deepEqual([...bobPresence], []);
  });

  test('a refresh before exp keeps the same connection past the first token\'s exp', async () => {
    const room = `r-${uid()}`;
    const sub = `u-${uid()}`;
    const source = tokenSource(sub, { ttl: 3 });
    const alice = newClient({ token: source });
    const authed = record(alice, 'authed');
    await alice.join(room);
    const statuses = record(alice, 'status');
    const firstExp = authed[0].exp;
    // Well past the first token's end: it was replaced in time (twice by now).
    await until(() => Date.now() > firstExp * 1000 + 1500, 8000, 'past the first exp');
    assert.deepEqual([...statuses], []); // never offline, never reconnecting
    assert.equal(alice.wire.sockets.length, 1);
    const sent = alice.wire.sockets[0].sent.filter((f) => f.type === 'auth');
    assert.ok(sent.length >= 3, `auth frames: ${sent.length}`);
    assert.equal(source.calls[0], 'connect');
    assert.ok(source.calls.slice(1).every((r) => r === 'refresh'));
    assert.ok(authed.length >= 3);
    assert.ok(authed.slice(1).every((a) => a.refreshed && a.user === sub));
    assert.ok(alice.identity.exp > firstExp);
    const shown = nextEvent(alice, 'message', (m) => m.msg === 'still here');
    alice.say(room, 'still here');
    await shown;
    assert.equal(alice.wire.sockets[0].readyState, WebSocket.OPEN);
  });

  test('a string token that expires stops the client: a string cannot give a fresh one', async () => {
    const room = `r-${uid()}`;
    const sub = `u-${uid()}`;
    const alice = newClient({ token: tokenFor(sub, { ttl: 3 }), backoffBaseMs: 20 });
    await alice.join(room);
    const s = await nextEvent(alice, 'status', (x) => x.state === 'stopped', 6000);
    assert.equal(s.reason, 'expired');
    assert.equal(s.lost.code, 4003);
    await untilPresence(room, []); // the grace period passed: nobody came back
    assert.equal(alice.wire.connections(), 1);
  });
});

describe('moderation (the server API)', () => {
  for (const transport of ['ws', 'sse']) {
    test(`an operator's disconnect (4009, ${transport}) stops the client for good`, async () => {
      const room = `r-${uid()}`;
      const sub = `u-${uid()}`;
      const source = tokenSource(sub);
      const alice = newClient({ token: source, transport, backoffBaseMs: 20, backoffCapMs: 40 });
      await alice.join(room);
      assert.deepEqual(await presence(room), [sub]);
      const stopped = nextEvent(alice, 'status', (s) => s.state === 'stopped');
      const res = await api('POST', '/api/disconnect', { key: KEY, body: { user: sub } });
      assert.equal(res.status, 204);
      const s = await stopped;
      assert.equal(s.reason, 'disconnected');
      assert.equal(s.lost.code, 4009);
      assert.equal(s.error.message, 'An operator disconnected you.');
      assert.equal(describeClose(4009), 'an operator disconnected you');
      // Past the grace period the server holds nobody: no attempt came back,
      // though a 20-40 ms backoff would have made many.
      await untilPresence(room, []);
      assert.equal(alice.wire.connections(), 1);
      assert.deepEqual(source.calls, ['connect']);
      assert.equal(alice.status.state, 'stopped');
    });
  }

  test('a deleted message: an event, and it is never shown again, a rejoin after a cut included', async () => {
    const room = `r-${uid()}`;
    const proxy = await new TcpProxy(PORT).start();
    cleanups.push(() => proxy.close());
    const alice = newClient({ token: tokenSource(`u-${uid()}`), url: proxy.url, backoffBaseMs: 50 });
    await alice.join(room);
    const bob = newClient({ token: tokenFor(`u-${uid()}`) });
    await bob.join(room);
    const messages = record(alice, 'message');
    bob.say(room, 'keep me');
    bob.say(room, 'delete me');
    await until(() => messages.length === 2);
    const [kept, doomed] = messages;
    assert.equal(doomed.msg, 'delete me');

    const deleted = nextEvent(alice, 'deleted');
    const onBob = nextEvent(bob, 'deleted');
    const res = await api('DELETE', `/api/messages/${encodeURIComponent(doomed.id)}?room=${room}`, { key: KEY });
    assert.equal(res.status, 204);
    assert.deepEqual(await deleted, { room, id: doomed.id });
    assert.deepEqual(await onBob, { room, id: doomed.id });
    // The deleted id was the newest: the next `since` is the one before it
    // (a deleted `since` would recover nothing, §4).
    assert.equal(alice.session().rooms[0].lastId, kept.id);
    const page = await alice.history(room);
    assert.deepEqual(page.messages.map((m) => m.msg), ['keep me']);

    // A cut connection rejoins from there: nothing is missing, nothing comes twice.
    const gaps = record(alice, 'gap');
    proxy.cut();
    const rejoined = await nextEvent(alice, 'joined', (j) => j.room === room, 5000);
    assert.equal(rejoined.first, false);
    assert.equal(rejoined.recovered, true);
    assert.equal(rejoined.gap, false);
    bob.say(room, 'after');
    await until(() => messages.length === 3);
    assert.deepEqual(messages.map((m) => m.msg), ['keep me', 'delete me', 'after']);
    assert.deepEqual([...gaps], []);
  });
});
