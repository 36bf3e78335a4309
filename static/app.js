// triochat browser page, built on the client module (triochat-client.js, see
// docs/client.md), which speaks the protocol, reconnects, resumes and queues.
// This file is the UI: rooms with unread counts, one message list per room
// (paged back with `history`, grouped by sender, split by day), the composer,
// the title and notifications, and a resume after a reload.
// All user-supplied text is rendered with textContent, never as HTML, each
// span bidi-isolated with its explicit bidi controls shown as escapes (#18);
// only http(s) URLs become links, built as elements, never from markup.

import {
  ChatError, TriochatClient, charCount, mentions, nameProblem, roomProblem,
} from './triochat-client.js';

const TYPING_SEND_MS = 3000; // send `typing` at most this often
const TYPING_SHOW_MS = 4000; // show someone as typing for this long
const PRESENCE_MERGE_MS = 10000; // presence notices this close together share one line
const PRESENCE_LINES_MAX = 50; // presence lines kept per room (oldest dropped first)
const PRESENCE_RENDER_MS = 30; // a burst of presence frames is rendered once
const GROUP_MS = 5 * 60 * 1000; // one sender's messages this close together share a name line
const OLDER_PAGE = 100; // messages per `history` page when scrolling back
const LOAD_OLDER_PX = 200; // load older messages this close to the top
const AT_BOTTOM_PX = 40;
const COMPOSER_MAX_PX = 200; // the composer grows up to this, then scrolls
const STORE_KEY = 'triochat'; // sessionStorage (this tab) and localStorage (new tabs)
const NOTIFY_KEY = 'triochat-notify';
// Explicit bidi controls: embeddings and overrides (U+202A-E), isolates
// (U+2066-9), marks (U+200E/F, U+061C). In user text they could reorder
// what surrounds them ("pay to \u202Eelgoog.evil" reads "live.google"), so
// they are shown as visible escapes instead (#18).
const BIDI_CONTROLS = /[\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]/g;
// http(s) URLs in message text; never across white space, quotes, angle
// brackets or bidi controls. Trailing punctuation is trimmed below.
const URL_RE = /\bhttps?:\/\/[^\s<>"'\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]+/gi;

const params = new URLSearchParams(location.search);
const FORCED = ['ws', 'sse'].includes(params.get('transport')) ? params.get('transport') : null;

const $ = (id) => document.getElementById(id);
const ui = {
  app: $('app'), main: $('main'),
  joinView: $('join-view'), joinForm: $('join-form'), name: $('name'), room: $('room'),
  joinError: $('join-error'), join: $('join'),
  chatView: $('chat-view'), roomTitle: $('room-title'), status: $('status'),
  retry: $('retry'), leave: $('leave'), announcer: $('announcer'),
  roomsPane: $('rooms-pane'), rooms: $('rooms'), roomsToggle: $('rooms-toggle'),
  roomsBadge: $('rooms-toggle-badge'),
  addRoomForm: $('add-room-form'), newRoom: $('new-room'), addRoomError: $('add-room-error'),
  notify: $('notify'), notifyNote: $('notify-note'),
  log: $('log'), pill: $('new-pill'), typing: $('typing'),
  sayForm: $('say-form'), input: $('input'), send: $('send'), charCount: $('char-count'),
  membersPane: $('members-pane'), members: $('members'), memberCount: $('member-count'),
  membersToggle: $('members-toggle'), membersToggleCount: $('members-toggle-count'),
};

const client = new TriochatClient({ transport: FORCED || 'auto' });

const page = {
  current: null, // the room shown
  views: new Map(), // room -> view (see makeView), in the order joined
  rows: new Map(), // outgoing entry ref -> its row
  everChatted: false, // a room was joined in this page: errors go to the log, not the form
  lastTypingSent: 0,
  countdown: null,
  offlineSaid: false, // the offline announcement was made for this outage
  lastStatusSaid: '', // the last status announced (see announce)
};

// ---- storage: resume after a reload (this tab) or in a new tab -----------------
function loadStored() {
  const read = (store) => {
    try { return JSON.parse(store.getItem(STORE_KEY)) || null; } catch { return null; }
  };
  let tab = null;
  let shared = null;
  try { tab = read(sessionStorage); } catch { /* storage unavailable */ }
  try { shared = read(localStorage); } catch { /* storage unavailable */ }
  if (tab && shared && tab.name === shared.name && (shared.savedAt || 0) > (tab.savedAt || 0)) {
    // Another tab of the same name has rotated the token since: its token is the live one.
    return { ...tab, token: shared.token };
  }
  return tab || shared || {};
}

function saveStored() {
  const session = client.session();
  const record = {
    ...session,
    current: page.current,
    unread: Object.fromEntries([...page.views].map(([r, v]) => [r, v.unread])),
    mention: Object.fromEntries([...page.views].filter(([, v]) => v.mention).map(([r]) => [r, true])),
    savedAt: Date.now(),
  };
  if (!session.rooms.length) {
    // Nothing to resume: keep only the name, for the join form.
    record.token = null;
    record.current = null;
  }
  const text = JSON.stringify(record);
  try { sessionStorage.setItem(STORE_KEY, text); } catch { /* a reload shows the join form */ }
  try { localStorage.setItem(STORE_KEY, text); } catch { /* a new tab shows the join form */ }
}

// ---- rendering helpers -----------------------------------------------------------
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

const clock = (ts) => {
  const when = new Date(ts);
  return `${pad2(when.getHours())}:${pad2(when.getMinutes())}`;
};

const dayKey = (ts) => {
  const d = new Date(ts);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
};

function dayLabel(ts) {
  const d = new Date(ts);
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(ts) === dayKey(today.getTime())) return 'Today';
  if (dayKey(ts) === dayKey(yesterday.getTime())) return 'Yesterday';
  const opts = { weekday: 'long', day: 'numeric', month: 'long' };
  if (d.getFullYear() !== today.getFullYear()) opts.year = 'numeric';
  return d.toLocaleDateString(undefined, opts);
}

// Message text: plain text nodes, and an <a> for each http(s) URL. Nothing
// else becomes markup; a `javascript:` URL is never matched.
function messageBody(text) {
  const parts = [];
  let at = 0;
  for (const match of String(text).matchAll(URL_RE)) {
    let url = match[0];
    // Punctuation that ends a sentence is not part of the URL; a closing
    // bracket only when the URL has no opening one.
    while (/[.,;:!?]$/.test(url) || (/[)\]}]$/.test(url) && !/[([{]/.test(url))) url = url.slice(0, -1);
    let href = null;
    try {
      const parsed = new URL(url);
      if (parsed.protocol === 'http:' || parsed.protocol === 'https:') href = parsed.href;
    } catch { /* not a URL after all: stays text */ }
    if (!href) continue;
    if (match.index > at) parts.push(neutral(text.slice(at, match.index)));
    const a = el('a', 'link', url);
    a.href = href;
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
    parts.push(a);
    at = match.index + url.length;
  }
  if (at < text.length) parts.push(neutral(text.slice(at)));
  return parts;
}

// ---- announcements: polite, each message once, never a countdown ----------------------
// Each announcement is a new paragraph added to the live region (#announcer is
// aria-atomic="false", so only the addition is read): the same line twice in a
// row ("bob: yes", "bob: yes") or a repeated whisper is read twice, and
// messages that arrive together are each read. The region keeps the last few.
// A status (`status: true`: offline, connected again, …) equal to the last
// status said is not said again, so a state that comes back is not repeated.
const ANNOUNCED_KEPT = 5;

function announce(text, { status = false } = {}) {
  if (!text) return;
  if (status) {
    if (text === page.lastStatusSaid) return;
    page.lastStatusSaid = text;
  }
  ui.announcer.append(el('p', null, text));
  while (ui.announcer.childElementCount > ANNOUNCED_KEPT) ui.announcer.firstElementChild.remove();
}

// ---- per-room views --------------------------------------------------------------
function makeView(room, stored = {}) {
  const list = el('ol', 'messages'); // named by its region, #log ("Messages in #room")
  const view = {
    room, list,
    unread: stored.unread || 0, mention: Boolean(stored.mention),
    resumed: false, // joined from a stored last id: replayed messages are unread
    atStart: false, loadingOlder: false, ids: new Set(),
    atBottom: true, scrollTop: 0, newCount: 0,
    notice: null, presenceTimer: null, typers: new Map(), gapLine: null, joinedOnce: false,
  };
  page.views.set(room, view);
  return view;
}

const viewOf = (room) => page.views.get(room);
const viewOfList = (list) => [...page.views.values()].find((v) => v.list === list);
const currentView = () => page.views.get(page.current);
const isCurrent = (view) => view && view.room === page.current && !ui.chatView.hidden;

function nearBottom() {
  const box = ui.log;
  return box.scrollHeight - box.scrollTop - box.clientHeight < AT_BOTTOM_PX;
}

function scrollToBottom() {
  ui.log.scrollTop = ui.log.scrollHeight;
  const view = currentView();
  if (view) {
    view.newCount = 0;
    view.atBottom = true;
  }
  renderPill();
}

// Confirmed lines go above the pending ones, which stay at the bottom.
// `fromOthers`: a message someone else wrote (counts for the new-messages pill).
function appendLine(view, node, { fromOthers = false } = {}) {
  if (view.notice && view.notice.row !== node) endNotice(view);
  const current = isCurrent(view);
  const stick = current ? nearBottom() : view.atBottom;
  const firstPending = node.classList.contains('pending')
    ? null : view.list.querySelector(':scope > .msg.pending');
  if (firstPending) view.list.insertBefore(node, firstPending);
  else view.list.append(node);
  if (node.classList.contains('msg')) relayout(view, node);
  if (stick) {
    if (current) scrollToBottom();
  } else if (fromOthers) {
    view.newCount += 1;
    if (current) renderPill();
  }
}

// `text`: a string of our own, or an array of strings and nodes (userText).
function systemLine(view, text, { error = false, code, cls } = {}) {
  if (!view) return null;
  const row = el('li', 'sys' + (error ? ' error' : '') + (cls ? ` ${cls}` : ''));
  row.append(...(Array.isArray(text) ? text : [text]));
  if (code) row.dataset.code = code;
  appendLine(view, row);
  return row;
}

// The message row: one list item whose accessible name is the whole message
// ("alice, 10:42: hello"), whatever is shown of its name line when grouped.
function buildMessage({ name, to, text, ts, id, mine, whisper, pending, room }) {
  const row = el('li', 'msg' + (mine ? ' mine' : '') + (whisper ? ' whisper' : '') +
    (pending ? ' pending' : ''));
  if (typeof id === 'string') row.dataset.id = id;
  if (room && !whisper) row.dataset.roomMsg = '1';
  row.dataset.sender = whisper ? `w:${name}>${to}` : `m:${name}`;
  const head = el('div', 'msg-head');
  const who = el('span', 'msg-name');
  who.append(userText(name));
  if (to !== undefined) who.append(' → ', userText(to)); // a whisper: "from → to"
  head.append(who);
  if (mine) head.append(el('span', 'msg-me', '(me)'));
  if (whisper) head.append(el('span', 'msg-tag', 'whisper'));
  head.append(el('time', 'msg-time'));
  if (pending) head.append(el('span', 'msg-state'));
  const body = el('div', 'msg-text');
  body.append(...messageBody(text));
  body.dir = 'auto'; // an RTL message reads right to left, isolated from the page
  const side = el('time', 'msg-side-time'); // the time of a grouped message, on hover
  side.setAttribute('aria-hidden', 'true');
  row.append(side, head, body);
  row.msgFields = { name, to, text, whisper, mine };
  setRowTime(row, ts);
  return row;
}

function setRowTime(row, ts) {
  const when = typeof ts === 'number' ? ts : Date.now();
  row.dataset.ts = String(when);
  for (const time of row.querySelectorAll('.msg-time, .msg-side-time')) {
    time.textContent = clock(when);
    time.dateTime = new Date(when).toISOString();
  }
  row.querySelector('.msg-time').title = new Date(when).toLocaleString();
  labelRow(row);
}

function labelRow(row) {
  const f = row.msgFields;
  if (!f) return;
  const who = f.whisper ? `Whisper from ${f.name} to ${f.to}` : f.name;
  const state = row.querySelector('.msg-state')?.textContent;
  const label = `${who}, ${clock(Number(row.dataset.ts))}: ${f.text}` + (state ? ` (${state})` : '');
  row.setAttribute('aria-label', neutral(label));
}

const isMsg = (node) => node && node.classList.contains('msg');

// Day separators and grouping, from `start` (a row of the list) to the end:
// a separator before the first message of each day, and a message "grouped"
// (its name line hidden) when the one before it is by the same sender, of the
// same kind, on the same day and within GROUP_MS.
function relayout(view, start = null) {
  const list = view.list;
  let node = start || list.firstElementChild;
  // Back up to the message before `start`: its day and sender decide `start`.
  let prev = null;
  if (start) {
    for (let p = start.previousElementSibling; p; p = p.previousElementSibling) {
      if (isMsg(p)) { prev = p; break; }
    }
  }
  const stale = new Set();
  for (; node; node = node.nextElementSibling) {
    if (node.classList.contains('day')) { stale.add(node); continue; }
    if (!isMsg(node)) continue;
    const ts = Number(node.dataset.ts);
    const key = dayKey(ts);
    const newDay = !prev || dayKey(Number(prev.dataset.ts)) !== key;
    if (newDay) {
      const before = node.previousElementSibling;
      if (before && before.classList.contains('day') && before.dataset.day === key) {
        stale.delete(before);
      } else {
        const sep = el('li', 'day');
        sep.dataset.day = key;
        sep.append(el('h3', 'day-label', dayLabel(ts)));
        list.insertBefore(sep, node);
      }
    }
    const grouped = !newDay && prev.nextElementSibling === node &&
      prev.dataset.sender === node.dataset.sender && ts - Number(prev.dataset.ts) < GROUP_MS &&
      prev.classList.contains('failed') === node.classList.contains('failed');
    node.classList.toggle('grouped', grouped);
    prev = node;
  }
  for (const sep of stale) sep.remove();
}

function addMessage(view, fields, opts) {
  const row = buildMessage(fields);
  appendLine(view, row, opts);
  if (typeof fields.id === 'string') view.ids.add(fields.id);
  return row;
}

// ---- rooms: sidebar, switching, unread --------------------------------------------
function totalUnread() {
  let n = 0;
  for (const v of page.views.values()) n += v.unread;
  return n;
}

function renderTitle() {
  const n = totalUnread();
  document.title = (n ? `(${n}) ` : '') + (page.current ? `#${page.current} · ` : '') + 'triochat';
  ui.roomsBadge.textContent = String(n);
  ui.roomsBadge.hidden = n === 0;
}

function renderRooms() {
  const items = [];
  for (const [room, v] of page.views) {
    const li = el('li');
    const btn = el('button', 'room-btn');
    btn.type = 'button';
    btn.dataset.room = room;
    const label = el('span', 'room-name');
    label.append('#', userText(room));
    btn.append(label);
    // The name says what the badge and the mark show (room names are plain ASCII).
    const extra = [];
    if (v.unread) extra.push(`${v.unread} unread`);
    if (v.mention) extra.push('mentions you');
    btn.setAttribute('aria-label', [`#${room}`, ...extra].join(', '));
    if (v.mention) {
      const mark = el('span', 'mention', '@');
      mark.setAttribute('aria-hidden', 'true');
      btn.append(mark);
    }
    if (v.unread) {
      const badge = el('span', 'unread', v.unread > 99 ? '99+' : String(v.unread));
      badge.setAttribute('aria-hidden', 'true');
      btn.append(badge);
    }
    if (room === page.current) btn.setAttribute('aria-current', 'page');
    li.append(btn);
    items.push(li);
  }
  ui.rooms.replaceChildren(...items);
  renderTitle();
  renderRoomsCap();
}

// The server lets one connection be in `limits.rooms` rooms (from `joined`):
// at that many, the "join another room" control says so instead of sending a
// join the server would refuse.
function roomsFull() {
  const cap = client.limits.rooms;
  if (!Number.isInteger(cap) || cap < 1 || page.views.size < cap) return '';
  return `You're in ${cap === 1 ? '1 room' : `${cap} rooms`}, the most this server allows. ` +
    'Leave one to join another.';
}

function addRoomHint() {
  let hint = $('add-room-hint');
  if (!hint) {
    hint = el('p', 'hint');
    hint.id = 'add-room-hint';
    hint.hidden = true;
    ui.addRoomError.before(hint);
    ui.newRoom.setAttribute('aria-describedby', 'add-room-hint add-room-error');
  }
  return hint;
}

function renderRoomsCap() {
  const text = roomsFull();
  const hint = addRoomHint();
  // Said once: by the hint, or by the error after an attempt at the cap.
  const said = Boolean(text) && ui.addRoomError.dataset.cap === '1';
  hint.textContent = text;
  hint.hidden = !text || said;
  if (!text && ui.addRoomError.dataset.cap) {
    // Below the cap again (a room was left): the error no longer holds.
    ui.addRoomError.textContent = '';
    ui.addRoomError.hidden = true;
    delete ui.addRoomError.dataset.cap;
  }
}

function setUrlRoom(room) {
  const url = new URL(location.href);
  if (room) url.searchParams.set('room', room);
  else url.searchParams.delete('room');
  if (url.href !== location.href) history.replaceState(null, '', url);
}

function switchRoom(room, { focus = false } = {}) {
  const view = viewOf(room);
  if (!view) return;
  const old = currentView();
  if (old && old !== view && !ui.chatView.hidden) {
    old.atBottom = nearBottom();
    old.scrollTop = ui.log.scrollTop;
  }
  if (old) old.list.removeAttribute('id');
  page.current = room;
  view.list.id = 'messages';
  if (ui.log.firstElementChild !== view.list) ui.log.replaceChildren(view.list);
  showChat();
  if (view.atBottom) scrollToBottom();
  else ui.log.scrollTop = view.scrollTop;
  view.unread = 0;
  view.mention = false;
  ui.roomTitle.replaceChildren('#', userText(room));
  ui.log.setAttribute('aria-label', `Messages in #${room}`);
  ui.input.placeholder = `Message #${room}`;
  setUrlRoom(room);
  renderRooms();
  renderMembers();
  renderTyping();
  renderPill();
  setChatEnabled(client.joined(room));
  closeDrawers();
  saveStored();
  maybeLoadOlder(view);
  if (focus) ui.input.focus();
}

function removeView(room) {
  const view = viewOf(room);
  if (!view) return;
  for (const t of view.typers.values()) clearTimeout(t);
  clearTimeout(view.presenceTimer);
  page.views.delete(room);
  for (const [ref, row] of page.rows) if (row.closest('ol') === view.list) page.rows.delete(ref);
  if (page.current === room) {
    page.current = null;
    view.list.remove();
  }
}

// ---- scrollback: older messages when scrolled to the top -----------------------------
function oldestId(view) {
  for (const row of view.list.querySelectorAll(':scope > .msg[data-room-msg][data-id]')) {
    return row.dataset.id;
  }
  return undefined;
}

function markStart(view, text) {
  view.atStart = true;
  if (view.list.querySelector(':scope > .start')) return;
  const row = el('li', 'sys start', text);
  view.list.prepend(row);
}

async function loadOlder(view) {
  if (view.loadingOlder || view.atStart || !client.joined(view.room)) return;
  view.loadingOlder = true;
  const before = oldestId(view);
  let reply;
  try {
    reply = await client.history(view.room, { before, limit: OLDER_PAGE });
  } catch (err) {
    view.loadingOlder = false;
    // The oldest message we show is no longer kept: nothing older is.
    if (err instanceof ChatError && err.code === 'bad_frame') {
      markStart(view, 'Older messages are no longer kept.');
    }
    return; // offline: tried again once the room is joined again
  }
  view.loadingOlder = false;
  if (viewOf(view.room) !== view) return;
  const fresh = reply.messages.filter((m) => typeof m.id === 'string' && !view.ids.has(m.id));
  const current = isCurrent(view);
  const height = ui.log.scrollHeight;
  const top = ui.log.scrollTop;
  const anchor = view.list.querySelector(':scope > .start')?.nextElementSibling ?? view.list.firstElementChild;
  for (const m of fresh) {
    const row = buildMessage({
      name: m.name, text: m.msg, ts: m.ts, id: m.id, mine: m.name === client.name, room: m.room,
    });
    view.list.insertBefore(row, anchor);
    view.ids.add(m.id);
  }
  if (!reply.more) markStart(view, `This is the beginning of #${view.room}.`);
  relayout(view);
  if (current) ui.log.scrollTop = top + (ui.log.scrollHeight - height); // keep what was in view
  maybeLoadOlder(view);
}

// Load older messages while the list is near its top (or does not fill the pane).
function maybeLoadOlder(view) {
  if (!isCurrent(view) || view.atStart || view.loadingOlder) return;
  if (ui.log.scrollTop < LOAD_OLDER_PX) loadOlder(view);
}

function renderPill() {
  const view = currentView();
  const n = view && !ui.chatView.hidden ? view.newCount : 0;
  ui.pill.hidden = n === 0;
  if (n) ui.pill.textContent = n === 1 ? '1 new message ↓' : `${n} new messages ↓`;
}

// ---- presence lines: merged, capped, rendered once per burst ----------------------
// Join/leave churn must not bury the conversation (#18): notices that follow
// each other (no other line between them) within PRESENCE_MERGE_MS share one
// line, which sums up each name's net change, and at most PRESENCE_LINES_MAX
// presence lines are kept, the oldest dropped first (messages are never
// dropped for them). The members list and the line are rendered once per burst.
function onPresence(p) {
  const view = viewOf(p.room);
  if (!view) return;
  if (p.event === 'leave') stopTyping(view, p.name);
  const now = Date.now();
  let n = view.notice;
  if (!n || !n.row.isConnected || now - n.started > PRESENCE_MERGE_MS) {
    const row = el('li', 'sys presence');
    appendLine(view, row); // ends the line before, if any
    n = view.notice = { started: now, names: new Map(), row, dirty: false };
    const lines = view.list.querySelectorAll(':scope > .sys.presence');
    for (let i = 0; i < lines.length - PRESENCE_LINES_MAX; i++) lines[i].remove();
  }
  const seen = n.names.get(p.name);
  if (seen) seen.last = p.event;
  else n.names.set(p.name, { first: p.event, last: p.event });
  n.dirty = true;
  if (!view.presenceTimer) {
    view.presenceTimer = setTimeout(() => {
      view.presenceTimer = null;
      if (view.room === page.current) renderMembers();
      if (view.notice) renderNotice(view.notice);
    }, PRESENCE_RENDER_MS);
  }
}

function renderNotice(n) {
  if (!n || !n.dirty || !n.row.isConnected) return;
  n.dirty = false;
  n.row.replaceChildren(...noticeParts(n.names));
}

// The presence line takes no more notices: render what it has now.
function endNotice(view) {
  const n = view.notice;
  view.notice = null;
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

// ---- typing ------------------------------------------------------------------------
function onTyping(t) {
  const view = viewOf(t.room);
  if (!view) return;
  clearTimeout(view.typers.get(t.name));
  view.typers.set(t.name, setTimeout(() => stopTyping(view, t.name), TYPING_SHOW_MS));
  if (view.room === page.current) renderTyping();
}

function stopTyping(view, name) {
  if (!view.typers.has(name)) return;
  clearTimeout(view.typers.get(name));
  view.typers.delete(name);
  if (view.room === page.current) renderTyping();
}

function renderTyping() {
  const view = currentView();
  const names = view ? [...view.typers.keys()] : [];
  let parts = [];
  if (names.length === 1) parts = [userText(names[0]), ' is typing…'];
  else if (names.length === 2) parts = [userText(names[0]), ' and ', userText(names[1]), ' are typing…'];
  else if (names.length > 2) parts = [`${names.length} people are typing…`];
  ui.typing.replaceChildren(...parts);
}

function renderMembers() {
  const names = page.current ? client.members(page.current) : [];
  ui.members.replaceChildren(...names.map((n) => {
    const li = el('li', n === client.name ? 'me' : '');
    li.append(userText(n));
    return li;
  }));
  ui.memberCount.textContent = `(${names.length})`;
  ui.membersToggleCount.textContent = `(${names.length})`;
}

// ---- attention: unread counts, the title, notifications ------------------------------
const NOTIFY = typeof Notification === 'function';

function notifyPref() {
  try { return localStorage.getItem(NOTIFY_KEY) !== 'off'; } catch { return true; }
}

function notificationsOn() {
  return NOTIFY && Notification.permission === 'granted' && notifyPref();
}

function renderNotify() {
  if (!NOTIFY) {
    ui.notify.hidden = true;
    ui.notifyNote.textContent = 'This browser cannot show notifications.';
    return;
  }
  const permission = Notification.permission;
  ui.notify.disabled = permission === 'denied';
  ui.notify.setAttribute('aria-pressed', String(notificationsOn()));
  ui.notify.textContent = notificationsOn() ? 'Notifications: on' : 'Notifications: off';
  ui.notifyNote.textContent = permission === 'denied'
    ? 'Notifications are blocked in this browser’s site settings.'
    : 'When this tab is hidden: mentions of your name and whispers.';
}

ui.notify.addEventListener('click', async () => {
  if (!NOTIFY) return;
  if (Notification.permission === 'default') {
    let answer = 'default';
    try { answer = await Notification.requestPermission(); } catch { /* treated as not granted */ }
    try { localStorage.setItem(NOTIFY_KEY, answer === 'granted' ? 'on' : 'off'); } catch { /* */ }
  } else if (Notification.permission === 'granted') {
    try { localStorage.setItem(NOTIFY_KEY, notifyPref() ? 'off' : 'on'); } catch { /* */ }
  }
  renderNotify();
});

function notify(title, body, room) {
  if (!document.hidden || !notificationsOn()) return;
  try {
    const n = new Notification(title, { body: body.slice(0, 200), tag: `triochat-${room || 'whisper'}` });
    n.addEventListener('click', () => {
      window.focus();
      if (room && viewOf(room)) switchRoom(room);
      n.close();
    });
  } catch { /* a browser that refuses: the title still counts */ }
}

// A message nobody has seen yet in `view`: count it unless the person is looking at it.
function countUnread(view, mentioned) {
  if (view.room === page.current && !document.hidden && !ui.chatView.hidden) return;
  view.unread += 1;
  if (mentioned) view.mention = true;
  renderRooms();
}

document.addEventListener('visibilitychange', () => {
  if (document.hidden) return;
  const view = currentView();
  if (view && (view.unread || view.mention)) {
    view.unread = 0;
    view.mention = false;
    renderRooms();
    saveStored();
  }
});

// ---- the connection's status, in plain words ---------------------------------------
function setStatus(kind, text) {
  ui.status.dataset.state = kind;
  ui.status.textContent = text;
}

function stopCountdown() {
  clearInterval(page.countdown);
  page.countdown = null;
}

function onStatus(s) {
  stopCountdown();
  ui.retry.hidden = true;
  const sse = s.transport === 'sse';
  const view = currentView();
  if (s.lost && s.lost.wasOpen && (s.state === 'offline' || s.state === 'connecting') && page.everChatted) {
    systemLine(view, `Connection lost: ${s.lost.text}. Reconnecting…`);
  }
  switch (s.state) {
    case 'connecting':
      setStatus('connecting', (s.reconnecting ? 'reconnecting' : 'connecting') + (sse ? ' (SSE)…' : '…'));
      break;
    case 'connected': {
      let text = 'connected';
      if (sse) text = s.forced ? 'connected (SSE)' : 'connected (SSE fallback)';
      setStatus('connected', text);
      if (page.offlineSaid) announce('Connected again.', { status: true });
      page.offlineSaid = false;
      page.lastStatusSaid = ''; // the next stop or outage is news again
      break;
    }
    case 'offline': {
      const render = () => {
        const seconds = Math.max(1, Math.ceil((s.retryAt - Date.now()) / 1000));
        setStatus('disconnected', `can't reach the server, retrying in ${seconds} s`);
      };
      render();
      page.countdown = setInterval(render, 250); // the visible text only: not a live region
      ui.retry.textContent = 'Retry now';
      ui.retry.hidden = false;
      if (!page.offlineSaid) {
        announce("Can't reach the server. Retrying by itself; you can keep typing.", { status: true });
        page.offlineSaid = true;
      }
      if (ui.chatView.hidden && !ui.joinView.hidden && page.joining) {
        showJoinError("Can't reach the server yet. Trying again…");
      }
      break;
    }
    case 'replaced':
      setStatus('disconnected', 'open in another tab');
      systemLine(view, 'This chat is open in another tab or window, so this one stopped. ' +
        'Press “Use here” to continue here.', { error: true });
      announce('This chat was opened in another tab, so this one stopped.', { status: true });
      ui.retry.textContent = 'Use here';
      ui.retry.hidden = false;
      setChatEnabled(false);
      break;
    case 'stopped':
      setChatEnabled(false);
      if (s.reason === 'disconnected') {
        // Close 4009 (docs/protocol.md §16): the page does not come back by
        // itself, and offers no retry; a reload (or joining a room) is the
        // person's own choice.
        setStatus('disconnected', 'disconnected by an operator');
        systemLine(view, 'An operator disconnected you.', { error: true, code: 'disconnected' });
        announce('An operator disconnected you.', { status: true });
      } else if (s.reason === 'unauthorized' || s.reason === 'expired') {
        // Only with a connection token (the demo page has none): say why.
        setStatus('disconnected', 'not signed in');
        systemLine(view, ['Stopped: ', userText(s.error?.message || 'the sign-in failed')],
          { error: true, code: s.error?.code });
        announce('The chat stopped: the sign-in was not accepted.', { status: true });
      } else {
        setStatus('disconnected', 'not connected');
      }
      break;
    case 'idle':
    default:
      setStatus('idle', 'not connected');
      break;
  }
}

ui.retry.addEventListener('click', () => {
  const stored = loadStored();
  const token = stored.name && client.name && stored.name === client.name ? stored.token : undefined;
  if (client.status.state === 'replaced') setChatEnabled(Boolean(page.current));
  client.retryNow({ token });
});

// ---- the client's events -----------------------------------------------------------
client.on('status', onStatus);
client.on('session', saveStored);

client.on('joined', (info) => {
  const view = viewOf(info.room) || makeView(info.room);
  page.everChatted = true;
  page.joining = false;
  page.resuming = false;
  // Replayed messages are news after a reconnect, or after a reload (resumed
  // from a stored last id); on a first join they are the room's recent past.
  view.countReplays = !info.first || view.resumed;
  if (info.first) {
    view.joinedOnce = true;
    if (!view.resumed) {
      systemLine(view, ['You joined ', userText(`#${info.room}`), ' as ', userText(info.name), '.']);
    }
  } else if (info.gap) {
    view.gapLine = systemLine(view, 'Some messages from while you were offline could not be ' +
      'recovered; loading what the server still has…', { cls: 'gap' });
  } else if (view.room === page.current) {
    systemLine(view, 'Reconnected.');
  }
  if (!page.current || ui.chatView.hidden) switchRoom(info.room, { focus: true });
  if (info.room === page.current) {
    renderMembers();
    setChatEnabled(true);
  }
  renderRooms();
  renderLimits();
  // After the replayed messages: the list may not fill the pane yet.
  setTimeout(() => maybeLoadOlder(view), 0);
});

client.on('message', (m) => {
  const view = viewOf(m.room);
  if (!view) return;
  stopTyping(view, m.name);
  if (m.local) {
    const row = page.rows.get(m.local.ref);
    page.rows.delete(m.local.ref);
    if (row) {
      confirmRow(view, row, m.id, m.ts);
      return;
    }
  }
  if (typeof m.id === 'string' && view.ids.has(m.id)) return; // shown from a history page
  addMessage(view, { name: m.name, text: m.msg, ts: m.ts, id: m.id, mine: m.mine, room: m.room },
    { fromOthers: !m.mine });
  if (m.mine) return;
  const mentioned = mentions(m.msg, client.name);
  if (!m.replay || view.countReplays) countUnread(view, mentioned);
  if (m.replay) return;
  if (isCurrent(view) && !document.hidden) announce(`${m.name}: ${m.msg}`);
  else if (mentioned) announce(`${m.name} mentioned you in #${m.room}`);
  if (mentioned) notify(`${m.name} in #${m.room}`, m.msg, m.room);
});

client.on('whisper', (w) => {
  const view = currentView();
  if (!view) return;
  if (w.local) {
    const row = page.rows.get(w.local.ref);
    page.rows.delete(w.local.ref);
    if (row) {
      confirmRow(viewOfList(row.parentElement) || view, row, w.id, w.ts);
      return;
    }
  }
  addMessage(view, { name: w.from, to: w.to, text: w.msg, ts: w.ts, id: w.id, mine: w.mine, whisper: true },
    { fromOthers: !w.mine });
  if (w.mine) return;
  countUnread(view, true);
  announce(`Whisper from ${w.from}: ${w.msg}`);
  notify(`Whisper from ${w.from}`, w.msg, null);
});

// An operator deleted a message (docs/protocol.md §16). Its row goes, text,
// name and label alike, and a short "Message deleted." line takes its place,
// as in most chats: the conversation around it still makes sense, and
// nobody wonders whether they imagined it. Deletions next to each other share
// one line ("3 messages deleted."), so a cleaned-up flood is not a wall of
// notices. It is not announced: a screen reader meets the line when reading
// the log, as a sighted reader does.
client.on('deleted', ({ room, id }) => {
  const view = viewOf(room);
  if (!view) return;
  view.ids.add(id); // a history page still on its way does not bring it back
  const row = [...view.list.querySelectorAll(':scope > .msg[data-room-msg][data-id]')]
    .find((r) => r.dataset.id === id);
  if (!row) return;
  const near = [row.previousElementSibling, row.nextElementSibling]
    .find((n) => n && n.classList.contains('deleted'));
  if (near) {
    const n = Number(near.dataset.count) + 1;
    near.dataset.count = String(n);
    near.textContent = `${n} messages deleted.`;
    row.remove();
  } else {
    const line = el('li', 'sys deleted', 'Message deleted.');
    line.dataset.count = '1';
    row.replaceWith(line);
  }
  relayout(view); // the message after it shows its name line again, and days stay right
});

client.on('presence', (p) => onPresence(p));
client.on('typing', (t) => onTyping(t));

client.on('gap', (g) => {
  const view = viewOf(g.room);
  if (!view || g.state !== 'done') return;
  const line = view.gapLine;
  view.gapLine = null;
  if (!line || !line.isConnected) return;
  let after = line;
  for (const m of g.messages) {
    if (view.ids.has(m.id)) continue;
    const row = buildMessage({ name: m.name, text: m.msg, ts: m.ts, id: m.id, mine: m.name === client.name, room: m.room });
    after.after(row);
    view.ids.add(m.id);
    after = row;
  }
  relayout(view, line);
  line.textContent = g.complete
    ? 'You were offline for a while: the messages you missed are shown below.'
    : 'You were offline for a while: some messages you missed could not be recovered.';
});

client.on('outgoing', ({ entry }) => {
  const row = page.rows.get(entry.ref);
  switch (entry.state) {
    case 'queued':
    case 'sending':
      if (row) setRowState(row, entry);
      return;
    case 'sent':
      if (entry.duplicate && row) { // shown already, from a replay: keep one copy
        row.remove();
        page.rows.delete(entry.ref);
      }
      return;
    case 'uncertain':
      if (row) {
        page.rows.delete(entry.ref);
        row.classList.remove('pending');
        row.classList.add('failed');
        row.querySelector('.msg-state').textContent = 'maybe not delivered (the connection was lost)';
        labelRow(row);
      }
      return;
    case 'cancelled':
      if (row) row.remove();
      page.rows.delete(entry.ref);
      return;
    case 'failed': {
      if (row) row.remove();
      page.rows.delete(entry.ref);
      const view = entry.kind === 'say' ? viewOf(entry.room) : currentView();
      const why = userText(entry.error?.message || entry.error?.code || 'unknown error');
      systemLine(view || currentView(), ['Not sent (“', userText(entry.msg), '”): ', why],
        { error: true, code: entry.error?.code });
      return;
    }
    default:
  }
});

client.on('error', (e) => {
  if (e.room !== undefined) {
    const view = viewOf(e.room);
    if (view && !view.joinedOnce && page.resuming) {
      // A room of a resume that the server refused: it goes; the others stay.
      const wasCurrent = page.current === e.room;
      removeView(e.room);
      const next = page.views.keys().next().value;
      if (wasCurrent && next) switchRoom(next);
      renderRooms();
    }
    if (!page.everChatted || page.resuming) return; // the join form tells of a first join
    // A rejoin after a reconnect was refused (say the name was taken meanwhile).
    systemLine(view || currentView(), ['Could not rejoin ', userText(`#${e.room}`), ': ', userText(e.message)],
      { error: true, code: e.code });
    if (e.room === page.current) setChatEnabled(false);
    return;
  }
  systemLine(currentView(), ['Error: ', userText(e.message)], { error: true, code: e.code });
});

// A pending line becomes the confirmed message: it moves below the messages
// confirmed before it, so everyone sees the same order.
function confirmRow(view, row, id, ts) {
  row.classList.remove('pending');
  if (typeof id === 'string') {
    row.dataset.id = id;
    view.ids.add(id);
  }
  row.querySelector('.msg-state')?.remove();
  setRowTime(row, ts);
  if (row.isConnected) {
    const list = row.parentElement;
    const next = row.nextElementSibling;
    row.remove();
    if (next) relayout({ list }, next);
    appendLine(view, row);
  }
}

function setRowState(row, entry) {
  const label = row.querySelector('.msg-state');
  if (label) label.textContent = entry.state === 'sending' ? 'sending…' : 'waiting for the connection';
  labelRow(row);
}

// ---- views: the join form and the chat ----------------------------------------------
function setChatEnabled(on) {
  ui.input.disabled = !on;
  ui.send.disabled = !on;
}

function showChat() {
  if (!ui.chatView.hidden) return;
  ui.joinView.hidden = true;
  ui.chatView.hidden = false;
  ui.roomsPane.hidden = false;
  ui.membersPane.hidden = false;
  ui.leave.hidden = false;
  ui.roomTitle.hidden = false;
  document.body.classList.add('in-chat');
}

function showJoin() {
  closeDrawers();
  ui.chatView.hidden = true;
  ui.roomsPane.hidden = true;
  ui.membersPane.hidden = true;
  ui.leave.hidden = true;
  ui.roomTitle.hidden = true;
  ui.joinView.hidden = false;
  document.body.classList.remove('in-chat');
  ui.typing.textContent = '';
  ui.join.disabled = false;
  ui.pill.hidden = true;
  renderTitle();
  ui.name.focus();
}

function showJoinError(text) {
  ui.joinError.textContent = neutral(text);
  ui.joinError.hidden = !text;
  ui.join.disabled = false;
}

function renderLimits() {
  ui.input.dataset.max = String(client.limits.msg_chars);
  renderCharCount();
}

function renderCharCount() {
  const max = client.limits.msg_chars;
  const used = charCount(ui.input.value);
  // Shown near the limit only; read by screen readers with the field (aria-describedby).
  ui.charCount.hidden = used < max * 0.8;
  ui.charCount.textContent = `${used} of ${max} characters`;
  ui.charCount.classList.toggle('over', used > max);
}

function growComposer() {
  if (!ui.input.value) {
    ui.input.style.height = ''; // back to the stylesheet's one line
    return;
  }
  ui.input.style.height = 'auto';
  ui.input.style.height = `${Math.min(ui.input.scrollHeight + 2, COMPOSER_MAX_PX)}px`;
}

// ---- drawers (phone layout): rooms and members behind toggles -------------------------
function setDrawer(which, open) {
  const toggle = which === 'rooms' ? ui.roomsToggle : ui.membersToggle;
  document.body.classList.toggle(`show-${which}`, open);
  toggle.setAttribute('aria-expanded', String(open));
}

function closeDrawers() {
  setDrawer('rooms', false);
  setDrawer('members', false);
}

ui.roomsToggle.addEventListener('click', () => {
  const open = ui.roomsToggle.getAttribute('aria-expanded') !== 'true';
  setDrawer('members', false);
  setDrawer('rooms', open);
  if (open) ui.rooms.querySelector('button')?.focus();
});

ui.membersToggle.addEventListener('click', () => {
  const open = ui.membersToggle.getAttribute('aria-expanded') !== 'true';
  setDrawer('rooms', false);
  setDrawer('members', open);
  if (open) ui.membersPane.focus();
});

document.addEventListener('keydown', (ev) => {
  if (ev.key !== 'Escape') return;
  if (document.body.classList.contains('show-rooms')) {
    closeDrawers();
    ui.roomsToggle.focus();
  } else if (document.body.classList.contains('show-members')) {
    closeDrawers();
    ui.membersToggle.focus();
  }
});

// ---- user actions -------------------------------------------------------------------
function startRoom(room, name) {
  const view = viewOf(room) || makeView(room);
  renderRooms();
  return client.join(room, { name }).catch((err) => {
    if (!view.joinedOnce) removeView(room);
    renderRooms();
    throw err;
  });
}

ui.joinForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = ui.name.value.trim();
  const room = ui.room.value.trim();
  const problem = nameProblem(name) || roomProblem(room);
  if (problem) {
    showJoinError(problem);
    return;
  }
  showJoinError('');
  ui.join.disabled = true;
  page.joining = true;
  startRoom(room, name).catch((err) => {
    page.joining = false;
    showJoinError(err.message || String(err));
  });
});

ui.addRoomForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const room = ui.newRoom.value.trim();
  const problem = roomProblem(room);
  const say = (text, { cap = false } = {}) => {
    ui.addRoomError.textContent = text;
    ui.addRoomError.hidden = !text;
    if (cap) ui.addRoomError.dataset.cap = '1';
    else delete ui.addRoomError.dataset.cap;
    renderRoomsCap();
  };
  if (problem) {
    say(problem);
    return;
  }
  if (viewOf(room)) {
    say('');
    ui.newRoom.value = '';
    switchRoom(room, { focus: true });
    return;
  }
  const full = roomsFull();
  if (full) {
    // The server would refuse it (`bad_room`): say why, and keep what was typed.
    say(full, { cap: true });
    return;
  }
  say('');
  ui.newRoom.value = '';
  startRoom(room).then(() => switchRoom(room, { focus: true })).catch((err) => {
    if (!(err instanceof ChatError && err.code === 'left')) say(err.message || String(err));
  });
});

ui.rooms.addEventListener('click', (ev) => {
  const btn = ev.target.closest('button[data-room]');
  if (btn) switchRoom(btn.dataset.room, { focus: true });
});

ui.leave.addEventListener('click', () => {
  const room = page.current;
  if (!room) return;
  const rooms = [...page.views.keys()];
  const next = rooms[rooms.indexOf(room) + 1] ?? rooms[rooms.indexOf(room) - 1];
  removeView(room);
  for (const [ref, row] of page.rows) if (!row.isConnected) page.rows.delete(ref);
  client.leave(room);
  if (next) {
    switchRoom(next, { focus: true });
  } else {
    ui.room.value = room;
    renderMembers();
    showJoin();
  }
  renderRooms();
  saveStored();
});

ui.log.addEventListener('scroll', () => {
  const view = currentView();
  if (!view) return;
  view.atBottom = nearBottom();
  if (view.atBottom && view.newCount) {
    view.newCount = 0;
    renderPill();
  }
  maybeLoadOlder(view);
}, { passive: true });

ui.pill.addEventListener('click', () => {
  scrollToBottom();
  ui.input.focus();
});

ui.sayForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const view = currentView();
  const text = ui.input.value;
  if (!text.trim() || !view) return;
  const whisper = /^\/w(?:hisper)?\s+(\S+)\s+([\s\S]+)$/.exec(text);
  if (!whisper && /^\/w(?:hisper)?(\s|$)/.test(text)) {
    systemLine(view, 'Usage: /w name message', { error: true });
    return;
  }
  const msg = whisper ? whisper[2] : text;
  let entry;
  try {
    entry = whisper ? client.whisper(whisper[1], msg) : client.say(view.room, msg);
  } catch (err) {
    systemLine(view, `Not sent: ${err.message}`, { error: true, code: err.code });
    return;
  }
  const row = buildMessage({
    name: client.name, to: whisper ? entry.to : undefined, text: msg, ts: entry.ts,
    mine: true, whisper: Boolean(whisper), pending: true,
  });
  page.rows.set(entry.ref, row);
  setRowState(row, entry);
  appendLine(view, row);
  scrollToBottom();
  ui.input.value = '';
  growComposer();
  renderCharCount();
});

ui.input.addEventListener('keydown', (ev) => {
  // Enter sends; Shift+Enter (and Enter while an input method is composing) adds a line.
  if (ev.key !== 'Enter' || ev.shiftKey || ev.isComposing || ev.keyCode === 229) return;
  ev.preventDefault();
  ui.sayForm.requestSubmit();
});

ui.input.addEventListener('input', () => {
  growComposer();
  renderCharCount();
  const now = Date.now();
  const room = page.current;
  if (!ui.input.value || ui.input.value.startsWith('/') || !room) return;
  if (now - page.lastTypingSent < TYPING_SEND_MS) return;
  if (client.typing(room)) page.lastTypingSent = now;
});

// ---- start: resume what this tab (or the last tab) had, else the join form --------------
function start() {
  renderNotify();
  renderLimits();
  const stored = loadStored();
  const linked = params.get('room');
  const linkRoom = linked && !roomProblem(linked) ? linked : null;
  if (typeof stored.name === 'string') ui.name.value = stored.name;
  const rooms = Array.isArray(stored.rooms) ? stored.rooms.filter((r) => r && !roomProblem(r.room)) : [];
  if (typeof stored.name === 'string' && !nameProblem(stored.name) && rooms.length) {
    // A reload or a new tab: rejoin every room with the token and the last id
    // seen, no join form, and nobody sees a leave/join.
    for (const r of rooms) {
      const view = makeView(r.room, {
        unread: stored.unread?.[r.room], mention: stored.mention?.[r.room],
      });
      view.resumed = true;
    }
    const current = linkRoom && viewOf(linkRoom) ? linkRoom
      : (viewOf(stored.current) ? stored.current : rooms[0].room);
    switchRoom(current);
    setChatEnabled(false);
    page.everChatted = true;
    page.resuming = true;
    client.resume({ name: stored.name, token: stored.token, rooms }).catch(() => {});
    if (linkRoom && !viewOf(linkRoom)) {
      startRoom(linkRoom).then(() => switchRoom(linkRoom, { focus: true })).catch(() => {});
    }
    return;
  }
  if (linkRoom) ui.room.value = linkRoom;
  else if (typeof stored.room === 'string' && !roomProblem(stored.room)) ui.room.value = stored.room;
  showJoin();
}

// A resume refused outright (the name is someone else's now): back to the form.
client.on('status', (s) => {
  if (s.state !== 'stopped' || s.reason !== 'refused' || !s.error || !page.resuming) return;
  page.resuming = false;
  for (const room of [...page.views.keys()]) removeView(room);
  page.everChatted = false;
  renderRooms();
  showJoin();
  showJoinError(`Could not continue as ${client.wantedName}: ${s.error.message}`);
});

start();
