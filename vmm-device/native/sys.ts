// The typed face of the addon's `sys` part (native/src/sys.cc): Unix stream sockets with fd passing, memfd,
// mmap as an external ArrayBuffer, eventfd, and readiness watchers on Node's own event loop.
//
// Conventions, the same for every function:
// - A failing system call throws SysError { syscall, errno (name, e.g. 'EBADF'), code (number) }, whose message
//   reads `recvmsg: EBADF` (plus a detail in parentheses when there is one).
// - Bad arguments (not an integer fd, a negative size, too many fds) throw TypeError/RangeError before any call.
// - Every fd this module creates is close-on-exec; sockets and eventfds created here are non-blocking, and the
//   would-block case (EAGAIN) is a normal result (`null` or `false`), never an exception.
// - Every fd is owned by the caller: close it with close(). close() first stops any watcher of that fd.

import { loadAddon } from './addon.ts';

/** A system call failed. `errno` is the symbolic name (EBADF), `code` the number (9). */
export class SysError extends Error {
  override name = 'SysError';
  constructor(
    readonly syscall: string,
    readonly errno: string,
    readonly code: number,
    readonly detail: string = '',
  ) {
    super(detail ? `${syscall}: ${errno} (${detail})` : `${syscall}: ${errno}`);
  }
}

/** Bits of the `events` argument of a watch callback. */
export const READABLE = 1;
export const WRITABLE = 2;
/** The peer shut down its sending side (EPOLLRDHUP); reported with READABLE watches. */
export const DISCONNECT = 4;

/** The kernel's limit of fds in one SCM_RIGHTS message (SCM_MAX_FD). */
export const MAX_FDS_PER_MESSAGE = 253;
/** Largest listen() backlog accepted here (the kernel clamps to somaxconn anyway). */
export const MAX_LISTEN_BACKLOG = 4096;

export interface RecvResult {
  /** Bytes received into the buffer; 0 means the peer closed the connection. */
  bytes: number;
  /** fds that came with these bytes (close-on-exec), now owned by the caller. */
  fds: number[];
}

export interface WatchInterest {
  readable?: boolean;
  writable?: boolean;
}

/**
 * Called on readiness. `error` is set when libuv reports a polling error (then stop the watcher); `events` is a
 * bitmask of READABLE | WRITABLE | DISCONNECT. A callback that throws is an uncaught exception of the process.
 */
export type WatchCallback = (error: SysError | null, events: number) => void;

export interface Watcher {
  readonly fd: number;
  /** Stops watching: the callback is never called after this returns. Stopping twice is a no-op. */
  stop(): void;
}

export interface EventfdOptions {
  /** default true: reads return null instead of blocking when the counter is 0 */
  nonblock?: boolean;
  /** default false: EFD_SEMAPHORE (each read takes 1) */
  semaphore?: boolean;
}

interface RawSys {
  listenUnix(path: string, backlog: number): number;
  acceptUnix(fd: number): number | null;
  connectUnix(path: string): number;
  socketPair(): [number, number];
  shutdown(fd: number): void;
  close(fd: number): void;
  sendMsg(fd: number, data: Uint8Array, fds: number[]): number | null;
  recvMsg(fd: number, buf: Uint8Array, maxFds: number): RecvResult | null;
  memfdCreate(name: string, size: number): number;
  fdSize(fd: number): number;
  dup(fd: number): number;
  mmap(fd: number, offset: number, length: number, writable: boolean): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  mapAlias(pieces: [ArrayBuffer, number, number][]): ArrayBuffer;
  eventfdCreate(initial: number, nonblock: boolean, semaphore: boolean): number;
  eventfdRead(fd: number): bigint | null;
  eventfdWrite(fd: number, value: bigint): boolean;
  watch(
    fd: number,
    readable: boolean,
    writable: boolean,
    callback: (status: number, events: number, errorName: string | undefined) => void,
  ): Watcher;
  pageSize(): number;
  setErrorClass(errorClass: new (syscall: string, errno: string, code: number, detail: string) => Error): void;
  stats(): { watchers: number; mappings: number };
  EVENT_READABLE: number;
  EVENT_WRITABLE: number;
  EVENT_DISCONNECT: number;
  MAX_FDS_PER_MESSAGE: number;
}

let rawSys: RawSys | undefined;

function raw(): RawSys {
  if (rawSys !== undefined) return rawSys;
  const loaded = loadAddon().sys as unknown as RawSys;
  if (
    loaded.EVENT_READABLE !== READABLE ||
    loaded.EVENT_WRITABLE !== WRITABLE ||
    loaded.EVENT_DISCONNECT !== DISCONNECT ||
    loaded.MAX_FDS_PER_MESSAGE !== MAX_FDS_PER_MESSAGE
  ) {
    throw new Error('native addon constants differ from vmm-device/native/sys.ts: rebuild the addon (npm install)');
  }
  loaded.setErrorClass(SysError);
  rawSys = loaded;
  return loaded;
}

// ---------------------------------------------------------------------------------------------------------------
// Unix stream sockets

/** A listening Unix stream socket (non-blocking). A stale socket file (nobody listening) is removed first. */
export function listenUnix(path: string, backlog = 16): number {
  if (!Number.isInteger(backlog) || backlog < 1 || backlog > MAX_LISTEN_BACKLOG) {
    throw new RangeError(`listenUnix: backlog must be an integer in [1, ${MAX_LISTEN_BACKLOG}], got ${backlog}`);
  }
  return raw().listenUnix(path, backlog);
}

/** Accepts one pending connection (a non-blocking fd), or null when none is pending. */
export function acceptUnix(listenFd: number): number | null {
  return raw().acceptUnix(listenFd);
}

/** Connects to a listening Unix stream socket; the returned fd is non-blocking. */
export function connectUnix(path: string): number {
  return raw().connectUnix(path);
}

/** Two connected Unix stream sockets (non-blocking). */
export function socketPair(): [number, number] {
  return raw().socketPair();
}

/** shutdown(SHUT_RDWR): the peer reads end-of-stream; a not-connected socket is not an error. */
export function shutdown(fd: number): void {
  raw().shutdown(fd);
}

/** Closes an fd, stopping its watcher first if it has one. */
export function close(fd: number): void {
  raw().close(fd);
}

/**
 * Sends bytes and, with them, fds (SCM_RIGHTS; MSG_NOSIGNAL: a closed peer gives SysError EPIPE, never SIGPIPE).
 * Returns the bytes sent (may be fewer than data.length; the fds went with the first byte), or null when the
 * socket buffer is full (nothing sent, no fd passed). The caller keeps ownership of its fds.
 */
export function sendMsg(fd: number, data: Uint8Array, fds: readonly number[] = []): number | null {
  if (fds.length > MAX_FDS_PER_MESSAGE) {
    throw new RangeError(`sendMsg: ${fds.length} fds, at most ${MAX_FDS_PER_MESSAGE} fit in one message`);
  }
  return raw().sendMsg(fd, data, fds as number[]);
}

/**
 * Receives into buf (up to buf.length bytes) with up to maxFds fds (close-on-exec). Returns null when nothing is
 * ready; bytes 0 means the peer closed. More fds than maxFds is SysError('recvmsg', 'EMSGSIZE') (MSG_CTRUNC), and
 * the fds that did arrive are closed before it is thrown, so nothing leaks.
 */
export function recvMsg(fd: number, buf: Uint8Array, maxFds = 0): RecvResult | null {
  if (!Number.isInteger(maxFds) || maxFds < 0 || maxFds > MAX_FDS_PER_MESSAGE) {
    throw new RangeError(`recvMsg: maxFds must be an integer in [0, ${MAX_FDS_PER_MESSAGE}], got ${maxFds}`);
  }
  return raw().recvMsg(fd, buf, maxFds);
}

// ---------------------------------------------------------------------------------------------------------------
// memfd, fstat, dup, mmap

/** An anonymous shared memory file of `size` bytes (MFD_CLOEXEC | MFD_ALLOW_SEALING). */
export function memfdCreate(name: string, size: number): number {
  checkSize('memfdCreate: size', size);
  return raw().memfdCreate(name, size);
}

/** The size of the file behind an fd (fstat st_size). */
export function fdSize(fd: number): number {
  return raw().fdSize(fd);
}

/** A second fd for the same open file (close-on-exec). */
export function dup(fd: number): number {
  return raw().dup(fd);
}

/** The system page size; mmap offsets must be multiples of it. */
export function pageSize(): number {
  return raw().pageSize();
}

/**
 * Maps [offset, offset + length) of fd MAP_SHARED (read-only unless writable) and returns it as an ArrayBuffer
 * without copying. offset must be page aligned. Release it with munmap(); if it is only dropped, garbage
 * collection unmaps it. Touching bytes beyond the end of the file raises SIGBUS: callers check fdSize() first
 * for regular files and memfds.
 */
export function mmap(fd: number, offset: number, length: number, writable: boolean): ArrayBuffer {
  checkSize('mmap: offset', offset);
  checkSize('mmap: length', length);
  if (length === 0) throw new RangeError('mmap: length must be at least 1 byte');
  return raw().mmap(fd, offset, length, writable);
}

/**
 * Detaches the buffer (every view of it becomes length 0, so stale views read nothing instead of freed memory)
 * and then unmaps it. Calling it again on the same buffer does nothing.
 */
export function munmap(buffer: ArrayBuffer): void {
  raw().munmap(buffer);
}

/** A piece of an existing shared mapping: `length` bytes from `offset` of a buffer mmap() returned. */
export interface AliasPiece {
  buffer: ArrayBuffer;
  offset: number;
  length: number;
}

/** Most pieces one mapAlias() takes (the addon's own bound). */
export const MAX_ALIAS_PIECES = 1 << 20;

/**
 * One new contiguous mapping whose bytes are the given pieces of existing SHARED mappings (from mmap()), back to
 * back: the same pages at a second range of addresses, no copy (a registration with the host RNIC then sees one
 * range). Offsets and lengths must be page multiples. Release it with munmap(); the sources stay mapped.
 */
export function mapAlias(pieces: readonly AliasPiece[]): ArrayBuffer {
  if (pieces.length === 0 || pieces.length > MAX_ALIAS_PIECES) throw new RangeError(`mapAlias: 1 to ${MAX_ALIAS_PIECES} pieces, got ${pieces.length}`);
  for (const [i, p] of pieces.entries()) {
    checkSize(`mapAlias: piece ${i} offset`, p.offset);
    checkSize(`mapAlias: piece ${i} length`, p.length);
  }
  return raw().mapAlias(pieces.map((p) => [p.buffer, p.offset, p.length]));
}

// ---------------------------------------------------------------------------------------------------------------
// eventfd

/** An eventfd (close-on-exec; non-blocking unless options.nonblock is false). */
export function eventfdCreate(initial = 0, options: EventfdOptions = {}): number {
  if (!Number.isInteger(initial) || initial < 0 || initial > 0xffff_ffff) {
    throw new RangeError(`eventfdCreate: initial must be a 32-bit unsigned integer, got ${initial}`);
  }
  return raw().eventfdCreate(initial, options.nonblock ?? true, options.semaphore ?? false);
}

/** Reads and resets the counter (or takes 1 in semaphore mode); null when it is 0. */
export function eventfdRead(fd: number): bigint | null {
  return raw().eventfdRead(fd);
}

/** Adds to the counter; false when that would overflow it (non-blocking eventfd), true otherwise. */
export function eventfdWrite(fd: number, value: bigint | number = 1n): boolean {
  const big = typeof value === 'bigint' ? value : BigInt(value);
  if (big < 1n || big > 0xffff_ffff_ffff_fffen) {
    throw new RangeError(`eventfdWrite: value must be in [1, 2^64-2], got ${big}`);
  }
  return raw().eventfdWrite(fd, big);
}

// ---------------------------------------------------------------------------------------------------------------
// Readiness watchers

/**
 * Watches fd on Node's own loop (uv_poll) and calls back on readiness (level-triggered: as long as the fd stays
 * readable, the callback keeps coming, so drain it). An active watcher keeps the process alive until stopped.
 * One watcher per fd: a second one fails with SysError('uv_poll_init', 'EEXIST').
 */
export function watch(fd: number, interest: WatchInterest, callback: WatchCallback): Watcher {
  const readable = interest.readable ?? false;
  const writable = interest.writable ?? false;
  if (!readable && !writable) throw new RangeError('watch: ask for readable, writable or both');
  return raw().watch(fd, readable, writable, (status, events, errorName) => {
    if (status < 0) {
      callback(new SysError('poll', errorName ?? `E${-status}`, -status, `fd ${fd}`), events);
    } else {
      callback(null, events);
    }
  });
}

/** Counts of what this thread holds open in the addon (for leak checks in tests). */
export function nativeStats(): { watchers: number; mappings: number } {
  return raw().stats();
}

function checkSize(what: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${what} must be a non-negative safe integer, got ${value}`);
  }
}
