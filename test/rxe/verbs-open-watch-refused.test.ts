// Opening a device whose event fds the event loop refuses to watch rejects with a precise error and leaves nothing
// behind, instead of starting an uninitialised watcher. libuv's uv_poll_init fails when the kernel refuses to add
// the fd to the loop's epoll set; a real cause is the per-user epoll watch limit (fs.epoll.max_user_watches, ENOSPC),
// which a busy host (a backend with tens of thousands of queues beside others) can reach. Before the fix the addon
// ignored uv_poll_init's result and started the uninitialised handle: a crash of the whole backend (SIGSEGV) at
// device open, which is at start-up. Here the limit is lowered for the moment of the open (root in the test host).
import t from 'tap';
import { readFileSync, readdirSync, readlinkSync, writeFileSync } from 'node:fs';
import { RXE_DEVICE, requireTestHost } from './fixture/harness.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';

requireTestHost();

const MAX_USER_WATCHES = '/proc/sys/fs/epoll/max_user_watches';

/** This process's open fds on RDMA character devices (a context holds at least one). */
function uverbsFds(): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith('/dev/infiniband/')) n++;
    } catch {
      // closed between readdir and readlink
    }
  }
  return n;
}

t.test('a device whose event fds cannot be watched is refused and closed; the next open works', async (t) => {
  const verbs = new NativeVerbs();
  const saved = readFileSync(MAX_USER_WATCHES, 'utf8').trim();
  const before = uverbsFds();
  // Nothing but the open runs while the limit is down (no test output, no new watcher of this process).
  writeFileSync(MAX_USER_WATCHES, '1');
  let outcome: unknown;
  try {
    outcome = await verbs.openDevice(RXE_DEVICE).then(
      (handle) => ({ opened: handle }),
      (e: unknown) => e,
    );
  } finally {
    writeFileSync(MAX_USER_WATCHES, saved);
  }
  t.match(outcome, {
    name: 'VerbsError',
    verb: 'ibv_open_device',
    errno: 'ENOSPC',
    message: /^ibv_open_device: ENOSPC \(cannot watch the device's event fds: /,
  }, 'rejected with the errno the kernel gave');
  t.equal(uverbsFds(), before, 'the context it opened is closed again');

  const dev = await verbs.openDevice(RXE_DEVICE);
  t.ok((await verbs.queryDevice(dev)).maxQp > 0, 'the next open works');
  await verbs.closeDevice(dev);
  t.equal(uverbsFds(), before, 'and closes');
});
