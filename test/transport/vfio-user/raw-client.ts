// A minimal vfio-user client for conformance tests (docs/interop/vfio-user.rst): it speaks the messages byte by
// byte over the socket, so a test can send exactly what a buggy or hostile client would.
import { close, connectUnix, recvMsg, sendMsg } from '../../../vmm-device/native/sys.ts';

export const Cmd = {
  VERSION: 1, DMA_MAP: 2, DMA_UNMAP: 3, DEVICE_GET_INFO: 4, DEVICE_GET_REGION_INFO: 5, DEVICE_GET_IRQ_INFO: 7,
  DEVICE_SET_IRQS: 8, REGION_READ: 9, REGION_WRITE: 10, DEVICE_RESET: 13,
} as const;
export const HEADER_SIZE = 16;
const FLAG_REPLY = 1;
const FLAG_ERROR = 0x20;
/** How long a test waits for one reply. */
export const REPLY_TIMEOUT_MS = 5000;

export interface Reply {
  id: number;
  cmd: number;
  /** 0, or the errno of an error reply. */
  errno: number;
  payload: Uint8Array;
}

export function message(id: number, cmd: number, payload: Uint8Array, sizeOverride?: number): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE + payload.length);
  const v = new DataView(bytes.buffer);
  v.setUint16(0, id, true);
  v.setUint16(2, cmd, true);
  v.setUint32(4, sizeOverride ?? bytes.length, true);
  bytes.set(payload, HEADER_SIZE);
  return bytes;
}

export function u32s(...values: number[]): Uint8Array {
  const b = new Uint8Array(values.length * 4);
  values.forEach((x, i) => new DataView(b.buffer).setUint32(i * 4, x, true));
  return b;
}

export function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function u64(value: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
  return b;
}

export class RawClient {
  private nextId = 1;
  private buffered: Uint8Array = new Uint8Array(0);
  private constructor(readonly fd: number) {}

  static connect(path: string): RawClient {
    return new RawClient(connectUnix(path));
  }

  send(bytes: Uint8Array, fds: number[] = []): void {
    let sent = 0;
    while (sent < bytes.length) {
      const n = sendMsg(this.fd, bytes.subarray(sent), sent === 0 ? fds : []);
      if (n !== null) sent += n;
    }
  }

  /** Sends a command and waits for its reply. */
  async request(cmd: number, payload: Uint8Array, fds: number[] = []): Promise<Reply> {
    const id = this.nextId++ & 0xffff;
    this.send(message(id, cmd, payload), fds);
    return this.reply();
  }

  /** Waits for one whole message; undefined when the server closed the connection. */
  async reply(timeoutMs = REPLY_TIMEOUT_MS): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.buffered.length >= HEADER_SIZE) {
        const v = new DataView(this.buffered.buffer, this.buffered.byteOffset);
        const size = v.getUint32(4, true);
        if (this.buffered.length >= size) {
          const flags = v.getUint32(8, true);
          if ((flags & 0xf) !== FLAG_REPLY) throw new Error(`not a reply (flags 0x${flags.toString(16)})`);
          const r: Reply = { id: v.getUint16(0, true), cmd: v.getUint16(2, true), errno: (flags & FLAG_ERROR) !== 0 ? v.getUint32(12, true) : 0, payload: this.buffered.slice(HEADER_SIZE, size) };
          this.buffered = this.buffered.slice(size);
          return r;
        }
      }
      const buf = new Uint8Array(65536);
      const got = recvMsg(this.fd, buf, 4);
      if (got === null) {
        if (Date.now() > deadline) throw new Error('no reply in time');
        // setImmediate, not a timer: a server in this same process answers in the loop's next poll phase, and a
        // timer's granularity would be measured instead of the server (bench/vfio-user).
        await new Promise((r) => setImmediate(r));
        continue;
      }
      if (got.bytes === 0) throw new Error('the server closed the connection');
      for (const fd of got.fds) close(fd);
      this.buffered = cat(this.buffered, buf.subarray(0, got.bytes));
    }
  }

  /** True once the server closed the connection (reads end-of-stream). */
  async closedByServer(timeoutMs = REPLY_TIMEOUT_MS): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      try {
        const got = recvMsg(this.fd, new Uint8Array(4096), 4);
        if (got !== null && got.bytes === 0) return true;
        if (got !== null) for (const fd of got.fds) close(fd);
      } catch {
        return true; // ECONNRESET
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    return false;
  }

  async negotiate(): Promise<Reply> {
    const json = new TextEncoder().encode('{"capabilities":{"max_msg_fds":8}}\0');
    const payload = new Uint8Array(4 + json.length);
    new DataView(payload.buffer).setUint16(0, 0, true); // major 0
    new DataView(payload.buffer).setUint16(2, 1, true); // minor 1
    payload.set(json, 4);
    return this.request(Cmd.VERSION, payload);
  }

  close(): void {
    close(this.fd);
  }
}
