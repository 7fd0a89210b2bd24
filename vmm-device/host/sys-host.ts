// HostOps and ListenOps over the native sys addon (vmm-device/native/sys.ts). Thin on purpose: only shape
// changes (null -> 'again', partial sends finished, EMSGSIZE -> "fds truncated").

import * as sys from '../native/sys.ts';
import type { HostOps, ListenOps, RecvResult, Watch } from './host.ts';

/** A reply is a few hundred bytes; a full socket buffer is retried this many times before the send fails. */
export const SEND_RETRIES = 1000;

export class SysHost implements HostOps, ListenOps {
  readonly pageSize = sys.pageSize();

  fileSize(fd: number): number {
    return sys.fdSize(fd);
  }
  mmapShared(fd: number, length: number, offset: number): ArrayBuffer {
    return sys.mmap(fd, offset, length, true);
  }
  munmap(buffer: ArrayBuffer): void {
    sys.munmap(buffer);
  }
  close(fd: number): void {
    sys.close(fd);
  }
  dup(fd: number): number {
    return sys.dup(fd);
  }
  memfd(name: string, size: number): number {
    return sys.memfdCreate(name, size);
  }
  eventfdRead(fd: number): bigint | undefined {
    return sys.eventfdRead(fd) ?? undefined;
  }
  eventfdWrite(fd: number, value: bigint): void {
    // false: the counter would overflow; the peer has that many notifications pending already, which is enough.
    sys.eventfdWrite(fd, value);
  }
  watchReadable(fd: number, onReadable: () => void): Watch {
    const w = sys.watch(fd, { readable: true }, (err) => {
      if (err !== null) {
        w.stop();
        // Report as readable: the reader's recv then sees the error or end-of-stream and closes.
      }
      onReadable();
    });
    return w;
  }
  sendMessage(fd: number, bytes: Uint8Array, fds: readonly number[]): void {
    let sent = 0;
    let first = true;
    for (let tries = 0; sent < bytes.length; ) {
      const n = sys.sendMsg(fd, bytes.subarray(sent), first ? fds : []);
      if (n === null) {
        if (++tries > SEND_RETRIES) throw new Error(`sendmsg: socket buffer stayed full (${sent}/${bytes.length} bytes sent)`);
        continue;
      }
      first = false;
      sent += n;
    }
  }
  recv(fd: number, maxBytes: number, maxFds: number): RecvResult {
    const buf = new Uint8Array(maxBytes);
    let r;
    try {
      r = sys.recvMsg(fd, buf, maxFds);
    } catch (e) {
      if (e instanceof sys.SysError && e.errno === 'EMSGSIZE') return { kind: 'data', bytes: new Uint8Array(0), fds: [], fdsTruncated: true };
      if (e instanceof sys.SysError && e.errno === 'ECONNRESET') return { kind: 'eof' };
      throw e;
    }
    if (r === null) return { kind: 'again' };
    if (r.bytes === 0) {
      for (const f of r.fds) sys.close(f);
      return { kind: 'eof' };
    }
    return { kind: 'data', bytes: buf.subarray(0, r.bytes), fds: r.fds, fdsTruncated: false };
  }
  listenUnix(path: string, backlog: number): number {
    return sys.listenUnix(path, backlog);
  }
  accept(listenFd: number): number | undefined {
    return sys.acceptUnix(listenFd) ?? undefined;
  }

  // Front-end side (the reference front-end uses the same adapter).
  connectUnix(path: string): number {
    return sys.connectUnix(path);
  }
  eventfd(): number {
    return sys.eventfdCreate(0);
  }
  socketPair(): [number, number] {
    return sys.socketPair();
  }
}
