// The native systems layer against real kernel objects: Unix sockets, SCM_RIGHTS, memfds, shared mappings,
// eventfds and uv_poll watchers on this process's own loop. Every test checks that it leaks no fd.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import {
  SysError,
  READABLE,
  DISCONNECT,
  MAX_FDS_PER_MESSAGE,
  acceptUnix,
  close,
  connectUnix,
  dup,
  eventfdCreate,
  eventfdRead,
  eventfdWrite,
  fdSize,
  listenUnix,
  memfdCreate,
  mmap,
  munmap,
  nativeStats,
  pageSize,
  recvMsg,
  sendMsg,
  shutdown,
  socketPair,
  watch,
} from '../../vmm-device/native/sys.ts';

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

/** The SysError `fn` throws, or fails the test. */
function sysErrorOf(t: Test, fn: () => unknown): SysError {
  try {
    fn();
  } catch (e) {
    if (e instanceof SysError) return e;
    t.fail(`expected a SysError, got ${String(e)}`);
    throw e;
  }
  t.fail('expected a SysError, nothing was thrown');
  throw new Error('no error');
}

/** Resolves once `done()` is true, checking after each loop turn; rejects after `ms`. */
async function until(done: () => boolean, what: string, ms = 2000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** Lets the event loop run for `ms` (to see that something does NOT happen). */
const settle = (ms = 50): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function tmpSocketPath(t: Test, name: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-sys-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, name);
}

/** Passes `memfd` from `from` to `to` and returns the received fd. */
function passFd(t: Test, from: number, to: number, fd: number, tag: number): number {
  t.equal(sendMsg(from, Uint8Array.of(tag), [fd]), 1, 'one byte sent with the fd');
  const buf = new Uint8Array(16);
  const got = recvMsg(to, buf, 4);
  if (got === null) throw new Error('nothing received');
  t.equal(got.bytes, 1);
  t.equal(buf[0], tag);
  t.equal(got.fds.length, 1, 'exactly one fd arrived');
  t.not(got.fds[0], fd, 'the receiver holds a new fd number');
  return got.fds[0]!;
}

t.test('SCM_RIGHTS both directions over a socketpair: a memfd seen through two mappings', async (t) => {
  const before = openFds();
  const page = pageSize();
  const [a, b] = socketPair();
  const memA = memfdCreate('a-to-b', 2 * page);
  const memB = memfdCreate('b-to-a', page);
  t.equal(fdSize(memA), 2 * page);

  const atB = passFd(t, a, b, memA, 0x11);
  const atA = passFd(t, b, a, memB, 0x22);
  t.equal(fdSize(atB), 2 * page, 'the received fd is the same file');

  // a -> b: b writes through its mapping of the received fd, a reads through its own mapping of the original.
  const writerMap = mmap(atB, page, page, true);
  const readerMap = mmap(memA, page, page, false);
  new Uint32Array(writerMap)[3] = 0xdeadbeef;
  t.equal(new Uint32Array(readerMap)[3], 0xdeadbeef, 'a store through one mapping is seen through the other');
  // b -> a
  const m1 = mmap(memB, 0, page, true);
  const m2 = mmap(atA, 0, page, true);
  new Uint8Array(m2).set([1, 2, 3], 100);
  t.same([...new Uint8Array(m1, 100, 3)], [1, 2, 3]);

  for (const m of [writerMap, readerMap, m1, m2]) munmap(m);
  for (const fd of [a, b, memA, memB, atA, atB]) close(fd);
  t.equal(openFds(), before, 'no fd leaked');
  t.equal(nativeStats().mappings, 0, 'no mapping left');
});

t.test('listen/connect/accept, with fds passed both ways and a watcher on the listening socket', async (t) => {
  const before = openFds();
  const page = pageSize();
  const socketPath = tmpSocketPath(t, 'server.sock');
  const listener = listenUnix(socketPath, 4);
  t.equal(acceptUnix(listener), null, 'accept with nothing pending is null (EAGAIN)');

  let pending = 0;
  const watcher = watch(listener, { readable: true }, (error, events) => {
    t.equal(error, null);
    if (events & READABLE) pending++;
  });
  const client = connectUnix(socketPath);
  await until(() => pending > 0, 'the listener to become readable');
  const server = acceptUnix(listener);
  if (server === null) throw new Error('accept returned null after readiness');
  watcher.stop();

  const clientMem = memfdCreate('client-ram', page);
  const atServer = passFd(t, client, server, clientMem, 1);
  const serverMem = memfdCreate('server-page', page);
  const atClient = passFd(t, server, client, serverMem, 2);

  const serverView = mmap(atServer, 0, page, true);
  const clientView = mmap(clientMem, 0, page, false);
  new TextEncoder().encodeInto('hello through the server mapping', new Uint8Array(serverView));
  t.equal(new TextDecoder().decode(new Uint8Array(clientView, 0, 32)), 'hello through the server mapping');
  munmap(serverView);
  munmap(clientView);

  for (const fd of [listener, client, server, clientMem, atServer, serverMem, atClient]) close(fd);
  t.equal(openFds(), before, 'no fd leaked');
});

t.test('listenUnix removes a stale socket file but never a live socket or a regular file', async (t) => {
  const socketPath = tmpSocketPath(t, 'stale.sock');
  const first = listenUnix(socketPath);
  close(first); // the file stays behind, nobody listens: stale
  t.ok(fs.existsSync(socketPath));
  const second = listenUnix(socketPath);
  t.pass('a stale socket file is replaced');

  const busy = sysErrorOf(t, () => listenUnix(socketPath));
  t.equal(busy.syscall, 'bind');
  t.equal(busy.errno, 'EADDRINUSE', 'a live listener is left alone');
  close(second);

  const filePath = tmpSocketPath(t, 'regular-file');
  fs.writeFileSync(filePath, 'keep me');
  t.equal(sysErrorOf(t, () => listenUnix(filePath)).errno, 'EADDRINUSE');
  t.equal(fs.readFileSync(filePath, 'utf8'), 'keep me', 'a regular file is never removed');

  const tooLong = sysErrorOf(t, () => listenUnix('/tmp/' + 'x'.repeat(200)));
  t.equal(tooLong.errno, 'ENAMETOOLONG');
  t.equal(sysErrorOf(t, () => connectUnix(socketPath + '.absent')).errno, 'ENOENT');
});

t.test('MSG_CTRUNC: more fds than the receiver accepts is an error and leaks nothing', async (t) => {
  const before = openFds();
  const [a, b] = socketPair();
  const sent = [memfdCreate('x', 0), eventfdCreate(), eventfdCreate()];
  const withFds = openFds();
  t.equal(sendMsg(a, Uint8Array.of(7, 7), sent), 2);
  const error = sysErrorOf(t, () => recvMsg(b, new Uint8Array(8), 1));
  t.equal(error.syscall, 'recvmsg');
  t.equal(error.errno, 'EMSGSIZE');
  t.match(error.message, /MSG_CTRUNC.*maxFds=1.*the \d that arrived were closed/);
  t.equal(openFds(), withFds, 'the fds that arrived were closed, the others never entered this process');

  // Two fds for maxFds 1 fit in the control buffer's alignment padding (no MSG_CTRUNC from the kernel): still
  // more than asked for, still an error, still no leak.
  t.equal(sendMsg(a, Uint8Array.of(7), sent.slice(0, 2)), 1);
  t.equal(sysErrorOf(t, () => recvMsg(b, new Uint8Array(8), 1)).errno, 'EMSGSIZE');
  t.equal(openFds(), withFds);

  // maxFds 0 while the peer sends one: also an error, nothing installed.
  t.equal(sendMsg(a, Uint8Array.of(8), [sent[0]!]), 1);
  t.equal(sysErrorOf(t, () => recvMsg(b, new Uint8Array(8), 0)).errno, 'EMSGSIZE');
  t.equal(openFds(), withFds);

  for (const fd of [...sent, a, b]) close(fd);
  t.equal(openFds(), before, 'no fd leaked');
  t.throws(() => recvMsg(a, new Uint8Array(1), MAX_FDS_PER_MESSAGE + 1), RangeError);
  t.throws(() => sendMsg(a, new Uint8Array(1), new Array(MAX_FDS_PER_MESSAGE + 1).fill(0)), RangeError);
});

t.test('munmap detaches before unmapping: stale views become length 0; twice is a no-op', async (t) => {
  const page = pageSize();
  const mem = memfdCreate('detach', 4 * page);
  const buffer = mmap(mem, page, 2 * page, true);
  const bytes = new Uint8Array(buffer, 10, 100);
  const words = new Uint32Array(buffer);
  bytes[0] = 42;
  t.equal(buffer.byteLength, 2 * page);
  t.equal(nativeStats().mappings, 1);
  munmap(buffer);
  t.equal(buffer.byteLength, 0, 'the ArrayBuffer is detached');
  t.equal(bytes.length, 0, 'a stale Uint8Array view has length 0');
  t.equal(words.length, 0, 'a stale Uint32Array view has length 0');
  t.equal(bytes[0], undefined, 'reading a stale view reads nothing');
  t.equal(nativeStats().mappings, 0);
  munmap(buffer);
  t.pass('munmap twice is a no-op');

  // The data stayed in the file: a fresh mapping sees it.
  const again = mmap(mem, page, page, false);
  t.equal(new Uint8Array(again)[10], 42);
  munmap(again);

  const unaligned = sysErrorOf(t, () => mmap(mem, 100, page, true));
  t.equal(unaligned.syscall, 'mmap');
  t.equal(unaligned.errno, 'EINVAL');
  t.match(unaligned.message, /offset 100 is not a multiple of the page size/);
  t.throws(() => munmap(new ArrayBuffer(8)), TypeError, 'a plain ArrayBuffer is refused');
  t.throws(() => mmap(mem, 0, 0, true), RangeError);
  t.equal(sysErrorOf(t, () => mmap(12345, 0, page, true)).errno, 'EBADF');
  close(mem);
});

t.test('eventfd: two writes coalesce into one watcher callback that reads 2', async (t) => {
  const efd = eventfdCreate();
  const seen: bigint[] = [];
  let callbacks = 0;
  const watcher = watch(efd, { readable: true }, (error, events) => {
    t.equal(error, null);
    t.ok(events & READABLE);
    callbacks++;
    const value = eventfdRead(efd);
    if (value !== null) seen.push(value);
  });
  t.ok(eventfdWrite(efd, 1n));
  t.ok(eventfdWrite(efd, 1));
  await until(() => callbacks > 0, 'the watcher callback');
  await settle();
  t.equal(callbacks, 1, 'one callback for two writes');
  t.same(seen, [2n], 'the callback read the coalesced counter');
  watcher.stop();
  close(efd);
  t.equal(nativeStats().watchers, 0);
});

t.test('stop() prevents every later callback; stopping twice is fine', async (t) => {
  const efd = eventfdCreate(5);
  let callbacks = 0;
  const watcher = watch(efd, { readable: true }, () => callbacks++);
  watcher.stop(); // the fd is readable right now, but the loop has not polled yet
  watcher.stop();
  await settle();
  t.equal(callbacks, 0, 'no callback after stop()');

  // Stopping from inside the callback while the fd stays readable (level-triggered: it would fire again).
  let inside = 0;
  const selfStopping = watch(efd, { readable: true }, () => {
    inside++;
    selfStopping.stop();
  });
  await until(() => inside > 0, 'the first callback');
  await settle();
  t.equal(inside, 1, 'no callback after stop() from inside the callback');
  t.equal(eventfdRead(efd), 5n, 'the counter was never read');

  // close() stops the fd's watcher, so a new fd with the same number is not watched by mistake.
  const other = eventfdCreate();
  let stale = 0;
  watch(other, { readable: true }, () => stale++);
  t.equal(nativeStats().watchers, 1);
  close(other);
  t.equal(nativeStats().watchers, 0, 'close() stopped the watcher');
  const reused = eventfdCreate(1);
  await settle();
  t.equal(stale, 0);
  close(reused);
  close(efd);
});

t.test('one watcher per fd: a second is EEXIST', async (t) => {
  const efd = eventfdCreate();
  const first = watch(efd, { readable: true }, () => {});
  const error = sysErrorOf(t, () => watch(efd, { readable: true }, () => {}));
  t.equal(error.syscall, 'uv_poll_init');
  t.equal(error.errno, 'EEXIST');
  first.stop();
  const second = watch(efd, { readable: true }, () => {});
  second.stop();
  close(efd);
  t.throws(() => watch(efd, {}, () => {}), RangeError);
});

t.test('EAGAIN is a result, not an error', async (t) => {
  const [a, b] = socketPair();
  t.equal(recvMsg(a, new Uint8Array(8)), null, 'recvMsg on an empty socket');
  const efd = eventfdCreate();
  t.equal(eventfdRead(efd), null, 'eventfdRead of a zero counter');
  t.ok(eventfdWrite(efd, 0xffff_ffff_ffff_fffen), 'the largest counter');
  t.equal(eventfdWrite(efd, 1n), false, 'a write that would overflow the counter');
  t.equal(eventfdRead(efd), 0xffff_ffff_ffff_fffen);
  t.throws(() => eventfdWrite(efd, 0n), RangeError);

  const chunk = new Uint8Array(64 * 1024);
  let total = 0;
  let result: number | null;
  while ((result = sendMsg(a, chunk)) !== null) total += result;
  t.ok(total > 0, `the socket buffer filled after ${total} bytes`);
  t.equal(sendMsg(a, Uint8Array.of(1), [efd]), null, 'a full socket takes neither bytes nor fds');

  const semaphore = eventfdCreate(2, { semaphore: true });
  t.equal(eventfdRead(semaphore), 1n);
  t.equal(eventfdRead(semaphore), 1n);
  t.equal(eventfdRead(semaphore), null);
  for (const fd of [a, b, efd, semaphore]) close(fd);
});

t.test('a bad fd gives SysError with errno EBADF', async (t) => {
  const [a, b] = socketPair();
  close(a);
  close(b);
  const error = sysErrorOf(t, () => recvMsg(a, new Uint8Array(4)));
  t.equal(String(error), 'SysError: recvmsg: EBADF');
  t.equal(error.syscall, 'recvmsg');
  t.equal(error.errno, 'EBADF');
  t.equal(error.code, 9);
  t.equal(sysErrorOf(t, () => sendMsg(a, Uint8Array.of(1))).errno, 'EBADF');
  t.equal(sysErrorOf(t, () => close(a)).errno, 'EBADF');
  t.equal(sysErrorOf(t, () => fdSize(a)).errno, 'EBADF');
  t.equal(sysErrorOf(t, () => dup(a)).errno, 'EBADF');
  t.equal(sysErrorOf(t, () => eventfdRead(a)).errno, 'EBADF');
  t.equal(sysErrorOf(t, () => acceptUnix(a)).errno, 'EBADF');
  t.equal(sysErrorOf(t, () => watch(a, { readable: true }, () => {})).errno, 'EBADF');
  t.throws(() => close(-1), RangeError, 'a negative fd never reaches the kernel');
  t.throws(() => close(1.5), RangeError);
  t.throws(() => memfdCreate('x', -1), RangeError);
});

t.test('a closed peer: recvMsg gives bytes 0, the watcher sees DISCONNECT, sendMsg gives EPIPE (no SIGPIPE)', async (t) => {
  const before = openFds();
  const [a, b] = socketPair();
  let events = 0;
  const watcher = watch(a, { readable: true }, (_error, ev) => {
    events |= ev;
  });
  t.equal(sendMsg(b, Uint8Array.of(9)), 1);
  close(b);
  await until(() => (events & DISCONNECT) !== 0, 'DISCONNECT');
  watcher.stop();
  const buf = new Uint8Array(8);
  t.same(recvMsg(a, buf), { bytes: 1, fds: [] }, 'data sent before the close still arrives');
  t.same(recvMsg(a, buf), { bytes: 0, fds: [] }, 'then bytes 0: end of stream');
  t.equal(sysErrorOf(t, () => sendMsg(a, Uint8Array.of(1))).errno, 'EPIPE');

  const [c, d] = socketPair();
  shutdown(c);
  t.same(recvMsg(d, buf), { bytes: 0, fds: [] }, 'shutdown() is seen as end of stream');
  for (const fd of [a, c, d]) close(fd);
  t.equal(openFds(), before);
});

t.test('dup gives an independent fd of the same file', async (t) => {
  const mem = memfdCreate('dup', 4096);
  const copy = dup(mem);
  t.not(copy, mem);
  close(mem);
  t.equal(fdSize(copy), 4096, 'the copy outlives the original fd');
  close(copy);
});

t.test('garbage collection unmaps a dropped mapping, and an explicitly unmapped one only once', async (t) => {
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc') as () => void;
  const mapsWith = (name: string): number =>
    fs.readFileSync('/proc/self/maps', 'utf8').split('\n').filter((line) => line.includes(`memfd:${name}`)).length;
  const mem = memfdCreate('gc-dropped', pageSize());
  const kept = memfdCreate('gc-unmapped', pageSize());
  (() => {
    new Uint8Array(mmap(mem, 0, pageSize(), true))[0] = 1;
    munmap(mmap(kept, 0, pageSize(), true));
  })();
  t.equal(mapsWith('gc-dropped'), 1, 'the dropped mapping is still mapped before collection');
  t.equal(mapsWith('gc-unmapped'), 0);
  await until(() => {
    gc();
    return nativeStats().mappings === 0;
  }, 'the finalizer');
  t.equal(mapsWith('gc-dropped'), 0, 'the finalizer unmapped it');
  close(mem);
  close(kept);
});
