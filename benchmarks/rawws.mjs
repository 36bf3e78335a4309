// A minimal, fast WebSocket client for the load generator (Node, no dependencies).
//
// Just what benchmarking a server needs, at the lowest cost per frame:
// - the opening handshake (HTTP/1.1 GET + Upgrade; `101` and
//   `Sec-WebSocket-Accept` checked), no extensions (no compression);
// - incoming frames are located by their header only: a text frame's payload
//   is handed to `onText(buf, start, end)` as offsets into the read buffer
//   (valid only during the call), with no copy, no UTF-8 decode and no JSON
//   parse;
// - pings are answered, the closing handshake is done both ways;
// - outgoing frames are masked with the all-zero key (RFC 6455 allows any
//   key; servers unmask whatever key they get), so the payload is written as
//   is; TCP_NODELAY; the frames sent while one received chunk is handled go
//   out in one write.
//
// States follow the browser API: CONNECTING 0, OPEN 1, CLOSING 2, CLOSED 3.

import { createHash, randomBytes } from "node:crypto";
import net from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const HEAD_END = Buffer.from("\r\n\r\n");
const MAX_HEAD = 16 * 1024;
// Every socket reads into this one buffer (Node's `onread`: no allocation and
// no stream machinery per read). Reads are handled synchronously one at a
// time, and whatever must outlive a read (a partial frame) is copied.
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);

export const CONNECTING = 0;
export const OPEN = 1;
export const CLOSING = 2;
export const CLOSED = 3;

export class RawWs {
  /**
   * @param {string} url ws://host:port/path
   * @param {object} [opts] handshakeTimeoutMs, closeTimeoutMs
   */
  constructor(url, opts = {}) {
    const u = new URL(url);
    this.readyState = CONNECTING;
    this.closeCode = 1006;
    this.closeReason = "";
    this.wasClean = false;
    // Handlers; replace them at will.
    this.onOpen = () => {};
    this.onText = (_buf, _start, _end) => {};
    this.onClose = (_code, _reason, _wasClean) => {};
    this.onError = (_err) => {};
    this._closeTimeoutMs = opts.closeTimeoutMs ?? 5_000;
    this._head = null;
    this._pending = null;
    this._fragments = null;
    this._closeTimer = null;
    this._key = randomBytes(16).toString("base64");
    this._error = null;
    const socket = net.connect({
      host: u.hostname,
      port: Number(u.port || 80),
      noDelay: true,
      onread: {
        buffer: READ_BUFFER,
        callback: (nread, buf) => {
          this._data(buf.subarray(0, nread));
        },
      },
    });
    this._socket = socket;
    this._handshakeTimer = setTimeout(
      () => this._fail(new Error("handshake timeout")),
      opts.handshakeTimeoutMs ?? 10_000,
    );
    socket.on("connect", () => {
      socket.setNoDelay(true);
      socket.write(
        `GET ${u.pathname || "/"} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${this._key}\r\n` +
          "Sec-WebSocket-Version: 13\r\n\r\n",
      );
    });
    socket.on("error", (err) => this._fail(err));
    socket.on("close", () => this._closed());
  }

  /** Send one text frame (a string). Ignored unless OPEN. */
  send(text) {
    if (this.readyState !== OPEN) return;
    this._socket.write(frame(0x1, text));
  }

  /** Start the closing handshake; the TCP connection is dropped if it stalls. */
  close(code = 1000, reason = "") {
    if (this.readyState === CONNECTING) {
      this.terminate();
      return;
    }
    if (this.readyState !== OPEN) return;
    this.readyState = CLOSING;
    this._sendClose(code, reason);
    this._closeTimer = setTimeout(() => this._socket.destroy(), this._closeTimeoutMs);
  }

  /** Drop the TCP connection now. */
  terminate() {
    this._socket.destroy();
  }

  // --- internals -----------------------------------------------------------------

  _sendClose(code, reason) {
    const body = Buffer.alloc(2 + Buffer.byteLength(reason));
    body.writeUInt16BE(code, 0);
    body.write(reason, 2);
    this._socket.write(frame(0x8, body));
  }

  _fail(err) {
    if (this.readyState === CLOSED) return;
    this._error ??= err;
    this._socket.destroy();
  }

  _closed() {
    if (this.readyState === CLOSED) return;
    const wasConnecting = this.readyState === CONNECTING;
    this.readyState = CLOSED;
    clearTimeout(this._handshakeTimer);
    clearTimeout(this._closeTimer);
    if (this._error) this.onError(this._error);
    else if (wasConnecting) this.onError(new Error("connection closed during the handshake"));
    this.onClose(this.closeCode, this.closeReason, this.wasClean);
  }

  _data(chunk) {
    if (this.readyState === CONNECTING) {
      this._head = this._head ? Buffer.concat([this._head, chunk]) : Buffer.from(chunk);
      const end = this._head.indexOf(HEAD_END);
      if (end < 0) {
        if (this._head.length > MAX_HEAD) this._fail(new Error("handshake answer too long"));
        return;
      }
      const head = this._head.subarray(0, end).toString("latin1");
      const rest = this._head.subarray(end + 4);
      this._head = null;
      const status = head.slice(0, head.indexOf("\r\n"));
      if (!/^HTTP\/1\.1 101\b/.test(status)) {
        this._fail(new Error(`handshake refused: ${status}`));
        return;
      }
      const accept = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(head)?.[1];
      const expected = createHash("sha1")
        .update(this._key + GUID)
        .digest("base64");
      if (accept !== expected) {
        this._fail(new Error("bad Sec-WebSocket-Accept"));
        return;
      }
      clearTimeout(this._handshakeTimer);
      this.readyState = OPEN;
      this.onOpen();
      if (rest.length && this.readyState !== CLOSED) this._frames(rest);
      return;
    }
    this._frames(chunk);
  }

  _frames(chunk) {
    // Frames sent by the handlers while this chunk is parsed go out in one
    // write (like a client that writes everything it has at once).
    this._socket.cork();
    try {
      this._parse(chunk);
    } finally {
      this._socket.uncork();
    }
  }

  _parse(chunk) {
    let buf = chunk;
    if (this._pending) {
      buf = Buffer.concat([this._pending, chunk]);
      this._pending = null;
    }
    const n = buf.length;
    let i = 0;
    while (n - i >= 2 && this.readyState !== CLOSED) {
      const b0 = buf[i];
      const b1 = buf[i + 1];
      if (b1 & 0x80) {
        this._fail(new Error("masked frame from the server"));
        return;
      }
      let len = b1 & 0x7f;
      let h = 2;
      if (len === 126) {
        if (n - i < 4) break;
        len = buf.readUInt16BE(i + 2);
        h = 4;
      } else if (len === 127) {
        if (n - i < 10) break;
        len = Number(buf.readBigUInt64BE(i + 2));
        h = 10;
      }
      if (n - i < h + len) break;
      const start = i + h;
      i = start + len;
      this._frame(b0 & 0x0f, (b0 & 0x80) !== 0, buf, start, i);
    }
    if (i < n) this._pending = Buffer.from(buf.subarray(i)); // a copy: buf is reused
  }

  _frame(opcode, fin, buf, start, end) {
    switch (opcode) {
      case 0x1: // text
        if (fin) this.onText(buf, start, end);
        else this._fragments = [Buffer.from(buf.subarray(start, end))];
        return;
      case 0x0: // continuation
        if (!this._fragments) return;
        this._fragments.push(Buffer.from(buf.subarray(start, end)));
        if (fin) {
          const whole = Buffer.concat(this._fragments);
          this._fragments = null;
          this.onText(whole, 0, whole.length);
        }
        return;
      case 0x8: {
        // close
        this.closeCode = end - start >= 2 ? buf.readUInt16BE(start) : 1005;
        this.closeReason = end - start > 2 ? buf.toString("utf8", start + 2, end) : "";
        this.wasClean = true;
        if (this.readyState === OPEN) {
          this.readyState = CLOSING;
          this._sendClose(this.closeCode === 1005 ? 1000 : this.closeCode, "");
        }
        this._socket.end(); // the server closes TCP first; this is our FIN
        this._closeTimer ??= setTimeout(() => this._socket.destroy(), this._closeTimeoutMs);
        return;
      }
      case 0x9: // ping
        if (this.readyState === OPEN) this._socket.write(frame(0xa, buf.subarray(start, end)));
        return;
      default: // pong, binary: not used by these servers' chat frames
        return;
    }
  }
}

/** One client frame: FIN, ``opcode``, masked with the zero key. */
function frame(opcode, data) {
  const len = typeof data === "string" ? Buffer.byteLength(data) : data.length;
  const h = len < 126 ? 6 : len < 65536 ? 8 : 14;
  const out = Buffer.allocUnsafe(h + len);
  out[0] = 0x80 | opcode;
  if (len < 126) {
    out[1] = 0x80 | len;
  } else if (len < 65536) {
    out[1] = 0x80 | 126;
    out.writeUInt16BE(len, 2);
  } else {
    out[1] = 0x80 | 127;
    out.writeBigUInt64BE(BigInt(len), 2);
  }
  out.writeUInt32BE(0, h - 4); // masking key 0: the payload goes as is
  if (typeof data === "string") out.write(data, h, "utf8");
  else data.copy(out, h);
  return out;
}
