// Helpers for the client module's tests (node --test), run against a real
// triochat server by tests/test_js_client.py, which passes its URL in
// TRIOCHAT_URL. No dependencies: Node's WebSocket (22+, or 20 with
// --experimental-websocket), fetch, net, crypto and child_process (`startServer`).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const URL_BASE = process.env.TRIOCHAT_URL;
if (!URL_BASE) throw new Error('TRIOCHAT_URL is not set: run these tests through tests/test_js_client.py');
export const PORT = Number(new URL(URL_BASE).port);

/**
 * A server of the test's own, for options the shared one (TRIOCHAT_URL) does not
 * have: `python -m triochat --port 0 --memory --log-level INFO ...args`, like
 * tests/server_process.py. Python: TRIOCHAT_PYTHON, else the repository's
 * .venv, else `python3`. Resolves with `{url, stop(), output()}` once it logs
 * "listening on http://…"; `stop()` sends SIGTERM (SIGKILL after 15 s).
 */
export function startServer(args = [], { timeoutMs = 10000 } = {}) {
  const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  const venv = path.join(repo, '.venv', 'bin', 'python');
  const python = process.env.TRIOCHAT_PYTHON || (existsSync(venv) ? venv : 'python3');
  const proc = spawn(python, ['-m', 'triochat', '--port', '0', '--memory', '--log-level', 'INFO', ...args], {
    cwd: repo,
    env: { ...process.env, PYTHONUNBUFFERED: '1' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let text = '';
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 15000);
      await exited;
      clearTimeout(timer);
    }
  };
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      stop();
      reject(new Error(`${python} -m triochat ${args.join(' ')}: ${why}; output:\n${text}`));
    };
    const timer = setTimeout(() => fail(`not listening within ${timeoutMs} ms`), timeoutMs);
    proc.once('error', (err) => fail(String(err)));
    proc.once('exit', (code) => fail(`exited (${code}) before listening`));
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (chunk) => { // read to the end, so the pipe never fills
      text += chunk;
      const found = !settled && /listening on (https?:\/\/[^\s"]+)/.exec(text);
      if (!found) return;
      settled = true;
      clearTimeout(timer);
      resolve({ url: `${found[1].replace(/\/$/, '')}/`, stop, output: () => text });
    });
  });
}

/** A short random suffix: tests share one server, whose names and rooms are server-wide. */
export const uid = () => Math.random().toString(36).slice(2, 8);

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The next event `type` from `client` for which `match(detail)` holds (or any,
 * without `match`). Rejects after `ms`, naming what it waited for.
 */
export function nextEvent(client, type, match = () => true, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no '${type}' event matching ${match} within ${ms} ms`));
    }, ms);
    const off = client.on(type, (detail) => {
      if (!match(detail)) return;
      clearTimeout(timer);
      off();
      resolve(detail);
    });
  });
}

/** Every event `type` from now on, in a list (call the returned `stop` to end). */
export function record(client, type) {
  const seen = [];
  seen.stop = client.on(type, (detail) => seen.push(detail));
  return seen;
}

/** An HS256 JWT (docs/protocol.md §15) of `claims`, signed with `secret` (node:crypto only). */
export function makeJwt(claims, secret) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const signed = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${signed}.${createHmac('sha256', secret).update(signed).digest('base64url')}`;
}

/** A call to the server API (docs/protocol.md §16) with the API `key`; resolves with the Response. */
export function api(method, path, { key, body } = {}) {
  const headers = { authorization: `Bearer ${key}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  return fetch(new URL(path, URL_BASE), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
}

/** Wait until `predicate()` holds, checking every 20 ms, for at most `ms`. */
export async function until(predicate, ms = 5000, what = String(predicate)) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`not true within ${ms} ms: ${what}`);
    await sleep(20);
  }
}

/**
 * A raw WebSocket client straight to the server, keeping every frame: what
 * everyone else sees. Its requests carry refs and wait for their answer.
 */
export class Observer {
  static async open(url = URL_BASE) {
    const ws = new WebSocket(`${url.replace(/^http/, 'ws').replace(/\/$/, '')}/ws`);
    const obs = new Observer(ws);
    await new Promise((resolve, reject) => {
      ws.addEventListener('open', resolve, { once: true });
      ws.addEventListener('error', () => reject(new Error('observer could not connect')), { once: true });
    });
    return obs;
  }

  constructor(ws) {
    this.ws = ws;
    this.frames = [];
    this.closed = null;
    this._refs = 0;
    this._waiters = new Set();
    ws.addEventListener('message', (ev) => {
      const f = JSON.parse(ev.data);
      this.frames.push(f);
      for (const w of [...this._waiters]) w(f);
    });
    ws.addEventListener('close', (ev) => { this.closed = ev.code; });
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  /** The next frame (from now) that matches. */
  waitFor(match, ms = 5000) {
    return new Promise((resolve, reject) => {
      const waiter = (f) => {
        if (!match(f)) return;
        clearTimeout(timer);
        this._waiters.delete(waiter);
        resolve(f);
      };
      const timer = setTimeout(() => {
        this._waiters.delete(waiter);
        reject(new Error(`observer: no frame matching ${match} within ${ms} ms`));
      }, ms);
      this._waiters.add(waiter);
    });
  }

  /** A frame that came already, or else the next one that matches. */
  find(match, ms = 5000) {
    const got = this.frames.find(match);
    return got ? Promise.resolve(got) : this.waitFor(match, ms);
  }

  async request(frame, answer) {
    const ref = `obs-${++this._refs}`;
    const reply = this.waitFor((f) => f.ref === ref);
    this.send({ ...frame, ref });
    const got = await reply;
    if (got.type !== answer) throw new Error(`expected ${answer}, got ${JSON.stringify(got)}`);
    return got;
  }

  join(room, name, extra = {}) {
    return this.request({ type: 'join', room, name, ...extra }, 'joined');
  }

  async say(room, msg) {
    return (await this.request({ type: 'say', room, msg }, 'ack')).id;
  }

  said(name, room) {
    return this.frames
      .filter((f) => f.type === 'message' && f.name === name && (!room || f.room === room))
      .map((f) => f.msg);
  }

  presence(name, room) {
    return this.frames
      .filter((f) => f.type === 'presence' && f.name === name && (!room || f.room === room))
      .map((f) => f.event);
  }

  close() {
    try { this.ws.close(1000); } catch { /* closed already */ }
  }
}

/**
 * A TCP proxy in front of the server that the test controls: `refuse()` new
 * connections, `cut()` the open ones, `accept()` again. With `noUpgrades`
 * it drops any connection whose request asks for a WebSocket upgrade (like a
 * proxy that breaks WebSockets), and passes everything else.
 */
export class TcpProxy {
  constructor(upstreamPort = PORT, { noUpgrades = false } = {}) {
    this.upstreamPort = upstreamPort;
    this.noUpgrades = noUpgrades;
    this.refusing = false;
    this.accepted = 0;
    this.pairs = new Set();
  }

  async start() {
    this.server = net.createServer((sock) => this._accept(sock));
    await new Promise((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = this.server.address().port;
    this.url = `http://127.0.0.1:${this.port}/`;
    return this;
  }

  _accept(sock) {
    if (this.refusing) {
      sock.destroy();
      return;
    }
    this.accepted += 1;
    const up = net.connect(this.upstreamPort, '127.0.0.1');
    const pair = [sock, up];
    this.pairs.add(pair);
    const end = () => {
      sock.destroy();
      up.destroy();
      this.pairs.delete(pair);
    };
    sock.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
    up.pipe(sock);
    if (!this.noUpgrades) {
      sock.pipe(up);
      return;
    }
    sock.once('data', (head) => {
      if (/\r\nupgrade:\s*websocket/i.test(head.toString('latin1'))) {
        end();
        return;
      }
      up.write(head);
      sock.pipe(up);
    });
  }

  refuse() { this.refusing = true; }

  accept() { this.refusing = false; }

  cut() {
    for (const [a, b] of [...this.pairs]) {
      a.destroy();
      b.destroy();
    }
    this.pairs.clear();
  }

  async close() {
    this.refuse();
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** A stand-in for WebSocket that the test drives: `FakeWebSocket.last.receive(frame)`. */
export class FakeWebSocket extends EventTarget {
  static instances = [];

  static get last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  constructor(url) {
    super();
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWebSocket.instances.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.dispatchEvent(new Event('open'));
    }, 0);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  receive(frame) {
    const ev = new Event('message');
    ev.data = JSON.stringify(frame);
    this.dispatchEvent(ev);
  }

  /** The peer closes (or the network drops) with `code`. */
  drop(code = 1006) {
    this.readyState = 3;
    const ev = new Event('close');
    ev.code = code;
    ev.reason = '';
    this.dispatchEvent(ev);
  }

  close() {
    this.readyState = 3;
  }
}
