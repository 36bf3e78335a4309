// triochat-client.js: the triochat protocol (docs/protocol.md) as a small ES
// module, with no dependencies and no build step. The page (app.js) is built
// on it; docs/client.md documents it for people who embed the chat in their
// own page. It runs in browsers and in Node (22+, or 20 with
// --experimental-websocket): it only needs WebSocket, fetch and timers.
//
// What it does for you:
// - one connection (a WebSocket on /ws, or Server-Sent Events on /sse when
//   WebSockets do not get through) that joins any number of rooms;
// - reconnects after an unexpected close with exponential backoff and full
//   jitter, rejoins every room with the resume token (rotated each time) and
//   the last message id seen (`since`), so nothing is missed or shown twice,
//   and fills a longer gap (`recovered: false`) from `history`;
// - an outgoing queue: says and whispers wait while offline and are sent in
//   order, paced under the server's rate limit, each with a `ref` that stays
//   the same across retries (the server never stores a retried say twice);
// - events for a UI (see `on`), and promises for requests with an answer;
// - with a connection token (the `token` option, docs/protocol.md §15): `auth`
//   first on every connection, nothing else until `authed`, a refresh before
//   the token's `exp`, and a fresh token after an expiry (close 4003).
//
// Rules it keeps (invariants the page relies on):
// - every message id is reported at most once per room (`message`);
// - an outgoing entry ends in exactly one of `sent`, `failed`, `uncertain`
//   (a whisper whose connection dropped before it was confirmed: whispers
//   are not stored, so it is not sent again) or `cancelled` (its room left);
// - after `close()` no event is emitted and nothing reconnects;
// - with a token, no frame but `auth` goes out on a connection before its
//   first `authed`; a refused token, or a close 4009 (an operator disconnected
//   the user, §16), stops the client: it never reconnects by itself then.

export const VERSION = '1';

/** The server's defaults (docs/protocol.md §2.1, §9), used until `joined.limits` says otherwise. */
export const DEFAULT_LIMITS = Object.freeze({ msg_chars: 2000, name_chars: 32 });

/** The queue's pacing until a server tells its `say_rate` and `say_burst` (and with one
 *  that does not): under the server's default rate limit, 10 per second, burst 20. */
export const DEFAULT_PACING = Object.freeze({ rate: 8, burst: 10 });
// The share of the server's `say_rate` the queue sends at, and of its `say_burst`.
const RATE_SHARE = 0.8;
const BURST_SHARE = 0.5;

const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
const BAD_NAME_CHARS = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Co}]/u;

const DEFAULTS = Object.freeze({
  transport: 'auto', // 'ws', 'sse', or 'auto' (WebSocket, falling back to SSE)
  backoffBaseMs: 500, // reconnect delay: random in [0, min(cap, base * 2^n)]
  backoffCapMs: 30000,
  shortLivedMs: 2000, // a WebSocket that dies this young counts as failed
  openTimeoutMs: 10000, // an attempt not open by then has failed (a black-holed network)
  wsFailuresBeforeSse: 2, // failed WebSockets in a row before trying SSE
  // Frames per second the queue sends at most, and at once: 'auto' follows the
  // server's `joined.limits` (see `pacing`); a number is a ceiling of our own.
  sendRate: 'auto',
  sendBurst: 'auto',
  rateRetryMs: 1500, // a say refused with rate_limited/unavailable is sent again after this
  maxTries: 5,
  queueMax: 100, // unconfirmed says and whispers kept for (re)sending
  gapPages: 4, // `history` pages fetched to fill a gap after recovered: false
  historyLimit: 50,
  seenMax: 5000, // message ids remembered per room, for de-duplication
  refresh: true, // with a token function: send a fresh token before `exp`
  refreshRatio: 0.8, // ... at this share of the token's remaining lifetime,
  refreshLeadMs: 5000, // ... but at least this long before `exp`,
  // ... and never before half of it: a token shorter than twice the lead is
  // refreshed at half its life, not in a tight loop.
  random: Math.random,
});

/** An error the server (or the client, before sending) gave for a request. */
export class ChatError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = 'ChatError';
    /** The protocol's error code (docs/protocol.md §5, §15), or one of the client's own:
     *  `offline`, `connection_lost`, `left`, `queue_full`, `closed`, `expired`,
     *  `disconnected`, `no_token`. */
    this.code = code;
    this.frame = frame;
  }
}

// ---- small helpers, exported for pages that validate before sending --------

/** Length in Unicode code points, as the server counts (`msg_chars`, names). */
export const charCount = (text) => [...String(text)].length;

/** Why `room` is not a valid room name, or null. */
export function roomProblem(room) {
  if (!room) return 'Please enter a room.';
  if (!ROOM_RE.test(room)) {
    return 'Room names are 1-64 characters: lower-case letters, digits, "-" and "_", ' +
      'starting with a letter or digit.';
  }
  return null;
}

/** Why `raw` (trimmed) is not a valid name, or null. The server checks more (§2.1). */
export function nameProblem(raw, limits = DEFAULT_LIMITS) {
  const name = String(raw).trim();
  const max = limits.name_chars || DEFAULT_LIMITS.name_chars;
  if (!name) return 'Please enter a name.';
  if (charCount(name) > max) return `The name is too long (at most ${max} characters).`;
  if (BAD_NAME_CHARS.test(name)) return 'The name contains invisible or control characters.';
  return null;
}

/** Sort by code point, like the server sorts `joined.members`. */
export function byCodePoint(a, b) {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d) return d;
  }
  return x.length - y.length;
}

/** A close code (docs/protocol.md §11) in plain words, for people. */
export function describeClose(code) {
  switch (code) {
    case 1000: case 1005: return 'the connection was closed';
    case 1001: return 'the server is restarting';
    case 1008: return 'the server refused too many messages from this page';
    case 1009: return 'a message was too big for the server';
    case 1011: return 'the server ran into a problem';
    case 1013: return 'the connection was too slow to keep up';
    case 4001: return 'this chat was opened in another tab or window';
    case 4003: return 'your sign-in ran out or was not accepted';
    case 4009: return 'an operator disconnected you';
    default: return 'the network connection was lost';
  }
}

// Does `text` mention `name` (as a word, ignoring case)?
export function mentions(text, name) {
  if (!name || !text) return false;
  const hay = String(text).normalize('NFKC').toLowerCase();
  const needle = String(name).normalize('NFKC').toLowerCase();
  let at = hay.indexOf(needle);
  const word = /[\p{L}\p{N}_]/u;
  while (at >= 0) {
    const before = at > 0 ? hay[at - 1] : '';
    const after = hay[at + needle.length] || '';
    if (!word.test(before) && !word.test(after)) return true;
    at = hay.indexOf(needle, at + 1);
  }
  return false;
}

function parseFrame(text) {
  if (typeof text !== 'string') return null;
  try {
    const f = JSON.parse(text);
    return f && typeof f === 'object' && !Array.isArray(f) ? f : null;
  } catch {
    return null;
  }
}

// Stops that `retryNow()` ends (the others: 'closed', and a refused join,
// which has no room left to join).
const RESUMABLE_STOPS = new Set(['replaced', 'disconnected', 'unauthorized', 'expired']);

// Per room, the last ids kept to step back to when an operator deletes the
// newest one (see `_onDeleted`).
const RECENT_IDS = 50;

const sameName = (a, b) => String(a).normalize('NFKC').toLowerCase() ===
  String(b).normalize('NFKC').toLowerCase();

// Refs are unique per client, so a new page never reuses an old one (the
// server treats a say with a known ref as a retry of the first copy).
function refPrefix() {
  const bytes = new Uint8Array(6);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(36).padStart(2, '0')).join('');
}

// ---- transports: one small interface, two implementations ------------------
// makeX(url, handlers, env) -> {kind, open(), send(frame) -> bool, close(reason)}
// handlers: onopen(), onframe(frame), onclose(code, reason). After close() no
// handler is called any more; onclose is called at most once.

function makeWebSocket(base, h, env) {
  let ws = null;
  let done = false;
  const finish = (code, reason) => {
    if (done) return;
    done = true;
    h.onclose(code, reason);
  };
  return {
    kind: 'ws',
    open() {
      const url = new URL('/ws', base);
      url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
      try {
        ws = new env.WebSocket(url.href);
      } catch {
        // No WebSocket here, or a URL it refuses: like a failed connection.
        setTimeout(() => finish(1006, 'could not connect'), 0);
        return;
      }
      ws.addEventListener('open', () => { if (!done) h.onopen(); });
      ws.addEventListener('message', (ev) => {
        const f = done ? null : parseFrame(ev.data);
        if (f) h.onframe(f);
      });
      ws.addEventListener('close', (ev) => finish(ev.code || 1006, ev.reason || ''));
      // Browsers follow an error with a close (1006); some runtimes send neither
      // for a failed handshake, which the client's open timeout covers.
      ws.addEventListener('error', () => finish(1006, 'connection failed'));
    },
    send(frame) {
      if (done || !ws || ws.readyState !== 1) return false;
      ws.send(JSON.stringify(frame));
      return true;
    },
    close(reason) {
      if (done) return;
      done = true;
      try { ws?.close(1000, reason); } catch { /* not open yet, or already closed */ }
    },
  };
}

// GET /sse streams the server's frames (read here with fetch, so the same
// code runs in browsers and in Node); each client frame is a POST to /sse
// naming the session in a header, never in the URL: the id is a bearer
// secret, and proxies log paths (docs/protocol.md §13). POSTs are chained, so
// frames arrive in the order sent.
function makeEventStream(base, h, env) {
  const abort = new AbortController();
  let session = null;
  let done = false;
  let chain = Promise.resolve();
  const finish = (code, reason) => {
    if (done) return;
    done = true;
    abort.abort();
    h.onclose(code, reason);
  };

  // One SSE event: `event` is '' for plain data events.
  const dispatch = (event, data) => {
    if (done) return;
    if (event === 'close') {
      // The server's last word, like a WebSocket close frame.
      const info = parseFrame(data) || {};
      finish(Number.isInteger(info.code) ? info.code : 1006, String(info.reason || ''));
      return;
    }
    if (event !== '' && event !== 'message') return;
    const f = parseFrame(data);
    if (!f) return;
    if (session !== null) {
      h.onframe(f);
    } else if (f.type === 'session' && typeof f.id === 'string') {
      session = f.id;
      h.onopen();
    }
  };

  async function read() {
    let res;
    try {
      res = await env.fetch(new URL('/sse', base).href, {
        headers: { accept: 'text/event-stream' }, cache: 'no-store', signal: abort.signal,
      });
    } catch {
      finish(1006, 'could not connect');
      return;
    }
    if (!res.ok || !res.body) {
      try { await res.body?.cancel(); } catch { /* nothing to cancel */ }
      finish(res.status === 503 ? 1013 : 1006, `refused (${res.status})`);
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let event = '';
    let data = [];
    try {
      for (;;) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(buffer[nl] === '\r' && buffer[nl + 1] === '\n' ? nl + 2 : nl + 1);
          if (line === '') {
            if (data.length) dispatch(event, data.join('\n'));
            event = '';
            data = [];
            continue;
          }
          if (line.startsWith(':')) continue; // a comment: the keepalive
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? '' : line.slice(colon + 1);
          if (value.startsWith(' ')) value = value.slice(1);
          if (field === 'data') data.push(value);
          else if (field === 'event') event = value;
        }
      }
    } catch {
      // The stream broke (or we aborted it: then `done` is set already).
    }
    finish(1006, 'event stream lost');
  }

  return {
    kind: 'sse',
    open() { read(); },
    send(frame) {
      if (done || session === null) return false;
      const body = JSON.stringify(frame);
      const id = session;
      chain = chain.then(async () => {
        if (done) return;
        let res;
        try {
          res = await env.fetch(new URL('/sse', base).href, {
            method: 'POST', body, cache: 'no-store', credentials: 'same-origin',
            headers: { 'content-type': 'application/json', 'x-triochat-session': id },
          });
        } catch {
          finish(1006, 'could not send');
          return;
        }
        try { await res.arrayBuffer(); } catch { /* the body does not matter */ }
        if (res.status !== 204) finish(res.status === 413 ? 1009 : 1006, `send refused (${res.status})`);
      });
      return true;
    },
    close() {
      if (done) return;
      done = true;
      abort.abort();
    },
  };
}

// ---- the client -------------------------------------------------------------

/**
 * A chat connection that joins rooms. See docs/client.md.
 *
 * Events (`client.on(type, listener)`; each listener gets one object):
 * status, authed, joined, message, deleted, whisper, presence, typing, left,
 * outgoing, gap, error, session.
 */
export class TriochatClient {
  constructor(options = {}) {
    const opts = { ...DEFAULTS, ...options };
    const here = globalThis.location?.href;
    this.url = new URL(opts.url ?? here ?? 'http://127.0.0.1:8181/');
    this.options = opts;
    this.forced = opts.transport === 'ws' || opts.transport === 'sse' ? opts.transport : null;
    this._env = {
      WebSocket: opts.WebSocket ?? globalThis.WebSocket,
      fetch: opts.fetch ?? ((...args) => globalThis.fetch(...args)),
    };
    /** The name the server bound (from `joined`), or null. */
    this.name = null;
    /** The name the next first join asks for. */
    this.wantedName = typeof opts.name === 'string' ? opts.name : null;
    /** The resume token of the latest `joined` (rotated on every reconnect). Not
     *  the connection token: that is the `token` option (see `identity`). */
    this.token = typeof opts.resumeToken === 'string' ? opts.resumeToken : null;
    /** Who the server says we are, from the latest `authed`: {user, name, exp}
     *  (`exp` in Unix seconds), or null (anonymous, or not authenticated yet). */
    this.identity = null;
    /** The server's limits: `joined.limits` where the server sends them, else DEFAULT_LIMITS. */
    this.limits = { ...DEFAULT_LIMITS };
    /** room -> per-room state (see `_room`), in join order. */
    this.rooms = new Map();
    /** Says and whispers not confirmed yet, in the order they were made. */
    this.outbox = [];
    this.status = { state: 'idle', transport: null, fallback: false };

    this._listeners = new Map();
    this._refPrefix = refPrefix();
    this._refSeq = 0;
    this._transport = null;
    this._open = false; // the transport is open
    this._ready = false; // ... and, with a token, authenticated: joins and says may go
    this._openedAt = 0;
    // The connection token: a string, or a function returning one (or a
    // promise of one), called before every connection and for each refresh.
    this._auth = (typeof opts.token === 'string' && opts.token) || typeof opts.token === 'function'
      ? opts.token : null;
    this._authRefs = new Set(); // refs of our `auth` frames on this connection, awaiting `authed`
    this._refreshTimer = null;
    this._joins = new Map(); // ref -> room, for `join` frames awaiting `joined`
    this._requests = new Map(); // ref -> {resolve, reject}: history and leave
    this._seenWhispers = new Set();
    this._pumpTimer = null;
    this._tokens = this.pacing.burst;
    this._tokensAt = 0;
    this._kind = this.forced || 'ws'; // transport for the next attempt
    this._sseFallback = false; // SSE worked where WebSockets did not: stay on it
    this._wsFailures = 0;
    this._attempt = 0; // failed attempts in a row (the backoff exponent)
    this._everConnected = false;
    // Why there is no reconnect: 'replaced' (4001), 'closed', 'disconnected'
    // (4009), 'unauthorized' (a refused token), 'expired' (a string token ran
    // out), or the error code of a refused join.
    this._stopped = null;
    this._retryTimer = null;
    this._openTimer = null;
    this._closed = false;
    this._onOnline = () => { if (this._retryTimer) this._connect(); };
    globalThis.window?.addEventListener?.('online', this._onOnline);
  }

  // ---- events ----------------------------------------------------------------

  /** Call `listener(detail)` for every event of `type`; returns a function that stops it. */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  _emit(type, detail) {
    if (this._closed) return;
    for (const listener of [...(this._listeners.get(type) || [])]) {
      try {
        listener(detail);
      } catch (err) {
        // A listener's bug must not break the connection's bookkeeping.
        setTimeout(() => { throw err; }, 0);
      }
    }
  }

  // ---- public API ------------------------------------------------------------

  /** Is `room` joined on the current connection? */
  joined(room) {
    return Boolean(this.rooms.get(room)?.joined);
  }

  /** Members of `room` (sorted by code point), as far as this client knows. */
  members(room) {
    return [...(this.rooms.get(room)?.members || [])];
  }

  /**
   * Join `room` (and, on a connection's first join, claim `name`). Connects if
   * needed. Resolves with the `joined` event's detail; rejects with a ChatError.
   * The room stays joined across reconnects until `leave`.
   */
  join(room, { name } = {}) {
    const problem = roomProblem(room);
    if (problem) return Promise.reject(new ChatError('bad_room', problem));
    // With a token the name is the token's (§15): a `name` here changes nothing.
    if (!this._auth && typeof name === 'string' && name.trim()) {
      const wanted = name.trim();
      if (this.rooms.size === 0 && (!this.name || !sameName(wanted, this.name))) {
        // A new identity: a connection's name is bound for its lifetime, so it
        // takes a new connection; the old name (and its token) is not ours to take back.
        if (this._transport) {
          this._clearRetry();
          this._closeTransport('new identity');
        }
        this.name = null;
        this.token = null;
      }
      if (!this.name) this.wantedName = wanted;
    }
    if (!this._auth && !this.name && !this.wantedName) {
      return Promise.reject(new ChatError('bad_name', 'A name is needed for the first join.'));
    }
    // A join is the application asking to chat: it ends any stop but a takeover's.
    this._stopped = this._stopped === 'replaced' ? 'replaced' : null;
    const existing = this.rooms.get(room);
    if (existing?.joined) return Promise.resolve(this._joinedInfo(room, existing, true, true));
    const r = existing || this._room(room);
    const promise = new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
    if (!existing) {
      if (this._ready) this._sendJoin(room);
      else if (!this._transport && !this._stopped) this._connect();
    } else if (!this._transport && !this._retryTimer && !this._stopped) {
      // A room kept from a connection that stopped (4009, a refused token):
      // nothing is on its way to join it, so connect.
      this._connect();
    }
    this._saveSession();
    return promise;
  }

  /**
   * Take up a stored session (from `session()`, e.g. after a page reload): the
   * name with its token, and each room from its last id, so the server replays
   * only what was missed and others see no leave/join. Resolves when every room
   * is joined; rejects with the first refusal (the other rooms stay).
   */
  resume(session) {
    // With a token the name comes from the token, so a session needs none.
    const named = typeof session?.name === 'string' || (this._auth && session?.name == null);
    if (!session || !named || !Array.isArray(session.rooms)) {
      return Promise.reject(new ChatError('bad_name', 'Nothing to resume.'));
    }
    if (!this.name && typeof session.name === 'string') this.wantedName = session.name;
    if (typeof session.token === 'string' && session.token) this.token = session.token;
    const joins = [];
    for (const entry of session.rooms) {
      const room = typeof entry === 'string' ? entry : entry?.room;
      if (roomProblem(room) || this.rooms.has(room)) continue;
      const r = this._room(room);
      if (typeof entry?.lastId === 'string') r.lastId = entry.lastId;
      joins.push(new Promise((resolve, reject) => r.waiters.push({ resolve, reject })));
    }
    this._stopped = null;
    if (this._ready) for (const room of this.rooms.keys()) this._sendJoin(room);
    else if (!this._transport) this._connect();
    return Promise.all(joins);
  }

  /**
   * Leave `room` (the other rooms stay joined). Its queued says are cancelled.
   * With no room left the connection closes. Resolves once the server answered
   * (or at once when offline).
   */
  leave(room) {
    const r = this.rooms.get(room);
    if (!r) return Promise.resolve();
    this.rooms.delete(room);
    for (const w of r.waiters.splice(0)) w.reject(new ChatError('left', 'Left the room.'));
    for (const e of [...this.outbox]) if (e.kind === 'say' && e.room === room) this._finish(e, 'cancelled');
    const ref = this._nextRef();
    const told = r.joined && this._send({ type: 'leave', room, ref });
    this._saveSession();
    if (!told) {
      if (this.rooms.size === 0) this._idle();
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this._requests.delete(ref);
        // With no room left the connection has no purpose: close it, so the
        // next join may pick another name.
        if (this.rooms.size === 0 && this._transport) this._idle();
        resolve();
      };
      const timer = setTimeout(done, 3000);
      this._requests.set(ref, { resolve: done, reject: done });
    });
  }

  /**
   * Queue `msg` for `room`. Returns the outgoing entry ({ref, kind, room, msg,
   * state, id, ts, error}); its state changes are `outgoing` events. Throws a
   * ChatError (`not_joined`, `too_long`, `bad_frame`, `queue_full`) at once.
   */
  say(room, msg) {
    if (!this.rooms.has(room)) throw new ChatError('not_joined', `Not in ${room}.`);
    return this._enqueue({ kind: 'say', room, msg });
  }

  /** Queue a whisper to the user `to`; like `say`. */
  whisper(to, msg) {
    if (typeof to !== 'string' || !to.trim()) throw new ChatError('no_such_user', 'Whisper to whom?');
    return this._enqueue({ kind: 'whisper', to: to.trim(), msg });
  }

  /**
   * How fast the queue sends says and whispers: `{rate, burst}`, `rate` per second
   * (null: no pacing), `burst` at once. With the `sendRate`/`sendBurst` options
   * 'auto' (the default): 80 % of the server's `limits.say_rate` and half its
   * `say_burst` (no pacing with a `say_rate` of 0), DEFAULT_PACING until the server
   * tells them. A number option is a ceiling kept under the server's figures too;
   * `sendRate: null` turns the pacing off.
   */
  get pacing() {
    const { sendRate, sendBurst } = this.options;
    const { say_rate: sayRate, say_burst: sayBurst } = this.limits;
    const told = typeof sayRate === 'number';
    let rate = DEFAULT_PACING.rate;
    let burst = DEFAULT_PACING.burst;
    if (told) {
      rate = sayRate > 0 ? sayRate * RATE_SHARE : null;
      burst = sayBurst ? Math.max(1, Math.floor(sayBurst * BURST_SHARE)) : 1;
    }
    if (sendRate === null) rate = null;
    else if (typeof sendRate === 'number' && sendRate > 0) {
      rate = told && rate !== null ? Math.min(sendRate, rate) : sendRate;
    }
    if (Number.isInteger(sendBurst) && sendBurst > 0) burst = told ? Math.min(sendBurst, burst) : sendBurst;
    return { rate, burst };
  }

  /** Tell the room's other members that we are typing (best effort; call at most every few seconds). */
  typing(room) {
    return this.joined(room) && this._send({ type: 'typing', room });
  }

  /**
   * Messages of `room` older than the id `before` (or the newest), oldest
   * first: resolves with {room, messages, more}. `more` is false once the
   * server keeps nothing older.
   */
  history(room, { before, limit } = {}) {
    return new Promise((resolve, reject) => {
      if (!this.joined(room)) {
        reject(new ChatError(this._open ? 'not_joined' : 'offline', `Not connected to ${room}.`));
        return;
      }
      const ref = this._nextRef();
      const frame = { type: 'history', room, limit: limit || this.options.historyLimit, ref };
      if (typeof before === 'string') frame.before = before;
      if (!this._send(frame)) {
        reject(new ChatError('offline', 'Not connected.'));
        return;
      }
      this._requests.set(ref, {
        resolve: (f) => resolve({
          room, messages: this._notDeleted(room, Array.isArray(f.messages) ? f.messages : []),
          more: Boolean(f.more),
        }),
        reject,
      });
    });
  }

  /**
   * Reconnect now instead of waiting for the backoff timer; after a takeover
   * (4001), take the chat back; after a stop for the connection token
   * (`unauthorized`, `expired`) or an operator's disconnect (4009), connect
   * again: the person asked for it, so it is not a reconnect "by itself" (§16).
   * `token` is a resume token (another tab's newer one).
   */
  retryNow({ token } = {}) {
    if (this._transport || this._closed) return;
    if (typeof token === 'string' && token) this.token = token;
    if (RESUMABLE_STOPS.has(this._stopped)) {
      this._stopped = null;
      this._attempt = 0;
    }
    if (this._wantConnection()) this._connect();
  }

  /**
   * Use another connection token (a string, or a function returning one) from
   * now on. On an authenticated connection it is sent at once (a refresh,
   * §15: it must be for the same user; the answer is an `authed` event, a
   * refusal stops the client); after a stop for the token (`unauthorized`,
   * `expired`) it connects again with it.
   */
  setToken(token) {
    if (!((typeof token === 'string' && token) || typeof token === 'function')) {
      throw new ChatError('bad_frame', 'A token is a non-empty string or a function returning one.');
    }
    this._auth = token;
    const t = this._transport;
    if (t && this._ready) {
      clearTimeout(this._refreshTimer);
      this._refresh(t);
    } else if (!t && (this._stopped === 'unauthorized' || this._stopped === 'expired')) {
      this.retryNow();
    }
  }

  /** Stop for good: close the connection, cancel timers, emit nothing more. */
  close() {
    this._stopped = 'closed';
    this._clearRetry();
    this._closeTransport('closed');
    this._setStatus('idle');
    this._closed = true;
    globalThis.window?.removeEventListener?.('online', this._onOnline);
  }

  /** What a reload needs to resume (see `resume`); also sent as the `session` event. */
  session() {
    return {
      name: this.name || this.wantedName,
      token: this.token,
      rooms: [...this.rooms].map(([room, r]) => ({ room, lastId: r.lastId })),
    };
  }

  // ---- connecting and reconnecting -------------------------------------------

  _setStatus(state, extra = {}) {
    const t = this._transport;
    this.status = {
      state,
      transport: t ? t.kind : (this.forced || this._kind),
      fallback: this._sseFallback,
      forced: Boolean(this.forced),
      ...extra,
    };
    this._emit('status', { ...this.status });
  }

  _wantConnection() {
    return this.rooms.size > 0 && !this._stopped && !this._closed;
  }

  _connect(extra = {}) {
    this._clearRetry();
    if (this._transport) this._closeTransport('reconnecting');
    if (this._closed) return;
    const kind = this.forced || this._kind;
    const make = kind === 'sse' ? makeEventStream : makeWebSocket;
    const t = make(this.url, {
      onopen: () => { if (this._transport === t) this._onOpen(t); },
      onframe: (f) => { if (this._transport === t) this._handleFrame(f); },
      onclose: (code, reason) => { if (this._transport === t) this._onClose(t, code, reason); },
    }, this._env);
    t.authed = false; // with a token: an `authed` came on this connection
    // Asked for while the connection opens, so a reconnect gets a fresh one.
    t.token = this._auth ? this._tokenFor('connect') : null;
    this._transport = t;
    this._open = false;
    this._ready = false;
    this._setStatus('connecting', { reconnecting: this._everConnected, ...extra });
    clearTimeout(this._openTimer);
    // Covers opening and, with a token, the `authed` answer.
    this._openTimer = setTimeout(() => {
      if (this._transport !== t || this._ready) return;
      t.close('timed out'); // no handler runs for it: fail the attempt here
      this._onClose(t, 1006, 'timed out');
    }, this.options.openTimeoutMs);
    t.open();
  }

  // Close on purpose: no close handler runs for it.
  _closeTransport(reason) {
    const t = this._transport;
    this._transport = null;
    this._open = false;
    this._ready = false;
    if (t) t.close(reason);
    this._connectionLost();
  }

  // The token to send now: the option's string, or what its function gives.
  // Always a promise, which rejects with a ChatError `no_token` for anything
  // but a non-empty string, and is never left unhandled.
  _tokenFor(reason) {
    const source = this._auth;
    const asked = typeof source === 'function'
      ? new Promise((resolve) => resolve(source({ reason })))
      : Promise.resolve(source);
    const checked = asked.then((token) => {
      if (typeof token !== 'string' || !token) throw new Error('the token function gave no token');
      return token;
    }).catch((err) => {
      throw new ChatError('no_token', `Could not get a token: ${err?.message || err}`);
    });
    checked.catch(() => {}); // each caller handles it
    return checked;
  }

  _sendAuth(t, token) {
    const ref = this._nextRef();
    if (t.send({ type: 'auth', token, ref })) this._authRefs.add(ref);
  }

  // Refresh (§15): before `exp`, at `refreshRatio` of the time left but at
  // least `refreshLeadMs` before it, and never before half of it (so a very
  // short token is refreshed at half its life, not in a loop). Only with a
  // token function: a string cannot give a fresh token.
  _scheduleRefresh(t, exp) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this._auth !== 'function' || !this.options.refresh || !Number.isFinite(exp)) return;
    const left = exp * 1000 - Date.now(); // the server judges `exp` by its clock; ours must do
    if (left <= 0) return; // over already: the server closes 4003, and the reconnect asks afresh
    const { refreshRatio, refreshLeadMs } = this.options;
    const delay = Math.max(left / 2, Math.min(left * refreshRatio, left - refreshLeadMs));
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      this._refresh(t);
    }, delay);
  }

  _refresh(t) {
    if (this._transport !== t || !this._ready) return;
    this._tokenFor('refresh').then((token) => {
      if (this._transport === t && this._ready) this._sendAuth(t, token);
    }, (err) => {
      if (this._transport !== t) return;
      this._emit('error', { code: err.code, message: err.message, auth: true });
      // Try again halfway to `exp`; past it the server closes with 4003 and
      // the reconnect asks for a token again.
      const left = (this.identity?.exp ?? 0) * 1000 - Date.now();
      if (left > 2000) {
        this._refreshTimer = setTimeout(() => {
          this._refreshTimer = null;
          this._refresh(t);
        }, left / 2);
      }
    });
  }

  // Stop for good, until the application asks again (`join`, `retryNow`,
  // `setToken`): no reconnect. Pending joins reject with `error`'s code.
  _stop(reason, error, lost) {
    this._stopped = reason;
    this._clearRetry();
    if (this._transport) this._closeTransport(reason);
    const err = new ChatError(error.code, error.message);
    for (const r of this.rooms.values()) for (const w of r.waiters.splice(0)) w.reject(err);
    this._setStatus('stopped', { reason, error, ...(lost ? { lost } : {}) });
  }

  _idle() {
    this._clearRetry();
    this._closeTransport('left');
    this._setStatus('idle');
  }

  _onOpen(t) {
    this._open = true;
    this._openedAt = Date.now();
    t.reconnected = this._everConnected;
    this._everConnected = true;
    if (t.kind === 'sse' && !this.forced) this._sseFallback = true;
    if (!this._auth) {
      this._becomeReady(t);
      return;
    }
    // With a token: `auth` first, and nothing else until `authed` (§15).
    t.token.then((token) => {
      if (this._transport === t && this._open) this._sendAuth(t, token);
    }, (err) => {
      if (this._transport !== t) return;
      this._emit('error', { code: err.code, message: err.message, auth: true });
      t.close('no token');
      this._onClose(t, 1006, 'no token', "couldn't get a sign-in token");
    });
  }

  // The connection may carry joins and says: open, and authenticated if need be.
  _becomeReady(t) {
    clearTimeout(this._openTimer);
    this._ready = true;
    this._setStatus('connected', { reconnected: t.reconnected });
    for (const room of this.rooms.keys()) this._sendJoin(room);
  }

  _onClose(t, code, reason, text = null) {
    const lived = this._open ? Date.now() - this._openedAt : -1; // -1: never opened
    this._transport = null;
    this._open = false;
    this._ready = false;
    this._connectionLost();
    const lost = {
      code, reason, text: text || (lived >= 0 ? describeClose(code) : "can't reach the server"), wasOpen: lived >= 0,
    };
    if (code === 4001) {
      // Our resume token was used by a newer connection: another tab or window.
      this._stopped = 'replaced';
      this._setStatus('replaced', { lost });
      return;
    }
    if (code === 4009) {
      // An operator disconnected this user (§16): never come back by ourselves.
      this._stop('disconnected', { code: 'disconnected', message: 'An operator disconnected you.' }, lost);
      return;
    }
    if (code === 4003 && !(t.authed && typeof this._auth === 'function')) {
      // Before any `authed`: the token was refused (or none came in time), and
      // would be again. After one, with a string: it expired, and a string
      // cannot give a fresh one. (After one, with a function: reconnect below.)
      if (t.authed) {
        this._stop('expired', { code: 'expired', message: 'The sign-in token expired.' }, lost);
      } else {
        const why = reason ? ` (${reason})` : '';
        this._stop('unauthorized', { code: 'unauthorized', message: `The server refused the token${why}.` }, lost);
      }
      return;
    }
    if (!this._wantConnection()) {
      this._setStatus('idle', { lost });
      return;
    }
    let now = false; // try the other transport at once
    if (!this.forced && t.kind === 'ws') {
      // An authenticated WebSocket worked, however short its token's life.
      const worked = lived >= this.options.shortLivedMs || t.authed;
      this._wsFailures = worked ? 0 : this._wsFailures + 1;
      if (this._wsFailures >= this.options.wsFailuresBeforeSse) {
        this._kind = 'sse';
        now = true;
      }
    } else if (!this.forced && t.kind === 'sse' && lived < 0 && !this._sseFallback) {
      this._kind = 'ws'; // SSE did not get through either: it is the network, not WebSockets
      this._wsFailures = 0;
    }
    if (now) this._connect({ lost });
    else this._scheduleRetry(lost);
  }

  // State that belongs to a connection: gone with it.
  _connectionLost() {
    clearTimeout(this._openTimer);
    clearTimeout(this._pumpTimer);
    this._pumpTimer = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._authRefs.clear();
    this._joins.clear();
    for (const req of this._requests.values()) req.reject(new ChatError('connection_lost', 'The connection was lost.'));
    this._requests.clear();
    for (const r of this.rooms.values()) r.joined = false;
    for (const e of [...this.outbox]) {
      if (e.boundId !== null) { // stored: only the ack was missing
        this._drop(e);
        continue;
      }
      if (e.sent && e.kind === 'whisper') {
        // Whispers are not stored, so a retry could deliver one twice: say so instead.
        this._finish(e, 'uncertain');
        continue;
      }
      if (e.sent) {
        e.sent = false;
        this._setEntry(e, 'queued');
      }
    }
  }

  _scheduleRetry(lost) {
    this._clearRetry();
    const { backoffBaseMs, backoffCapMs, random } = this.options;
    const ceiling = Math.min(backoffCapMs, backoffBaseMs * 2 ** this._attempt);
    const delay = Math.max(50, random() * ceiling); // full jitter
    this._attempt = Math.min(this._attempt + 1, 20);
    const retryAt = Date.now() + delay;
    this._retryTimer = setTimeout(() => this._connect(), delay);
    this._setStatus('offline', { retryAt, delay, ceiling, attempt: this._attempt, lost });
  }

  _clearRetry() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  // ---- sending -----------------------------------------------------------------

  // Every frame but `auth` goes through here: nothing before `authed` (§15).
  _send(frame) {
    return Boolean(this._transport && this._ready && this._transport.send(frame));
  }

  _nextRef() {
    return `${this._refPrefix}-${++this._refSeq}`;
  }

  _sendJoin(room) {
    const ref = this._nextRef();
    const frame = { type: 'join', room, ref };
    const r = this.rooms.get(room);
    // Authenticated, the name is the token's and the connection comes back by
    // authenticating (§15): no name, no resume token.
    if (!this._auth) frame.name = this.name || this.wantedName;
    if (this.token && !this._auth) {
      frame.token = this.token;
      frame.rotate = true; // a new token each time: a leaked old one is worth nothing
    }
    if (r && r.lastId !== null) frame.since = r.lastId;
    if (this._send(frame)) this._joins.set(ref, room);
  }

  // Every say and whisper goes through the outbox, so nothing overtakes what
  // was typed earlier; the pump sends them in order, paced under the server's
  // rate limit, once the connection is open and the room joined.
  _enqueue(fields) {
    if (typeof fields.msg !== 'string' || !fields.msg.trim()) throw new ChatError('bad_frame', 'Nothing to send.');
    const max = this.limits.msg_chars;
    if (charCount(fields.msg) > max) {
      throw new ChatError('too_long', `The message is too long (at most ${max} characters).`);
    }
    const pending = this.outbox.filter((e) => e.state === 'queued' || e.state === 'sending').length;
    if (pending >= this.options.queueMax) {
      throw new ChatError('queue_full', `${this.options.queueMax} messages are already waiting for the connection.`);
    }
    const entry = {
      ...fields, ref: this._nextRef(), state: 'queued', id: null, ts: Date.now(), error: null,
      sent: false, tries: 0, boundId: null, holdUntil: 0,
    };
    this.outbox.push(entry);
    this._emit('outgoing', { entry, state: entry.state });
    this._pump();
    return entry;
  }

  _pump() {
    if (this._pumpTimer || !this._ready) return;
    const { rate, burst } = this.pacing;
    const now = Date.now();
    this._tokens = rate === null
      ? burst : Math.min(burst, this._tokens + ((now - this._tokensAt) / 1000) * rate);
    this._tokensAt = now;
    const later = (ms) => {
      this._pumpTimer = setTimeout(() => { this._pumpTimer = null; this._pump(); }, ms);
    };
    for (const e of this.outbox) {
      if (e.sent || e.boundId !== null) continue;
      if (e.kind === 'say' ? !this.joined(e.room) : !this.name) continue;
      if (e.holdUntil > now) return later(e.holdUntil - now); // keep the order
      if (rate !== null && this._tokens < 1) return later(((1 - this._tokens) / rate) * 1000);
      const frame = e.kind === 'say'
        ? { type: 'say', room: e.room, msg: e.msg, ref: e.ref }
        : { type: 'whisper', to: e.to, msg: e.msg, ref: e.ref };
      if (!this._send(frame)) return;
      if (rate !== null) this._tokens -= 1;
      e.sent = true;
      e.tries += 1;
      this._setEntry(e, 'sending');
    }
  }

  _setEntry(e, state) {
    if (e.state === state) return;
    e.state = state;
    this._emit('outgoing', { entry: e, state });
  }

  _drop(e) {
    const i = this.outbox.indexOf(e);
    if (i >= 0) this.outbox.splice(i, 1);
  }

  // An entry's last state: sent, failed, uncertain or cancelled.
  _finish(e, state, error = null) {
    this._drop(e);
    e.error = error;
    this._setEntry(e, state);
  }

  // The first entry, in order, that a frame of ours with this text may be:
  // one that was sent at least once and is not matched yet.
  _bindable(kind, match) {
    return this.outbox.find((e) => e.kind === kind && e.tries > 0 && e.boundId === null && match(e));
  }

  // ---- incoming frames: the one place they are handled ----------------------

  _handleFrame(f) {
    switch (f.type) {
      case 'authed': return this._onAuthed(f);
      case 'joined': return this._onJoined(f);
      case 'message': return this._onMessage(f, false);
      case 'deleted': return this._onDeleted(f);
      case 'whisper': return this._onWhisper(f);
      case 'presence': return this._onPresence(f);
      case 'typing': return this._onTyping(f);
      case 'ack': return this._onAck(f);
      case 'left': return this._onReply(f);
      case 'history': return this._onReply(f);
      case 'error': return this._onError(f);
      default: return undefined; // unknown frames are ignored (forward compatibility)
    }
  }

  _room(room) {
    const r = {
      lastId: null, members: [], joined: false, everJoined: false, seen: new Set(), waiters: [],
      // Ids an operator deleted (§16): never reported, whatever a replay or a
      // history page in flight still holds. `recent`: the last ids that were
      // `lastId`, newest last, to step back to when the last one is deleted.
      deleted: new Set(), recent: [],
    };
    this.rooms.set(room, r);
    return r;
  }

  _markSeen(r, id) {
    r.seen.add(id);
    if (r.seen.size > this.options.seenMax) r.seen.delete(r.seen.values().next().value);
  }

  _setLastId(r, id) {
    r.lastId = id;
    if (r.recent[r.recent.length - 1] === id) return;
    r.recent.push(id);
    if (r.recent.length > RECENT_IDS) r.recent.shift();
  }

  // `messages` without those an operator deleted in `room`.
  _notDeleted(room, messages) {
    const r = this.rooms.get(room);
    return r ? messages.filter((m) => !r.deleted.has(m?.id)) : messages;
  }

  // `authed` (§15): the first on a connection opens it for everything else;
  // a later one answers a refresh.
  _onAuthed(f) {
    const t = this._transport;
    if (!t || !(f.ref ? this._authRefs.has(f.ref) : this._authRefs.size)) return; // not ours
    if (f.ref) this._authRefs.delete(f.ref);
    else this._authRefs.clear();
    const first = !t.authed;
    t.authed = true;
    const name = typeof f.name === 'string' ? f.name : f.user;
    this.identity = { user: f.user, name, exp: f.exp };
    if (typeof name === 'string') this.name = name;
    this._scheduleRefresh(t, f.exp);
    this._emit('authed', { ...this.identity, refreshed: !first });
    if (first) this._becomeReady(t);
  }

  // `deleted` (§4, §16): an operator deleted a message. It is never reported
  // again, and if it was the room's last id it is not the next `since` (a
  // deleted id recovers nothing: the server would answer recovered: false).
  _onDeleted(f) {
    const r = this.rooms.get(f.room);
    if (!r || typeof f.id !== 'string') return;
    r.deleted.add(f.id);
    if (r.deleted.size > this.options.seenMax) r.deleted.delete(r.deleted.values().next().value);
    if (r.lastId === f.id) {
      r.recent = r.recent.filter((id) => !r.deleted.has(id));
      r.lastId = r.recent.length ? r.recent[r.recent.length - 1] : null;
    }
    this._emit('deleted', { room: f.room, id: f.id });
    this._saveSession();
  }

  _saveSession() {
    this._emit('session', this.session());
  }

  _readLimits(limits) {
    // `joined.limits`, e.g. {"msg_chars": 2000, "say_rate": 10}: positive
    // integers only, but for `say_rate`, any number from 0 (0: no rate limit).
    if (!limits || typeof limits !== 'object' || Array.isArray(limits)) return;
    for (const [key, value] of Object.entries(limits)) {
      const ok = key === 'say_rate'
        ? typeof value === 'number' && Number.isFinite(value) && value >= 0
        : Number.isInteger(value) && value > 0;
      if (ok) this.limits[key] = value;
    }
    this._tokens = Math.min(this._tokens, this.pacing.burst);
  }

  _joinedInfo(room, r, first, already = false) {
    return {
      room, name: this.name, members: [...r.members], first, already, limits: { ...this.limits },
    };
  }

  _onJoined(f) {
    if (f.ref) this._joins.delete(f.ref);
    const r = this.rooms.get(f.room);
    if (!r) {
      this._send({ type: 'leave', room: f.room }); // left while the join was on its way
      return;
    }
    const first = !r.everJoined;
    r.joined = true;
    r.everJoined = true;
    this._attempt = 0; // a working connection: the next failure starts the backoff afresh
    if (typeof f.name === 'string') this.name = f.name;
    if (typeof f.token === 'string' && f.token) this.token = f.token;
    this._readLimits(f.limits);
    r.members = [...(Array.isArray(f.members) ? f.members : [])].sort(byCodePoint);
    const history = Array.isArray(f.history) ? f.history : [];
    // A gap: the server could not replay everything since our last id. Only
    // when this client has shown the room before; a first join just shows
    // the newest messages.
    const gap = f.recovered === false && !first;
    const info = { ...this._joinedInfo(f.room, r, first), recovered: f.recovered !== false, gap };
    this._emit('joined', info);
    for (const m of history) this._onMessage(m, true);
    if (gap) this._fillGap(f.room, history);
    for (const w of r.waiters.splice(0)) w.resolve(info);
    this._saveSession();
    this._pump();
  }

  // Page back from the oldest replayed message until we reach one we had
  // (the gap is closed) or the server has nothing older, at most gapPages
  // pages; then one `gap` event with what was missed, oldest first.
  async _fillGap(room, history) {
    this._emit('gap', { room, state: 'loading' });
    const r = this.rooms.get(room);
    let before = history.length && typeof history[0].id === 'string' ? history[0].id : null;
    let found = [];
    let complete = false;
    for (let page = 0; before !== null && page < this.options.gapPages; page++) {
      let reply;
      try {
        reply = await this.history(room, { before });
      } catch {
        break;
      }
      if (this.rooms.get(room) !== r) return; // left meanwhile
      const fresh = [];
      for (const m of reply.messages) {
        if (r.seen.has(m.id)) { complete = true; fresh.length = 0; continue; }
        fresh.push(m);
      }
      found = [...fresh, ...found];
      if (complete || !reply.more || !reply.messages.length) break;
      before = reply.messages[0].id;
    }
    if (this.rooms.get(room) !== r) return;
    found = found.filter((m) => !r.deleted.has(m.id)); // deleted while we paged
    for (const m of found) if (typeof m.id === 'string') this._markSeen(r, m.id);
    this._emit('gap', { room, state: 'done', messages: found, complete });
  }

  _onMessage(m, replay) {
    const r = this.rooms.get(m.room);
    if (!r) return;
    if (typeof m.id === 'string') {
      if (r.deleted.has(m.id)) return; // deleted by an operator: a copy that was on its way
      this._setLastId(r, m.id);
      if (r.seen.has(m.id)) return; // already reported (a replay after a reconnect)
      this._markSeen(r, m.id);
    }
    const mine = m.name === this.name;
    let local;
    if (mine) {
      local = this._bindable('say', (x) => x.room === m.room && x.msg === m.msg);
      if (local) {
        local.boundId = typeof m.id === 'string' ? m.id : '';
        local.id = m.id;
        local.ts = m.ts;
        this._setEntry(local, 'sent');
      }
    }
    this._emit('message', {
      room: m.room, id: m.id, name: m.name, msg: m.msg, ts: m.ts, mine, replay, local,
    });
    if (!replay) this._saveSession();
  }

  _onWhisper(w) {
    if (typeof w.id === 'string') {
      if (this._seenWhispers.has(w.id)) return;
      this._seenWhispers.add(w.id);
      if (this._seenWhispers.size > this.options.seenMax) {
        this._seenWhispers.delete(this._seenWhispers.values().next().value);
      }
    }
    const mine = w.from === this.name;
    let local;
    if (mine) {
      local = this._bindable('whisper', (x) => x.msg === w.msg && sameName(x.to, w.to));
      if (local) {
        local.boundId = typeof w.id === 'string' ? w.id : '';
        local.id = w.id;
        local.ts = w.ts;
        this._setEntry(local, 'sent');
      }
    }
    this._emit('whisper', {
      id: w.id, from: w.from, to: w.to, msg: w.msg, ts: w.ts, mine, toMe: w.to === this.name, local,
    });
  }

  _onAck(f) {
    const e = this.outbox.find((x) => x.ref === f.ref);
    if (!e) return;
    this._drop(e);
    if (e.boundId !== null) return; // its message came first: already reported
    const r = e.kind === 'say' ? this.rooms.get(e.room) : null;
    const seen = e.kind === 'say' ? r?.seen.has(f.id) : this._seenWhispers.has(f.id);
    e.id = f.id;
    e.boundId = typeof f.id === 'string' ? f.id : '';
    if (seen) {
      // Reported already, from a replay: the entry is that message.
      e.duplicate = true;
      this._setEntry(e, 'sent');
      return;
    }
    e.ts = Date.now();
    this._setEntry(e, 'sent');
    if (e.kind === 'say' && r) {
      if (typeof f.id === 'string') this._markSeen(r, f.id);
      this._emit('message', {
        room: e.room, id: f.id, name: this.name, msg: e.msg, ts: e.ts, mine: true, replay: false, local: e,
      });
    } else if (e.kind === 'whisper') {
      if (typeof f.id === 'string') this._seenWhispers.add(f.id);
      this._emit('whisper', {
        id: f.id, from: this.name, to: e.to, msg: e.msg, ts: e.ts, mine: true, toMe: false, local: e,
      });
    }
  }

  _onReply(f) {
    const req = f.ref ? this._requests.get(f.ref) : undefined;
    if (req) {
      this._requests.delete(f.ref);
      req.resolve(f);
    }
    if (f.type === 'left') this._emit('left', { room: f.room });
  }

  _onPresence(p) {
    if (p.event !== 'join' && p.event !== 'leave') return;
    const r = this.rooms.get(p.room);
    if (!r) return;
    if (p.event === 'join') insertSorted(r.members, p.name);
    else {
      const i = r.members.indexOf(p.name);
      if (i >= 0) r.members.splice(i, 1);
    }
    this._emit('presence', { room: p.room, event: p.event, name: p.name, members: r.members });
  }

  _onTyping(t) {
    if (t.name === this.name || !this.rooms.has(t.room)) return;
    this._emit('typing', { room: t.room, name: t.name });
  }

  _onError(e) {
    const code = typeof e.code === 'string' ? e.code : 'unknown';
    const message = typeof e.message === 'string' ? e.message : code;
    if (e.ref && this._authRefs.has(e.ref)) {
      // Our token was refused (§15). The server closes with 4003 (or stays
      // open, if it takes no tokens at all); either way the same token source
      // would be refused again, so stop rather than loop.
      this._authRefs.delete(e.ref);
      this._emit('error', { code, message, ref: e.ref, auth: true });
      this._stop('unauthorized', { code, message });
      return;
    }
    const room = e.ref ? this._joins.get(e.ref) : undefined;
    if (room !== undefined) {
      this._joins.delete(e.ref);
      this._joinRefused(room, code, message, e);
      return;
    }
    const req = e.ref ? this._requests.get(e.ref) : undefined;
    if (req) {
      this._requests.delete(e.ref);
      req.reject(new ChatError(code, message, e));
      return;
    }
    const entry = e.ref ? this.outbox.find((x) => x.ref === e.ref) : undefined;
    if (entry && (code === 'rate_limited' || code === 'unavailable') && entry.tries < this.options.maxTries) {
      // Nothing was stored: send it again in a moment, with the same ref.
      entry.sent = false;
      entry.holdUntil = Date.now() + this.options.rateRetryMs;
      this._setEntry(entry, 'queued');
      clearTimeout(this._pumpTimer);
      this._pumpTimer = null;
      this._pump();
      return;
    }
    if (entry) {
      this._finish(entry, 'failed', { code, message });
      return;
    }
    this._emit('error', { code, message, ref: e.ref });
  }

  _joinRefused(room, code, message, frame) {
    const r = this.rooms.get(room);
    if (!r) return;
    const rejoin = r.everJoined;
    this.rooms.delete(room);
    const err = new ChatError(code, message, frame);
    for (const w of r.waiters.splice(0)) w.reject(err);
    for (const e of [...this.outbox]) if (e.kind === 'say' && e.room === room) this._finish(e, 'failed', { code, message });
    this._emit('error', { code, message, ref: frame.ref, room, rejoin });
    this._saveSession();
    if (this.rooms.size === 0) {
      // Nothing left to be in: stop, rather than retry a refused join forever.
      this._stopped = code;
      this._clearRetry();
      this._closeTransport('refused');
      this._setStatus('stopped', { reason: 'refused', error: { code, message } });
    }
  }
}

// Sorted by code point, like `joined.members`: a binary search, so a burst of
// presence frames costs no full sort each.
function insertSorted(list, name) {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (byCodePoint(list[mid], name) < 0) lo = mid + 1;
    else hi = mid;
  }
  if (list[lo] !== name) list.splice(lo, 0, name);
}
