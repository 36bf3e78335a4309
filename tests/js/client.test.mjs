// The client module (static/triochat-client.js): connecting, rooms, saying
// with acks, history paging and limits, against a real server
// (tests/test_js_client.py starts it and runs `node --test` on this file).

import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import {
  ChatError, DEFAULT_LIMITS, TriochatClient, byCodePoint, charCount, describeClose, mentions,
  nameProblem, roomProblem,
} from '../../static/triochat-client.js';
import { FakeWebSocket, Observer, URL_BASE, nextEvent, record, sleep, uid, until } from './helpers.mjs';

const clients = [];
const observers = [];
function newClient(options = {}) {
  const c = new TriochatClient({ url: URL_BASE, ...options });
  clients.push(c);
  return c;
}
async function newObserver() {
  const o = await Observer.open();
  observers.push(o);
  return o;
}
after(() => {
  for (const c of clients) c.close();
  for (const o of observers) o.close();
});

describe('connect, join, say', () => {
  test('join resolves with the joined room; a say is confirmed by its message and ack', async () => {
    const room = `r-${uid()}`;
    const alice = newClient();
    const statuses = record(alice, 'status');
    const info = await alice.join(room, { name: `alice-${uid()}` });
    assert.equal(info.room, room);
    assert.equal(info.first, true);
    assert.equal(info.recovered, true);
    assert.deepEqual(info.members, [alice.name]);
    assert.equal(typeof alice.token, 'string');
    assert.ok(alice.token.length > 10);
    assert.deepEqual(statuses.map((s) => s.state), ['connecting', 'connected']);
    assert.equal(alice.status.transport, 'ws');

    const bob = await newObserver();
    await bob.join(room, `bob-${uid()}`);
    const outgoing = record(alice, 'outgoing');
    const shown = nextEvent(alice, 'message', (m) => m.msg === 'hello');
    const entry = alice.say(room, 'hello');
    assert.equal(entry.state, 'sending'); // connected and joined: sent at once
    const m = await shown;
    assert.equal(m.mine, true);
    assert.equal(m.local, entry);
    assert.equal(m.replay, false);
    assert.equal(entry.state, 'sent');
    assert.equal(entry.id, m.id);
    await until(() => alice.outbox.length === 0); // the ack came
    assert.deepEqual(outgoing.map((o) => o.state), ['queued', 'sending', 'sent']);
    const onBob = await bob.find((f) => f.type === 'message' && f.msg === 'hello');
    assert.equal(onBob.id, m.id);
  });

  test('messages from others arrive as events, each id once, with presence and typing', async () => {
    const room = `r-${uid()}`;
    const alice = newClient();
    await alice.join(room, { name: `alice-${uid()}` });
    const presence = nextEvent(alice, 'presence', (p) => p.event === 'join');
    const bob = await newObserver();
    const bobName = `bob-${uid()}`;
    await bob.join(room, bobName);
    const p = await presence;
    assert.equal(p.name, bobName);
    assert.deepEqual(p.members, [alice.name, bobName].sort(byCodePoint));
    assert.deepEqual(alice.members(room), p.members);

    const typing = nextEvent(alice, 'typing');
    bob.send({ type: 'typing', room });
    assert.deepEqual(await typing, { room, name: bobName });

    const got = record(alice, 'message');
    const id = await bob.say(room, 'hi alice');
    await until(() => got.length === 1);
    assert.deepEqual(got[0], {
      room, id, name: bobName, msg: 'hi alice', ts: got[0].ts, mine: false, replay: false, local: undefined,
    });
    assert.equal(typeof got[0].ts, 'number');
  });

  test('several rooms on one connection; leaving one keeps the others', async () => {
    const [a, b] = [`a-${uid()}`, `b-${uid()}`];
    const alice = newClient();
    const name = `alice-${uid()}`;
    await alice.join(a, { name });
    await alice.join(b);
    assert.deepEqual([...alice.rooms.keys()], [a, b]);
    const bob = await newObserver();
    await bob.join(a, `bob-${uid()}`);
    await bob.join(b);

    const got = record(alice, 'message');
    await bob.say(a, 'in a');
    await bob.say(b, 'in b');
    await until(() => got.length === 2);
    assert.deepEqual(got.map((m) => [m.room, m.msg]), [[a, 'in a'], [b, 'in b']]);

    await alice.leave(b);
    assert.deepEqual([...alice.rooms.keys()], [a]);
    assert.equal(alice.status.state, 'connected'); // still in a
    // The other members of b see her leave (once it has settled); a sees nothing.
    await bob.waitFor((f) => f.type === 'presence' && f.room === b && f.name === name && f.event === 'leave');
    assert.deepEqual(bob.presence(name, a), []);
    const more = record(alice, 'message');
    await bob.say(b, 'after she left');
    await bob.say(a, 'still in a');
    await until(() => more.length === 1);
    await sleep(200);
    assert.deepEqual(more.map((m) => m.msg), ['still in a']);
    assert.throws(() => alice.say(b, 'no'), (err) => err instanceof ChatError && err.code === 'not_joined');

    // Leaving the last room closes the connection: nothing to be in.
    await alice.leave(a);
    assert.equal(alice.status.state, 'idle');
  });

  test('a refused first join rejects, and the name can be changed', async () => {
    const room = `r-${uid()}`;
    const bob = await newObserver();
    const taken = `bob-${uid()}`;
    await bob.join(room, taken);
    const alice = newClient();
    await assert.rejects(alice.join(room, { name: taken.toUpperCase() }), (err) => {
      assert.ok(err instanceof ChatError);
      assert.equal(err.code, 'name_taken');
      return true;
    });
    assert.equal(alice.rooms.size, 0);
    assert.equal(alice.status.state, 'stopped');
    const info = await alice.join(room, { name: `alice-${uid()}` });
    assert.equal(info.name, alice.name);
    await assert.rejects(alice.join('Not A Room'), (err) => err.code === 'bad_room');
  });

  test('whispers: confirmed once, with an ack; an unknown user fails the entry', async () => {
    const room = `r-${uid()}`;
    const alice = newClient();
    await alice.join(room, { name: `alice-${uid()}` });
    const bob = await newObserver();
    const bobName = `bob-${uid()}`;
    await bob.join(room, bobName);
    const whispers = record(alice, 'whisper');
    const entry = alice.whisper(bobName.toUpperCase(), 'psst');
    await until(() => entry.state === 'sent' && alice.outbox.length === 0);
    assert.equal(whispers.length, 1);
    assert.equal(whispers[0].local, entry);
    assert.equal(whispers[0].to, bobName);
    const onBob = await bob.find((f) => f.type === 'whisper');
    assert.equal(onBob.msg, 'psst');

    const nobody = alice.whisper(`nobody-${uid()}`, 'hello?');
    await until(() => nobody.state === 'failed');
    assert.equal(nobody.error.code, 'no_such_user');
    assert.equal(whispers.length, 1);
  });
});

describe('history', () => {
  test('pages back to the beginning of a room, oldest first, each message once', async () => {
    const room = `h-${uid()}`;
    const seeder = await newObserver();
    await seeder.join(room, `seed-${uid()}`);
    const sent = [];
    for (let i = 0; i < 130; i++) sent.push(`m${i}`);
    // Rate limits are off on the test server: send them all at once.
    const acks = sent.map((_, i) => seeder.waitFor((f) => f.type === 'ack' && f.ref === `s${i}`, 10000));
    sent.forEach((msg, i) => seeder.send({ type: 'say', room, msg, ref: `s${i}` }));
    await Promise.all(acks);

    const alice = newClient();
    const replayed = record(alice, 'message');
    await alice.join(room, { name: `alice-${uid()}` });
    // The join replays the newest 100.
    assert.deepEqual(replayed.map((m) => m.msg), sent.slice(30));
    assert.ok(replayed.every((m) => m.replay));

    const pages = [];
    let before = replayed[0].id;
    for (;;) {
      const page = await alice.history(room, { before, limit: 12 });
      assert.equal(page.room, room);
      pages.push(page);
      if (!page.more) break;
      before = page.messages[0].id;
    }
    const older = pages.reverse().flatMap((p) => p.messages.map((m) => m.msg));
    assert.deepEqual(older, sent.slice(0, 30));
    assert.equal(pages.length, 3);

    // Without `before`: the newest.
    const newest = await alice.history(room, { limit: 5 });
    assert.deepEqual(newest.messages.map((m) => m.msg), sent.slice(125));
    assert.equal(newest.more, true);
    // An id the room does not keep is refused.
    await assert.rejects(alice.history(room, { before: '00000000-1' }), (err) => err.code === 'bad_frame');
    await assert.rejects(alice.history(`x-${uid()}`), (err) => err.code === 'offline' || err.code === 'not_joined');
  });
});

describe('limits and validation', () => {
  test('joined.limits sets the message length; without it the default holds', async () => {
    FakeWebSocket.instances.length = 0;
    const alice = newClient({ WebSocket: FakeWebSocket });
    assert.deepEqual(alice.limits, { ...DEFAULT_LIMITS });
    const joined = alice.join('lobby', { name: 'alice' });
    await until(() => FakeWebSocket.last?.sent.length === 1);
    const ws = FakeWebSocket.last;
    const join = ws.sent[0];
    assert.deepEqual(Object.keys(join).sort(), ['name', 'ref', 'room', 'type']);
    ws.receive({
      type: 'joined', room: 'lobby', name: 'alice', token: 't1', members: ['alice'], history: [],
      recovered: true, ref: join.ref, limits: { msg_chars: 10 },
    });
    const info = await joined;
    assert.equal(info.limits.msg_chars, 10);
    assert.equal(alice.limits.msg_chars, 10);
    assert.throws(() => alice.say('lobby', 'x'.repeat(11)), (err) => err.code === 'too_long');
    alice.say('lobby', '🙂'.repeat(10)); // ten code points (twenty UTF-16 units) fit
    assert.equal(ws.sent.at(-1).msg, '🙂'.repeat(10));

    // Nonsense in `limits` is ignored.
    ws.receive({
      type: 'joined', room: 'lobby', name: 'alice', token: 't2', members: ['alice'], history: [],
      recovered: true, limits: { msg_chars: -1, other: 'x' },
    });
    assert.equal(alice.limits.msg_chars, 10);

    const bob = newClient({ WebSocket: FakeWebSocket });
    const bobJoined = bob.join('lobby', { name: 'bob' });
    await until(() => FakeWebSocket.last !== ws && FakeWebSocket.last.sent.length === 1);
    FakeWebSocket.last.receive({
      type: 'joined', room: 'lobby', name: 'bob', token: 't', members: ['bob'], history: [],
      recovered: true, ref: FakeWebSocket.last.sent[0].ref,
    });
    await bobJoined;
    assert.equal(bob.limits.msg_chars, 2000);
    assert.throws(() => bob.say('lobby', 'x'.repeat(2001)), (err) => err.code === 'too_long');
  });

  test('the real server: the default limit, unless the server sends limits', async () => {
    const alice = newClient();
    const info = await alice.join(`r-${uid()}`, { name: `alice-${uid()}` });
    assert.equal(alice.limits.msg_chars, info.limits.msg_chars);
    assert.ok(Number.isInteger(alice.limits.msg_chars) && alice.limits.msg_chars > 0);
  });

  test('helpers: names, rooms, lengths, mentions, close codes in words', () => {
    assert.equal(roomProblem('lobby'), null);
    assert.match(roomProblem('Not A Room'), /Room names/);
    assert.match(roomProblem(''), /enter a room/);
    assert.equal(nameProblem(' alice '), null);
    assert.match(nameProblem('   '), /enter a name/);
    assert.match(nameProblem('a'.repeat(33)), /too long/);
    assert.match(nameProblem('al\u200bice'), /invisible/);
    assert.equal(charCount('🙂a'), 2);
    assert.ok(mentions('hi Alice!', 'alice'));
    assert.ok(mentions('@alice: look', 'alice'));
    assert.ok(!mentions('malice aforethought', 'alice'));
    assert.ok(!mentions('alice_b', 'alice'));
    assert.deepEqual(['b', 'B', 'a', 'é'].sort(byCodePoint), ['B', 'a', 'b', 'é']);
    for (const code of [1000, 1001, 1006, 1008, 1009, 1011, 1013, 4001, 1234]) {
      assert.doesNotMatch(describeClose(code), /\d/); // plain words, no protocol numbers
    }
  });
});
