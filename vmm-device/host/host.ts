// The host facilities the transports need (vhost-user now, vfio-user next), as one narrow interface: the layer
// under the transports and above the addon wrappers. The production implementation (sys-host.ts) is a thin adapter
// over the native sys addon (vmm-device/native/sys.ts); keeping the transports written against this interface means
// they never see the addon's raw shapes, and error paths a real kernel cannot be made to produce on demand (mmap
// failing, memfd failing) can be exercised with a wrapper that fails on purpose.

export interface Watch {
  /** Stops watching. Idempotent. */
  stop(): void;
}

export type RecvResult =
  | { kind: 'data'; bytes: Uint8Array; fds: number[]; fdsTruncated: boolean }
  | { kind: 'again' }
  | { kind: 'eof' };

export interface HostOps {
  /** st_size of an fd (a memfd's length): mapping past it would SIGBUS on first touch, so it is checked first. */
  fileSize(fd: number): number;
  /** mmap(MAP_SHARED, PROT_READ|PROT_WRITE) of `length` bytes at `offset` (page aligned) as an ArrayBuffer. */
  mmapShared(fd: number, length: number, offset: number): ArrayBuffer;
  /** Detaches the buffer (stale views become empty) and unmaps it. */
  munmap(buffer: ArrayBuffer): void;
  close(fd: number): void;
  /** dup(2) with close-on-exec: a second fd for the same file (queue offload lends duplicates, keeps its own). */
  dup(fd: number): number;
  /** A sealed-size memfd of `size` bytes (inflight area, host-notifier pages). */
  memfd(name: string, size: number): number;
  /** Reads and clears an eventfd's counter; undefined when it was zero (non-blocking). */
  eventfdRead(fd: number): bigint | undefined;
  eventfdWrite(fd: number, value: bigint): void;
  /** Calls `onReadable` on Node's loop whenever `fd` is readable (or hung up). */
  watchReadable(fd: number, onReadable: () => void): Watch;
  /** Sends `bytes` and `fds` in one sendmsg on a stream socket (all or an exception). */
  sendMessage(fd: number, bytes: Uint8Array, fds: readonly number[]): void;
  /** One non-blocking recvmsg of at most `maxBytes` bytes and `maxFds` fds. */
  recv(fd: number, maxBytes: number, maxFds: number): RecvResult;
  /** The host page size (host-notifier areas are one page). */
  readonly pageSize: number;
}

/** What the listening server needs on top of HostOps. */
export interface ListenOps {
  /** A listening, non-blocking AF_UNIX stream socket bound at `path` (an existing socket file is replaced). */
  listenUnix(path: string, backlog: number): number;
  /** One non-blocking accept; undefined when no connection is pending. The new fd is non-blocking. */
  accept(listenFd: number): number | undefined;
}
