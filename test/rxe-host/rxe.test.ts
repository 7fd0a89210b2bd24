// Inside the test host: rxe0 is ACTIVE on the veth pair, the rdma tool sees it, two processes talk RC through it
// (ibv_rc_pingpong, server and client on the same rxe0, GID index 1), and no other network device exists.

import t from 'tap';
import { ONE_BOOT_TEST_TIMEOUT_MS, RUN_TIMEOUT_S, insideTestHostReason, runInTestHost, section, FILE_TIMEOUT_MS } from './harness.ts';

t.setTimeout(FILE_TIMEOUT_MS);

/** Fewer round trips than ibv_rc_pingpong's default 1000: under TCG each takes milliseconds. */
const PINGPONG_ITERATIONS = 200;
/** How long the client waits for the server to listen (seconds, in tenths). */
const SERVER_WAIT_TENTHS = 100;

const script = String.raw`
echo '==> devinfo'; ibv_devinfo -d rxe0 2>&1
echo '==> rdma link'; rdma link 2>&1
echo '==> links'; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort
echo '==> resources'; rdma resource show 2>&1; echo "rdma resource show: $?"
echo '==> pingpong'
ibv_rc_pingpong -d rxe0 -g 1 -n ${PINGPONG_ITERATIONS} -c >/tmp/server.log 2>&1 &
server=$!
# The client connects over TCP (port 18515) to exchange QP numbers: wait until the server listens.
for i in $(seq ${SERVER_WAIT_TENTHS}); do
  grep -q ':4853 ' /proc/net/tcp /proc/net/tcp6 2>/dev/null && break
  sleep 0.1
done
ibv_rc_pingpong -d rxe0 -g 1 -n ${PINGPONG_ITERATIONS} -c localhost >/tmp/client.log 2>&1
echo "client exit: $?"
wait $server
echo "server exit: $?"
echo '==> client log'; cat /tmp/client.log
echo '==> server log'; cat /tmp/server.log
`;

t.test('rxe0 in the test host', { timeout: ONE_BOOT_TEST_TIMEOUT_MS, skip: insideTestHostReason() }, async (t) => {
  const r = await runInTestHost(['--timeout', String(RUN_TIMEOUT_S), '--', 'bash', '-c', script]);
  t.equal(r.code, 0, `the script ran to its end (stderr: ${r.stderr.slice(-2000)})`);

  const devinfo = section(r.stdout, 'devinfo');
  t.match(devinfo, /hca_id:\s+rxe0/, 'ibv_devinfo -d rxe0 finds rxe0');
  t.match(devinfo, /state:\s+PORT_ACTIVE \(4\)/, 'its port is PORT_ACTIVE');
  t.match(devinfo, /link_layer:\s+Ethernet/, 'over Ethernet (RoCE)');

  t.match(section(r.stdout, 'rdma link'), /link rxe0\/1 state ACTIVE .*netdev veth0/, 'rdma link shows rxe0 on veth0, ACTIVE');
  t.equal(section(r.stdout, 'links'), ['lo', 'veth0', 'veth1'].join('\n'), 'no network device but lo and the veth pair');

  const resources = section(r.stdout, 'resources');
  t.match(resources, /^0: rxe0: pd \d+ cq \d+ qp \d+/m, 'rdma resource show lists rxe0 with its counts');
  t.match(resources, /rdma resource show: 0$/, 'and exits 0');

  const pingpong = section(r.stdout, 'pingpong');
  t.match(pingpong, /client exit: 0/, `the client succeeded (log: ${section(r.stdout, 'client log')})`);
  t.match(pingpong, /server exit: 0/, `the server succeeded (log: ${section(r.stdout, 'server log')})`);
  for (const side of ['client log', 'server log']) {
    const log = section(r.stdout, side);
    t.match(log, /GID ::ffff:10\.233\.0\.1/, `${side}: GID index 1 is the IPv4-mapped address of veth0`);
    t.match(log, new RegExp(`${PINGPONG_ITERATIONS} iters in`), `${side}: all ${PINGPONG_ITERATIONS} round trips done`);
  }
});
