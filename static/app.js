// triochat browser page: speaks the typed protocol (docs/protocol.md) over a
// WebSocket on /ws, or over Server-Sent Events (GET /sse + POST /sse) when
// WebSockets do not get through. It survives bad networks: it reconnects with
// backoff, rejoins with the resume token and the last id seen, and sends what
// was typed while offline exactly once.
// All user-supplied text is rendered with textContent, never as HTML, each
// span bidi-isolated with its explicit bidi controls shown as escapes (#18).
'use strict';

(() => {
  const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const BAD_NAME_CHARS = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u;
  const MAX_NAME = 32;
  const MAX_MSG = 2000;
  const TYPING_SEND_MS = 3000; // send `typing` at most this often
  const TYPING_SHOW_MS = 4000; // show someone as typing for this long
  const QUEUE_MAX = 100; // unconfirmed messages kept for (re)sending
  const BACKOFF_BASE_MS = 500; // reconnect delay: random in [0, min(cap, base * 2^n)]
  const BACKOFF_CAP_MS = 30000;
  const SHORT_LIVED_MS = 2000; // a WebSocket that dies this young counts as failed
  const WS_FAILURES_BEFORE_SSE = 2; // failed WebSockets in a row before trying SSE
  const SEND_RATE = 8; // frames per second the outbox pump sends at most (server: 10)
  const SEND_BURST = 10;
  const RATE_RETRY_MS = 1500; // a rate-limited say is sent again after this long
  const GAP_PAGES = 4; // `history` pages fetched to fill a gap after recovered: false
  const SEEN_MAX = 5000; // message ids remembered per room, for de-duplication
  const PRESENCE_MERGE_MS = 10000; // presence notices this close together share one line
  const PRESENCE_LINES_MAX = 50; // presence lines kept in the log (oldest dropped first)
  const PRESENCE_RENDER_MS = 30; // a burst of presence frames is rendered once
  // Explicit bidi controls: embeddings and overrides (U+202A-E), isolates
  // (U+2066-9), marks (U+200E/F, U+061C). In user text they could reorder
  // what surrounds them ("pay to \u202Eelgoog.evil" reads "live.google"), so
  // they are shown as visible escapes instead (#18).
  const BIDI_CONTROLS = /[\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]/g;
  const STORE_KEY = 'triochat';

  const params = new URLSearchParams(location.search);
  const FORCED = ['ws', 'sse'].includes(params.get('transport')) ? params.get('transport') : null;

  // Refs are unique per page load, so a reload never reuses an old one (the
  // server treats a say with a known ref as a retry of the first copy).
  const REF_PREFIX = (() => {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    return Array.from(bytes, (b) => b.toString(36).padStart(2, '0')).join('');
  })();

  const $ = (id) => document.getElementById(id);
  const ui = {
    joinView: $('join-view'), joinForm: $('join-form'), name: $('name'), room: $('room'),
    joinError: $('join-error'), join: $('join'),
    chatView: $('chat-view'), roomTitle: $('room-title'), status: $('status'),
    retry: $('retry'), leave: $('leave'),
    messages: $('messages'), typing: $('typing'), sayForm: $('say-form'), input: $('input'),
    send: $('send'), members: $('members'), memberCount: $('member-count'),
  };

  const state = {
    transport: null,   // the current transport (see openTransport), or null
    open: false,       // the current transport is open
    openedAt: 0,
    name: null,        // the name the server bound (echoed in `joined`)
    wantedName: null,  // the name typed in the join form
    token: null,       // resume token from the last `joined`
    current: null,     // room shown in the chat view
    rooms: new Map(),  // room -> per-room state, see roomState()
    refSeq: 0,
    joins: new Map(),  // ref -> room of `join` frames awaiting `joined`
    outbox: [],        // says/whispers not yet confirmed, in the order typed
    pumpTimer: null,
    tokens: SEND_BURST, tokensAt: 0,
    seenWhispers: new Set(),
    lastTypingSent: 0,
    notice: null,      // the presence line still taking notices, see onPresence()
    presenceTimer: null,
    // reconnecting
    kind: FORCED || 'ws', // transport for the next attempt
    sseFallback: false,   // SSE worked where WebSockets did not: stay on it
    wsFailures: 0,        // failed WebSockets in a row
    attempt: 0,           // failed attempts in a row (backoff exponent)
    everConnected: false,
    stopped: null,        // 'replaced' after a 4001: no reconnect
    retryTimer: null, countdownTimer: null, retryAt: 0,
  };

  // ---- validation (PROTOCOL §2) -------------------------------------------
  const cpLength = (s) => [...s].length;

  function nameProblem(raw) {
    const name = raw.trim();
    if (!name) return 'Please enter a name.';
    if (cpLength(name) > MAX_NAME) return `The name is too long (at most ${MAX_NAME} characters).`;
    if (BAD_NAME_CHARS.test(name)) return 'The name contains invisible or control characters.';
    return null;
  }

  function roomProblem(room) {
    if (!room) return 'Please enter a room.';
    if (!ROOM_RE.test(room)) {
      return 'Room names are 1-64 characters: lower-case letters, digits, "-" and "_", ' +
        'starting with a letter or digit.';
    }
    return null;
  }

  // Sort by code point, like the server (`joined.members`).
  function byCodePoint(a, b) {
    const x = [...a], y = [...b];
    for (let i = 0; i < Math.min(x.length, y.length); i++) {
      const d = x[i].codePointAt(0) - y[i].codePointAt(0);
      if (d) return d;
    }
    return x.length - y.length;
  }

  function parseFrame(text) {
    if (typeof text !== 'string') return null;
    try {
      const f = JSON.parse(text);
      return f && typeof f === 'object' && !Array.isArray(f) ? f : null;
    } catch { return null; }
  }

  // ---- transports: one small interface, two implementations ---------------
  // makeX(handlers) -> {kind, open(), send(frame) -> bool, close(reason)}
  // handlers: onopen(), onframe(frame), onclose(code, reason). After close()
  // no handler is called any more; onclose is called at most once.

  function makeWebSocket(h) {
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
        ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
        ws.addEventListener('open', () => { if (!done) h.onopen(); });
        ws.addEventListener('message', (ev) => {
          const f = done ? null : parseFrame(ev.data);
          if (f) h.onframe(f);
        });
        ws.addEventListener('close', (ev) => finish(ev.code, ev.reason));
      },
      send(frame) {
        if (done || !ws || ws.readyState !== WebSocket.OPEN) return false;
        ws.send(JSON.stringify(frame));
        return true;
      },
      close(reason) {
        if (done) return;
        done = true;
        try { ws.close(1000, reason); } catch { /* already closed */ }
      },
    };
  }

  // GET /sse streams the server's frames; each client frame is a POST to /sse
  // naming the session in a header, never in the URL: the id is a bearer
  // secret, and proxies log paths (#18). POSTs are chained, so frames arrive
  // in the order sent.
  // EventSource would reconnect by itself on errors: it is closed instead, and
  // the page's own backoff opens a new session.
  function makeEventSource(h) {
    let es = null;
    let session = null;
    let done = false;
    let chain = Promise.resolve();
    const finish = (code, reason) => {
      if (done) return;
      done = true;
      if (es) es.close();
      h.onclose(code, reason);
    };
    return {
      kind: 'sse',
      open() {
        es = new EventSource('/sse');
        es.addEventListener('message', (ev) => {
          const f = done ? null : parseFrame(ev.data);
          if (!f) return;
          if (session !== null) { h.onframe(f); return; }
          if (f.type === 'session' && typeof f.id === 'string') {
            session = f.id;
            h.onopen();
          }
        });
        // The server's last word, like a WebSocket close frame.
        es.addEventListener('close', (ev) => {
          const info = parseFrame(ev.data) || {};
          finish(Number.isInteger(info.code) ? info.code : 1006, String(info.reason || ''));
        });
        es.addEventListener('error', () => finish(1006, 'event stream lost'));
      },
      send(frame) {
        if (done || session === null) return false;
        const body = JSON.stringify(frame);
        chain = chain.then(async () => {
          if (done) return;
          let res;
          try {
            res = await fetch('/sse', {
              method: 'POST', body, cache: 'no-store', credentials: 'same-origin',
              headers: { 'content-type': 'application/json', 'x-triochat-session': session },
            });
          } catch {
            finish(1006, 'could not send');
            return;
          }
          if (res.status !== 204) finish(res.status === 413 ? 1009 : 1006, `send refused (${res.status})`);
        });
        return true;
      },
      close() {
        if (done) return;
        done = true;
        if (es) es.close();
      },
    };
  }

  // ---- connecting and reconnecting ------------------------------------------
  function setStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.status.textContent = text;
  }

  function connectedText(kind) {
    if (kind !== 'sse') return 'connected';
    return FORCED ? 'connected (SSE)' : 'connected (SSE fallback)';
  }

  const wantConnection = () => state.rooms.size > 0 && !state.stopped;

  function connect() {
    clearRetry();
    if (state.transport) closeTransport('reconnecting');
    const kind = FORCED || state.kind;
    const via = kind === 'sse' ? ' (SSE)' : '';
    setStatus('connecting', state.everConnected ? `reconnecting${via}…` : `connecting${via}…`);
    const t = (kind === 'sse' ? makeEventSource : makeWebSocket)({
      onopen: () => { if (state.transport === t) onOpen(t); },
      onframe: (f) => { if (state.transport === t) handleFrame(f); },
      onclose: (code, reason) => { if (state.transport === t) onClose(t, code, reason); },
    });
    state.transport = t;
    state.open = false;
    t.open();
  }

  // Close on purpose: no close handler runs for it.
  function closeTransport(reason) {
    const t = state.transport;
    state.transport = null;
    state.open = false;
    if (t) t.close(reason);
    connectionLost();
  }

  function onOpen(t) {
    state.open = true;
    state.openedAt = Date.now();
    state.everConnected = true;
    if (t.kind === 'sse' && !FORCED) state.sseFallback = true;
    setStatus('connected', connectedText(t.kind));
    for (const room of state.rooms.keys()) sendJoin(room);
  }

  function onClose(t, code, reason) {
    const lived = state.open ? Date.now() - state.openedAt : -1; // -1: never opened
    state.transport = null;
    state.open = false;
    connectionLost();
    const why = reason ? `${code} ${reason}` : `${code}`;
    if (code === 4001) {
      // Our resume token was used by a newer connection: another tab or window.
      state.stopped = 'replaced';
      setStatus('disconnected', 'open in another tab');
      systemLine('This chat is open in another tab or window, so this one stopped. ' +
        'Press “Use here” to continue here.', true);
      ui.retry.textContent = 'Use here';
      ui.retry.hidden = false;
      setChatEnabled(false);
      return;
    }
    if (!wantConnection()) { setStatus('idle', 'not connected'); return; }
    let now = false; // try the other transport at once
    if (!FORCED && t.kind === 'ws') {
      state.wsFailures = lived >= 0 && lived >= SHORT_LIVED_MS ? 0 : state.wsFailures + 1;
      if (state.wsFailures >= WS_FAILURES_BEFORE_SSE) {
        state.kind = 'sse';
        now = true;
      }
    } else if (!FORCED && t.kind === 'sse' && lived < 0 && !state.sseFallback) {
      state.kind = 'ws'; // SSE did not get through either: it is the network, not WebSockets
      state.wsFailures = 0;
    }
    if (!ui.chatView.hidden) {
      if (lived >= 0) systemLine(`Connection lost (${why}). Reconnecting…`);
    } else {
      showJoinError(`Could not connect (${why}). Trying again…`);
    }
    if (now) connect();
    else scheduleRetry();
  }

  // State that belongs to a connection: gone with it.
  function connectionLost() {
    clearTimeout(state.pumpTimer);
    state.pumpTimer = null;
    state.joins.clear();
    for (const r of state.rooms.values()) {
      r.joined = false;
      for (const t of r.typers.values()) clearTimeout(t);
      r.typers.clear();
    }
    renderTyping();
    state.outbox = state.outbox.filter((e) => {
      if (e.boundId !== null) return false; // stored: only the ack was missing
      if (e.sent && e.kind === 'whisper') {
        // Whispers are not stored, so a retry could deliver one twice: say so instead.
        markFailed(e, 'maybe not delivered (the connection was lost)');
        return false;
      }
      e.sent = false;
      setRowState(e);
      return true;
    });
  }

  function scheduleRetry() {
    clearRetry();
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = Math.max(50, Math.random() * ceiling); // full jitter
    state.attempt = Math.min(state.attempt + 1, 20);
    state.retryAt = Date.now() + delay;
    state.retryTimer = setTimeout(connect, delay);
    state.countdownTimer = setInterval(renderCountdown, 250);
    ui.retry.textContent = 'Retry now';
    ui.retry.hidden = false;
    renderCountdown();
  }

  function renderCountdown() {
    const seconds = Math.max(1, Math.ceil((state.retryAt - Date.now()) / 1000));
    setStatus('disconnected', `offline — retrying in ${seconds} s`);
  }

  function clearRetry() {
    clearTimeout(state.retryTimer);
    clearInterval(state.countdownTimer);
    state.retryTimer = state.countdownTimer = null;
    ui.retry.hidden = true;
  }

  function stopConnecting() {
    clearRetry();
    closeTransport('left');
    setStatus('idle', 'not connected');
  }

  ui.retry.addEventListener('click', () => {
    if (state.transport) return; // an attempt is under way already
    if (state.stopped === 'replaced') {
      state.stopped = null;
      state.attempt = 0;
      setChatEnabled(true);
    }
    if (wantConnection()) connect();
  });

  // The browser says the network is back: do not wait for the timer.
  window.addEventListener('online', () => { if (state.retryTimer) connect(); });

  // ---- sending ---------------------------------------------------------------
  function send(frame) {
    return Boolean(state.transport && state.open && state.transport.send(frame));
  }

  const nextRef = () => `${REF_PREFIX}-${++state.refSeq}`;

  function sendJoin(room) {
    const ref = nextRef();
    const frame = { type: 'join', room, name: state.name || state.wantedName, ref };
    const r = state.rooms.get(room);
    if (state.token) {
      frame.token = state.token;
      frame.rotate = true; // a new token each time: a leaked old one is worth nothing
    }
    if (r && r.lastId !== null) frame.since = r.lastId;
    if (send(frame)) state.joins.set(ref, room);
  }

  // Every say and whisper goes through the outbox, so nothing overtakes what
  // was typed earlier; the pump sends them in order, paced under the server's
  // rate limit, once the connection is open and the room joined.
  function enqueue(entry) {
    if (state.outbox.length >= QUEUE_MAX) {
      systemLine(`Not sent: ${QUEUE_MAX} messages are already waiting for the connection. ` +
        'Try again once it is back.', true, 'queue_full');
      return false;
    }
    entry.ref = nextRef();
    entry.sent = false;
    entry.tries = 0;
    entry.boundId = null;
    entry.row = addMessage({
      name: state.name, to: entry.kind === 'whisper' ? entry.to : undefined,
      text: entry.msg, mine: true, whisper: entry.kind === 'whisper', pending: true,
    });
    state.outbox.push(entry);
    setRowState(entry);
    pump();
    return true;
  }

  function pump() {
    if (state.pumpTimer || !state.open) return;
    const now = Date.now();
    state.tokens = Math.min(SEND_BURST, state.tokens + ((now - state.tokensAt) / 1000) * SEND_RATE);
    state.tokensAt = now;
    const later = (ms) => {
      state.pumpTimer = setTimeout(() => { state.pumpTimer = null; pump(); }, ms);
    };
    for (const e of state.outbox) {
      if (e.sent || e.boundId !== null) continue;
      if (e.kind === 'say' ? !state.rooms.get(e.room)?.joined : !state.name) continue;
      if (e.holdUntil > now) return later(e.holdUntil - now); // keep the order
      if (state.tokens < 1) return later(((1 - state.tokens) / SEND_RATE) * 1000);
      const frame = e.kind === 'say'
        ? { type: 'say', room: e.room, msg: e.msg, ref: e.ref }
        : { type: 'whisper', to: e.to, msg: e.msg, ref: e.ref };
      if (!send(frame)) return;
      state.tokens -= 1;
      e.sent = true;
      e.tries += 1;
      setRowState(e);
    }
  }

  const entryByRef = (ref) => state.outbox.find((e) => e.ref === ref);

  function dropEntry(e) {
    const i = state.outbox.indexOf(e);
    if (i >= 0) state.outbox.splice(i, 1);
  }

  // The first entry, in order, that a frame of ours with this text may be:
  // one that was sent at least once and is not matched yet.
  function bindable(kind, match) {
    return state.outbox.find((e) => e.kind === kind && e.tries > 0 && e.boundId === null && match(e));
  }

  // ---- incoming frames: the one place they are handled --------------------
  function handleFrame(f) {
    switch (f.type) {
      case 'joined': return onJoined(f);
      case 'message': return onMessage(f);
      case 'whisper': return onWhisper(f);
      case 'presence': return onPresence(f);
      case 'typing': return onTyping(f);
      case 'ack': return onAck(f);
      case 'left': return onLeft(f);
      case 'history': return onHistory(f);
      case 'error': return onError(f);
      default: return; // unknown frames are ignored (forward compatibility)
    }
  }

  function roomState(room) {
    let r = state.rooms.get(room);
    if (!r) {
      r = {
        lastId: null, members: [], typers: new Map(), joined: false, everJoined: false,
        seen: new Set(), gap: null,
      };
      state.rooms.set(room, r);
    }
    return r;
  }

  function markSeen(r, id) {
    r.seen.add(id);
    if (r.seen.size > SEEN_MAX) r.seen.delete(r.seen.values().next().value);
  }

  function saveSession() {
    try {
      sessionStorage.setItem(STORE_KEY, JSON.stringify({
        name: state.name, token: state.token, room: state.current,
      }));
    } catch { /* storage unavailable: resuming after a reload just shows a join */ }
  }

  function loadSession() {
    try { return JSON.parse(sessionStorage.getItem(STORE_KEY)) || {}; } catch { return {}; }
  }

  function onJoined(f) {
    if (f.ref) state.joins.delete(f.ref);
    if (!state.rooms.has(f.room)) {
      send({ type: 'leave', room: f.room }); // left while the join was on its way
      return;
    }
    const r = roomState(f.room);
    const first = !r.everJoined;
    r.joined = true;
    r.everJoined = true;
    state.attempt = 0; // a working connection: the next failure starts the backoff afresh
    state.name = f.name;
    if (f.token) state.token = f.token;
    saveSession();
    r.members = [...(f.members || [])].sort(byCodePoint);
    if (f.room === state.current) {
      showChat(f.room);
      if (first) ui.messages.replaceChildren();
      const history = Array.isArray(f.history) ? f.history : [];
      if (f.recovered === false && !first) {
        const line = systemLine('Some messages from while you were offline could not be ' +
          'recovered; loading what the server still has…', false, undefined, 'gap');
        r.gap = { line, pages: 0 };
        if (history.length && typeof history[0].id === 'string') {
          send({ type: 'history', room: f.room, before: history[0].id, limit: 50 });
        } else {
          r.gap = null;
        }
      }
      for (const m of history) onMessage(m);
      if (first) systemLine(['You joined ', userText(f.room), ' as ', userText(f.name), '.']);
      else systemLine('Reconnected.');
      renderMembers();
      setChatEnabled(true);
      if (first) ui.input.focus();
    }
    pump();
  }

  function onMessage(m) {
    const r = roomState(m.room);
    if (typeof m.id === 'string') {
      r.lastId = m.id;
      if (r.seen.has(m.id)) return; // already shown (a replay after a reconnect)
      markSeen(r, m.id);
    }
    stopTyping(r, m.name);
    if (m.name === state.name) {
      const e = bindable('say', (x) => x.room === m.room && x.msg === m.msg);
      if (e) { confirmEntry(e, m.id, m.ts); return; }
    }
    if (m.room !== state.current) return;
    addMessage({ name: m.name, text: m.msg, ts: m.ts, id: m.id, mine: m.name === state.name });
  }

  function onWhisper(w) {
    if (typeof w.id === 'string') {
      if (state.seenWhispers.has(w.id)) return;
      state.seenWhispers.add(w.id);
    }
    const mine = w.from === state.name;
    if (mine) {
      const e = bindable('whisper', (x) => x.to === w.to && x.msg === w.msg);
      if (e) { confirmEntry(e, w.id, w.ts); return; }
    }
    addMessage({ name: w.from, to: w.to, text: w.msg, ts: w.ts, id: w.id, mine, whisper: true });
  }

  function onAck(f) {
    const e = entryByRef(f.ref);
    if (!e) return;
    dropEntry(e);
    if (e.boundId !== null) return; // its message came first: already shown
    const seen = e.kind === 'say' && state.rooms.get(e.room)?.seen.has(f.id);
    if (seen) {
      e.row.remove(); // shown already from a replay: keep one copy
      return;
    }
    if (e.kind === 'say' && typeof f.id === 'string') markSeen(roomState(e.room), f.id);
    confirmEntry(e, f.id, Date.now());
  }

  // A pending line becomes the confirmed message: it moves below the messages
  // confirmed before it, so everyone sees the same order.
  function confirmEntry(e, id, ts) {
    e.boundId = typeof id === 'string' ? id : '';
    const row = e.row;
    row.classList.remove('pending');
    if (typeof id === 'string') row.dataset.id = id;
    delete row.dataset.ref;
    row.querySelector('.msg-state')?.remove();
    setRowTime(row, ts);
    if (row.isConnected) {
      row.remove();
      appendLine(row);
    }
  }

  function markFailed(e, why) {
    dropEntry(e);
    e.row.classList.remove('pending');
    e.row.classList.add('failed');
    const label = e.row.querySelector('.msg-state');
    if (label) label.textContent = why;
  }

  function setRowState(e) {
    const label = e.row.querySelector('.msg-state');
    if (label) label.textContent = e.sent ? 'sending…' : 'waiting for the connection';
  }

  // Join/leave churn must not bury the conversation (#18): notices for the
  // current room that follow each other (no other line between them) within
  // PRESENCE_MERGE_MS share one line, which sums up each name's net change,
  // and at most PRESENCE_LINES_MAX presence lines are kept, the oldest
  // dropped first (messages are never dropped for them). The members list
  // and the line are rendered once per burst, not once per frame.
  function onPresence(p) {
    if (p.event !== 'join' && p.event !== 'leave') return;
    const r = roomState(p.room);
    if (p.event === 'join') insertSorted(r.members, p.name);
    else {
      const i = r.members.indexOf(p.name);
      if (i >= 0) r.members.splice(i, 1);
      stopTyping(r, p.name);
    }
    if (p.room !== state.current) return;
    const now = Date.now();
    let n = state.notice;
    if (!n || !n.row.isConnected || n.room !== p.room || now - n.started > PRESENCE_MERGE_MS) {
      const row = el('div', 'sys presence');
      appendLine(row); // ends the line before, if any
      n = state.notice = { room: p.room, started: now, names: new Map(), row, dirty: false };
      const lines = ui.messages.querySelectorAll(':scope > .sys.presence');
      for (let i = 0; i < lines.length - PRESENCE_LINES_MAX; i++) lines[i].remove();
    }
    const seen = n.names.get(p.name);
    if (seen) seen.last = p.event;
    else n.names.set(p.name, { first: p.event, last: p.event });
    n.dirty = true;
    if (!state.presenceTimer) state.presenceTimer = setTimeout(renderPresence, PRESENCE_RENDER_MS);
  }

  // Sorted by code point, like `joined.members`: a binary search, so a burst
  // of presence frames costs no full sort each.
  function insertSorted(list, name) {
    let lo = 0, hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (byCodePoint(list[mid], name) < 0) lo = mid + 1; else hi = mid;
    }
    if (list[lo] !== name) list.splice(lo, 0, name);
  }

  function renderPresence() {
    state.presenceTimer = null;
    renderMembers();
    if (state.notice) renderNotice(state.notice);
  }

  function renderNotice(n) {
    if (!n.dirty || !n.row.isConnected) return;
    n.dirty = false;
    n.row.replaceChildren(...noticeParts(n.names));
  }

  // The presence line takes no more notices: render what it has now, as a
  // pending render only looks at the line still taking notices.
  function endNotice() {
    const n = state.notice;
    state.notice = null;
    renderNotice(n);
  }

  // One name's net change over the line's notices: its first and last event
  // say whether it was a member before and is one now.
  const NET = [
    ['join', 'join', 'joined'], ['leave', 'leave', 'left'],
    ['join', 'leave', 'joined and left'], ['leave', 'join', 'left and joined again'],
  ];

  // "alice, bob and 3 others joined; carol left and joined again".
  function noticeParts(names) {
    const parts = [];
    for (const [first, last, verb] of NET) {
      const who = [];
      for (const [name, e] of names) if (e.first === first && e.last === last) who.push(name);
      if (!who.length) continue;
      if (parts.length) parts.push('; ');
      const shown = who.length > 3 ? who.slice(0, 2) : who;
      shown.forEach((name, i) => {
        if (i) parts.push(i === shown.length - 1 && who.length <= 3 ? ' and ' : ', ');
        parts.push(userText(name));
      });
      if (who.length > 3) parts.push(` and ${who.length - 2} others`);
      parts.push(` ${verb}`);
    }
    return parts;
  }

  function onTyping(t) {
    if (t.name === state.name) return;
    const r = roomState(t.room);
    clearTimeout(r.typers.get(t.name));
    r.typers.set(t.name, setTimeout(() => stopTyping(r, t.name), TYPING_SHOW_MS));
    renderTyping();
  }

  function stopTyping(r, name) {
    if (!r.typers.has(name)) return;
    clearTimeout(r.typers.get(name));
    r.typers.delete(name);
    renderTyping();
  }

  // Older messages after a `recovered: false`: they go right under the gap
  // line, oldest first; paging stops when it reaches a message already shown.
  function onHistory(f) {
    const r = state.rooms.get(f.room);
    if (!r || !r.gap || !Array.isArray(f.messages)) return;
    let fresh = [];
    let overlap = false;
    for (const m of f.messages) {
      if (r.seen.has(m.id)) { overlap = true; fresh = []; continue; }
      fresh.push(m);
    }
    let after = r.gap.line;
    for (const m of fresh) {
      if (typeof m.id === 'string') markSeen(r, m.id);
      const row = buildMessage({ name: m.name, text: m.msg, ts: m.ts, id: m.id, mine: m.name === state.name });
      after.after(row);
      after = row;
    }
    const oldest = f.messages[0];
    if (!overlap && f.more && oldest && ++r.gap.pages < GAP_PAGES) {
      send({ type: 'history', room: f.room, before: oldest.id, limit: 50 });
      return;
    }
    r.gap.line.textContent = overlap
      ? 'You were offline for a while: the messages you missed are shown below.'
      : 'You were offline for a while: some messages you missed could not be recovered.';
    r.gap = null;
  }

  function onLeft(f) {
    if (f.room === state.current) return; // already joined again
    const r = state.rooms.get(f.room);
    if (r) for (const t of r.typers.values()) clearTimeout(t);
    state.rooms.delete(f.room);
    // With no room left the connection has no purpose: close it, so the next
    // join may pick another name.
    if (state.rooms.size === 0 && !state.current) stopConnecting();
  }

  function onError(e) {
    const text = e.message || e.code || 'unknown error';
    const room = e.ref ? state.joins.get(e.ref) : undefined;
    if (room !== undefined) state.joins.delete(e.ref);
    if (ui.chatView.hidden) {
      // Errors while joining (bad_name, name_taken, …) belong to the join form.
      showJoinError(text);
      state.rooms.clear();
      state.outbox = [];
      stopConnecting();
      return;
    }
    if (room !== undefined) {
      // A rejoin after a reconnect was refused (say the name was taken meanwhile).
      systemLine(['Could not rejoin ', userText(room), ': ', userText(text)], true, e.code);
      if (room === state.current) {
        state.stopped = 'refused';
        stopConnecting();
        setStatus('disconnected', 'not connected');
        setChatEnabled(false);
      }
      return;
    }
    const entry = e.ref ? entryByRef(e.ref) : null;
    if (entry && (e.code === 'rate_limited' || e.code === 'unavailable') && entry.tries < 5) {
      // Nothing was stored: send it again in a moment, with the same ref.
      entry.sent = false;
      entry.holdUntil = Date.now() + RATE_RETRY_MS;
      setRowState(entry);
      clearTimeout(state.pumpTimer);
      state.pumpTimer = null;
      pump();
      return;
    }
    if (entry) {
      dropEntry(entry);
      entry.row.remove();
    }
    const why = userText(text); // server words, but they may quote user input
    systemLine(entry ? ['Not sent (“', userText(entry.msg), '”): ', why] : ['Error: ', why], true, e.code);
  }

  // ---- rendering ---------------------------------------------------------------
  const pad2 = (n) => String(n).padStart(2, '0');

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // User text with each explicit bidi control replaced by a visible "[U+202E]".
  const neutral = (text) => String(text).replace(
    BIDI_CONTROLS, (c) => `[U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0')}]`);

  // A user-supplied span (name, room, message, …): a <bdi> takes its direction
  // from its own first strong character and is isolated from its neighbours,
  // so no name can flip the "… joined" around it (#18).
  const userText = (text, cls) => el('bdi', cls, neutral(text));

  // Confirmed lines go above the pending ones, which stay at the bottom.
  function appendLine(node) {
    // Any new line ends the presence line that is taking notices.
    if (state.notice) endNotice();
    const box = ui.messages;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const firstPending = node.classList.contains('pending')
      ? null : box.querySelector(':scope > .msg.pending');
    if (firstPending) box.insertBefore(node, firstPending);
    else box.append(node);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function setRowTime(row, ts) {
    const when = new Date(typeof ts === 'number' ? ts : Date.now());
    const time = row.querySelector('.msg-time');
    time.textContent = `${pad2(when.getHours())}:${pad2(when.getMinutes())}`;
    time.dateTime = when.toISOString();
    time.title = when.toLocaleString();
  }

  function buildMessage({ name, to, text, ts, id, mine, whisper, pending }) {
    const row = el('div', 'msg' + (mine ? ' mine' : '') + (whisper ? ' whisper' : '') +
      (pending ? ' pending' : ''));
    if (typeof id === 'string') row.dataset.id = id;
    const head = el('div', 'msg-head');
    const who = el('span', 'msg-name');
    who.append(userText(name));
    if (to !== undefined) who.append(' → ', userText(to)); // a whisper: "from → to"
    head.append(who);
    if (mine) head.append(el('span', 'msg-me', '(me)'));
    if (whisper) head.append(el('span', 'msg-tag', 'whisper'));
    head.append(el('time', 'msg-time'));
    if (pending) head.append(el('span', 'msg-state'));
    const body = el('div', 'msg-text', neutral(text));
    body.dir = 'auto'; // an RTL message reads right to left, isolated from the page
    row.append(head, body);
    setRowTime(row, ts);
    return row;
  }

  function addMessage(fields) {
    const row = buildMessage(fields);
    appendLine(row);
    return row;
  }

  // `text`: a string of our own, or an array of strings and nodes (userText).
  function systemLine(text, isError = false, code, extraClass) {
    const row = el('div', 'sys' + (isError ? ' error' : '') + (extraClass ? ` ${extraClass}` : ''));
    row.append(...(Array.isArray(text) ? text : [text]));
    if (code) row.dataset.code = code;
    appendLine(row);
    return row;
  }

  function renderMembers() {
    const r = state.rooms.get(state.current);
    const names = r ? r.members : [];
    ui.members.replaceChildren(...names.map((n) => {
      const li = el('li', n === state.name ? 'me' : '');
      li.append(userText(n));
      return li;
    }));
    ui.memberCount.textContent = `(${names.length})`;
  }

  function renderTyping() {
    const r = state.rooms.get(state.current);
    const names = r ? [...r.typers.keys()] : [];
    let parts = [];
    if (names.length === 1) parts = [userText(names[0]), ' is typing…'];
    else if (names.length === 2) parts = [userText(names[0]), ' and ', userText(names[1]), ' are typing…'];
    else if (names.length > 2) parts = [`${names.length} people are typing…`];
    ui.typing.replaceChildren(...parts);
  }

  function setChatEnabled(on) {
    ui.input.disabled = !on;
    ui.send.disabled = !on;
  }

  function showChat(room) {
    ui.joinView.hidden = true;
    ui.chatView.hidden = false;
    ui.leave.hidden = false;
    ui.roomTitle.hidden = false;
    ui.roomTitle.replaceChildren('#', userText(room));
  }

  function showJoin() {
    ui.chatView.hidden = true;
    ui.leave.hidden = true;
    ui.roomTitle.hidden = true;
    ui.joinView.hidden = false;
    ui.typing.textContent = '';
    ui.join.disabled = false;
    ui.name.focus();
  }

  function showJoinError(text) {
    ui.joinError.textContent = neutral(text);
    ui.joinError.hidden = !text;
    ui.join.disabled = false;
  }

  // ---- user actions --------------------------------------------------------------
  ui.joinForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = ui.name.value.trim();
    const room = ui.room.value.trim();
    const problem = nameProblem(name) || roomProblem(room);
    if (problem) return showJoinError(problem);
    showJoinError('');
    state.current = room;
    state.stopped = null;
    roomState(room);
    ui.join.disabled = true;
    if (state.open && (!state.name || state.name === name)) {
      state.wantedName = name;
      sendJoin(room);
    } else {
      closeTransport('new identity');
      // A reload of this tab takes its name back with the stored token.
      const saved = loadSession();
      const token = saved.name === name && typeof saved.token === 'string' ? saved.token : null;
      Object.assign(state, { name: null, token, wantedName: name, attempt: 0, outbox: [] });
      for (const r of [...state.rooms.keys()]) if (r !== room) state.rooms.delete(r);
      connect();
    }
  });

  ui.leave.addEventListener('click', () => {
    const room = state.current;
    const told = Boolean(room && state.rooms.get(room)?.joined && send({ type: 'leave', room }));
    state.rooms.delete(room);
    state.outbox = []; // what was still unsent goes with the room's lines
    state.current = null;
    // Told: the server's `left` closes the connection (onLeft). Otherwise stop now.
    if (state.rooms.size === 0 && !told) stopConnecting();
    ui.messages.replaceChildren();
    renderMembers();
    showJoin();
  });

  ui.sayForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = ui.input.value;
    if (!text.trim() || !state.current) return;
    const whisper = /^\/w(?:hisper)?\s+(\S+)\s+([\s\S]+)$/.exec(text);
    if (!whisper && /^\/w(?:hisper)?(\s|$)/.test(text)) {
      return systemLine('Usage: /w name message', true);
    }
    const msg = whisper ? whisper[2] : text;
    if (cpLength(msg) > MAX_MSG) {
      return systemLine(`The message is too long (at most ${MAX_MSG} characters).`, true);
    }
    const ok = whisper
      ? enqueue({ kind: 'whisper', to: whisper[1], msg })
      : enqueue({ kind: 'say', room: state.current, msg });
    if (ok) ui.input.value = '';
  });

  ui.input.addEventListener('input', () => {
    const now = Date.now();
    if (!ui.input.value || ui.input.value.startsWith('/')) return;
    if (now - state.lastTypingSent < TYPING_SEND_MS || !state.current) return;
    if (!state.rooms.get(state.current)?.joined) return;
    state.lastTypingSent = now;
    send({ type: 'typing', room: state.current });
  });

  const saved = loadSession();
  if (typeof saved.name === 'string') ui.name.value = saved.name;
  if (typeof saved.room === 'string' && saved.room) ui.room.value = saved.room;
  showJoin();
})();
