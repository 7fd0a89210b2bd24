// The Linux guest driver (guest-driver-spec/linux/) builds, warnings-free (-Werror), against the headers of the
// kernel the test host boots, and is a module that binds virtio device ID 42. The build itself is the check.

import t from 'tap';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { pinnedRelease, root, runScript } from './run-script.ts';

t.setTimeout(600_000);

t.test('scripts/linux-guest/build.sh builds virtio_rdma.ko for the pinned kernel', async (t) => {
  const r = await runScript('build.sh');
  t.equal(r.code, 0, `build.sh exits 0 (${r.elapsedMs} ms)${r.code === 0 ? '' : `\n${r.stderr}`}`);
  const ko = r.stdout.trim().split('\n').pop() ?? '';
  t.match(ko, /\/virtio_rdma\.ko$/, 'its last line is the module');
  t.ok(existsSync(ko), 'and the file exists');
  const info = (field: string): string => execFileSync('modinfo', ['-F', field, ko], { encoding: 'utf8' }).trim();
  t.equal(info('alias'), 'virtio:d0000002Av*', 'it binds virtio device ID 42 (0x2a), any vendor');
  t.equal(info('license'), 'GPL', 'GPL-2.0 kernel code');
  const release = await pinnedRelease();
  t.equal(info('vermagic').split(' ')[0], release, `built for ${release}, the kernel the test host boots`);
  t.match(info('depends'), /ib_core/, 'it uses the RDMA core');

  const again = await runScript('build.sh');
  t.equal(again.code, 0, 'a second call exits 0');
  t.equal(again.stdout.trim().split('\n').pop(), ko, 'and gives the cached module');
  t.notMatch(again.stderr, /building virtio_rdma\.ko/, 'without building again');
});

t.test('every source file of the module says GPL-2.0', async (t) => {
  const dir = path.join(root, 'guest-driver-spec/linux');
  const sources = readdirSync(dir).filter((f) => /\.(c|h)$|^Kbuild$|^Makefile$/.test(f));
  t.ok(sources.length >= 10, `${sources.length} source files`);
  for (const f of sources) t.match(readFileSync(path.join(dir, f), 'utf8').split('\n')[0], /SPDX-License-Identifier: GPL-2\.0/, f);
  t.match(readFileSync(path.join(dir, 'README.md'), 'utf8'), /GPL-2\.0/, 'README.md states the licence');
});
