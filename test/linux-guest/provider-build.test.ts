// The libibverbs provider of the Linux guest driver (guest-driver-spec/linux-provider/) builds, warnings-free, in
// rdma-core's tree (Debian's rdma-core 56.1 source, scripts/linux-guest/provider.sh), and is loadable by this
// machine's libibverbs (Debian 12's 44.0, the one the guest runs): every libibverbs symbol it imports is exported
// by that library under the same version node.

import t from 'tap';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { runScript } from './run-script.ts';

t.setTimeout(900_000);

const HOST_LIBIBVERBS = '/usr/lib/x86_64-linux-gnu/libibverbs.so.1';

/** Dynamic symbols of a shared object as `name@version`, imported (UND) or defined. */
function dynamicSymbols(file: string, imported: boolean): string[] {
  const text = execFileSync('objdump', ['-T', file], { encoding: 'utf8' });
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const m = /\s(\*UND\*|\.\S+)\s+[0-9a-f]+\s+(?:\((\S+)\)|(\S+))\s+(\S+)$/.exec(line);
    if (m === null) continue;
    if ((m[1] === '*UND*') !== imported) continue;
    out.push(`${m[4]}@${m[2] ?? m[3] ?? ''}`);
  }
  return out;
}

t.test('scripts/linux-guest/provider.sh builds libvirtio_rdma-rdmav34.so in rdma-core 56.1', async (t) => {
  const r = await runScript('provider.sh');
  t.equal(r.code, 0, `provider.sh exits 0 (${r.elapsedMs} ms)${r.code === 0 ? '' : `\n${r.stderr.slice(-4000)}`}`);
  const so = r.stdout.trim().split('\n').pop() ?? '';
  t.match(so, /\/libvirtio_rdma-rdmav34\.so$/, 'its last line is the provider (private ABI 34)');
  t.ok(existsSync(so), 'and the file exists');
  const driver = readFileSync(path.join(path.dirname(so), 'virtio_rdma.driver'), 'utf8');
  t.equal(driver, `driver ${path.join(path.dirname(so), 'libvirtio_rdma')}\n`, 'the libibverbs config line names it');

  // rdma-core's version script exports nothing from a provider: it registers itself from a constructor.
  const wanted = dynamicSymbols(so, true).filter((s) => /@IBVERBS_/.test(s));
  t.ok(wanted.some((s) => s === 'verbs_register_driver_34@IBVERBS_PRIVATE_34'), 'it registers itself through private ABI 34');
  const host = new Set(dynamicSymbols(HOST_LIBIBVERBS, false));
  const missing = wanted.filter((s) => !host.has(s));
  t.same(missing, [], `all ${wanted.length} libibverbs symbols it imports are in this machine's libibverbs`);

  const again = await runScript('provider.sh');
  t.equal(again.code, 0, 'a second call exits 0');
  t.equal(again.stdout.trim().split('\n').pop(), so, 'and gives the cached provider');
  t.notMatch(again.stderr, /building the virtio_rdma provider/, 'without building again');
});
