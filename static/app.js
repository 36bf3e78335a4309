// triochat browser page: speaks the typed protocol (docs/protocol.md) over /ws.
// All user-supplied text is rendered with textContent, never as HTML.
'use strict';

(() => {
  const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const BAD_NAME_CHARS = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u;
  const MAX_NAME = 32;
  const MAX_MSG = 2000;
  const TYPING_SEND_MS = 3000; // send `typing` at most this often
  const TYPING_SHOW_MS = 4000; // show someone as typing for this long

  const $ = (id) => document.getElementById(id);
  const ui = {
    joinView: $('join-view'), joinForm: $('join-form'), name: $('name'), room: $('room'),
    joinError: $('join-error'), join: $('join'),
    chatView: $('chat-view'), roomTitle: $('room-title'), status: $('status'), leave: $('leave'),
    messages: $('messages'), typing: $('typing'), sayForm: $('say-form'), input: $('input'),
    send: $('send'), members: $('members'), memberCount: $('member-count'),
  };

  // Connection-wide state. `rooms` holds per-room state keyed by room name; a
  // reconnect only has to call connect() again: onOpen rejoins every room in it
  // with the resume token and the last id seen (`since`).
  const state = {
    ws: null,
    name: null,        // the name the server bound (echoed in `joined`)
    wantedName: null,  // the name typed in the join form
    token: null,       // resume token from the last `joined`
    current: null,     // room shown in the chat view
    rooms: new Map(),  // room -> {lastId, members: string[], typers: Map<name, timer>, joined}
    refSeq: 0,
    pending: new Map(), // ref -> {type, text} of frames awaiting ack/error
    lastTypingSent: 0,
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

  // ---- connection ------------------------------------------------------------
  function wsUrl() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  }

  function setStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.status.textContent = text;
  }

  function connect() {
    setStatus('connecting', 'connecting…');
    const ws = new WebSocket(wsUrl());
    state.ws = ws;
    ws.addEventListener('open', () => {
      if (state.ws !== ws) return;
      setStatus('connected', 'connected');
      for (const room of state.rooms.keys()) sendJoin(room);
    });
    ws.addEventListener('message', (ev) => {
      if (state.ws !== ws) return;
      let frame = null;
      try { frame = JSON.parse(ev.data); } catch { /* not JSON: ignored */ }
      if (frame && typeof frame === 'object') handleFrame(frame);
    });
    ws.addEventListener('close', (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      const why = ev.reason ? `${ev.code} ${ev.reason}` : `${ev.code}`;
      setStatus('disconnected', `disconnected (${why})`);
      for (const r of state.rooms.values()) r.joined = false;
      setChatEnabled(false);
      if (!ui.chatView.hidden) systemLine(`Connection closed (${why}).`, true);
      else showJoinError(`Could not connect (${why}).`);
    });
  }

  // Close on purpose: the close event of a socket that is no longer state.ws is ignored.
  function closeWs(reason) {
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close(1000, reason);
    setStatus('idle', 'not connected');
  }

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      systemLine('not connected: nothing was sent', true);
      return false;
    }
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  function nextRef(type, text) {
    const ref = `c-${++state.refSeq}`;
    state.pending.set(ref, { type, text });
    return ref;
  }

  function sendJoin(room) {
    const frame = { type: 'join', room, name: state.name || state.wantedName };
    const r = state.rooms.get(room);
    if (state.token) frame.token = state.token;
    if (r && r.lastId !== null) frame.since = r.lastId;
    send(frame);
  }

  // ---- incoming frames: the one place they are handled --------------------
  function handleFrame(f) {
    switch (f.type) {
      case 'joined': return onJoined(f);
      case 'message': return onMessage(f);
      case 'whisper': return onWhisper(f);
      case 'presence': return onPresence(f);
      case 'typing': return onTyping(f);
      case 'ack': state.pending.delete(f.ref); return;
      case 'left': return onLeft(f);
      case 'history': return; // paging back is not offered by this page yet
      case 'error': return onError(f);
      default: return; // unknown frames are ignored (forward compatibility)
    }
  }

  function roomState(room) {
    let r = state.rooms.get(room);
    if (!r) {
      r = { lastId: null, members: [], typers: new Map(), joined: false };
      state.rooms.set(room, r);
    }
    return r;
  }

  function onJoined(f) {
    const r = roomState(f.room);
    const first = !r.joined && r.lastId === null;
    r.joined = true;
    state.name = f.name;
    if (f.token) state.token = f.token;
    r.members = [...(f.members || [])].sort(byCodePoint);
    if (f.room !== state.current) return;
    showChat(f.room);
    if (first) ui.messages.replaceChildren();
    if (f.recovered === false) systemLine('Some earlier messages could not be recovered.');
    for (const m of f.history || []) onMessage(m);
    if (first) systemLine(`You joined ${f.room} as ${f.name}.`);
    renderMembers();
    setChatEnabled(true);
    ui.input.focus();
  }

  function onMessage(m) {
    const r = roomState(m.room);
    if (m.id !== undefined) r.lastId = m.id;
    stopTyping(r, m.name);
    if (m.room !== state.current) return;
    addMessage({ name: m.name, text: m.msg, ts: m.ts, id: m.id, mine: m.name === state.name });
  }

  function onWhisper(w) {
    const mine = w.from === state.name;
    addMessage({ name: `${w.from} → ${w.to}`, text: w.msg, ts: w.ts, id: w.id, mine, whisper: true });
  }

  function onPresence(p) {
    const r = roomState(p.room);
    const set = new Set(r.members);
    if (p.event === 'join') set.add(p.name);
    else if (p.event === 'leave') { set.delete(p.name); stopTyping(r, p.name); }
    r.members = [...set].sort(byCodePoint);
    if (p.room !== state.current) return;
    systemLine(`${p.name} ${p.event === 'join' ? 'joined' : 'left'}`);
    renderMembers();
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

  function onLeft(f) {
    if (f.room === state.current) return; // already joined again
    const r = state.rooms.get(f.room);
    if (r) for (const t of r.typers.values()) clearTimeout(t);
    state.rooms.delete(f.room);
    // With no room left the connection has no purpose: close it, so the next
    // join may pick another name.
    if (state.rooms.size === 0 && !state.current) closeWs('left');
  }

  function onError(e) {
    const p = e.ref ? state.pending.get(e.ref) : null;
    if (e.ref) state.pending.delete(e.ref);
    const text = e.message || e.code || 'unknown error';
    if (ui.chatView.hidden) {
      // Errors while joining (bad_name, name_taken, …) belong to the join form.
      showJoinError(text);
      closeWs('join refused');
      state.rooms.clear();
      return;
    }
    systemLine(p && p.text ? `Not sent (“${p.text}”): ${text}` : `Error: ${text}`, true, e.code);
  }

  // ---- rendering ---------------------------------------------------------------
  const pad2 = (n) => String(n).padStart(2, '0');

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function appendLine(node) {
    const box = ui.messages;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    box.append(node);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function addMessage({ name, text, ts, id, mine, whisper }) {
    const row = el('div', 'msg' + (mine ? ' mine' : '') + (whisper ? ' whisper' : ''));
    if (id !== undefined) row.dataset.id = id;
    const when = new Date(typeof ts === 'number' ? ts : Date.now());
    const time = el('time', 'msg-time', `${pad2(when.getHours())}:${pad2(when.getMinutes())}`);
    time.dateTime = when.toISOString();
    time.title = when.toLocaleString();
    const head = el('div', 'msg-head');
    head.append(el('span', 'msg-name', name));
    if (mine) head.append(el('span', 'msg-me', '(me)'));
    if (whisper) head.append(el('span', 'msg-tag', 'whisper'));
    head.append(time);
    row.append(head, el('div', 'msg-text', text));
    appendLine(row);
  }

  function systemLine(text, isError = false, code) {
    const row = el('div', 'sys' + (isError ? ' error' : ''), text);
    if (code) row.dataset.code = code;
    appendLine(row);
  }

  function renderMembers() {
    const r = state.rooms.get(state.current);
    const names = r ? r.members : [];
    ui.members.replaceChildren(...names.map((n) => el('li', n === state.name ? 'me' : '', n)));
    ui.memberCount.textContent = `(${names.length})`;
  }

  function renderTyping() {
    const r = state.rooms.get(state.current);
    const names = r ? [...r.typers.keys()] : [];
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    ui.typing.textContent = text;
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
    ui.roomTitle.textContent = `#${room}`;
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
    ui.joinError.textContent = text;
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
    roomState(room);
    ui.join.disabled = true;
    const open = state.ws && state.ws.readyState === WebSocket.OPEN;
    if (open && (!state.name || state.name === name)) {
      state.wantedName = name;
      sendJoin(room);
    } else {
      closeWs('new identity');
      Object.assign(state, { name: null, token: null, wantedName: name });
      for (const r of [...state.rooms.keys()]) if (r !== room) state.rooms.delete(r);
      connect();
    }
  });

  ui.leave.addEventListener('click', () => {
    const room = state.current;
    if (room && state.ws && state.ws.readyState === WebSocket.OPEN) send({ type: 'leave', room });
    else closeWs('left');
    state.rooms.delete(room);
    state.current = null;
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
      ? send({ type: 'whisper', to: whisper[1], msg, ref: nextRef('whisper', msg) })
      : send({ type: 'say', room: state.current, msg, ref: nextRef('say', msg) });
    if (ok) ui.input.value = '';
  });

  ui.input.addEventListener('input', () => {
    const now = Date.now();
    if (!ui.input.value || ui.input.value.startsWith('/')) return;
    if (now - state.lastTypingSent < TYPING_SEND_MS || !state.current) return;
    state.lastTypingSent = now;
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      send({ type: 'typing', room: state.current });
    }
  });

  showJoin();
})();
