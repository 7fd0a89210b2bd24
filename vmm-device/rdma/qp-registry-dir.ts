// The host-local QPN registry: a directory the backends of one host share (one process per VM), used where no etcd
// is (and for this host's own QPNs when there is one: a file read is faster than a round trip).
//
// Layout: DIR/qpn/<host GID hex>/<qpn> holds {"vm", "pid", "peer"?}. One small file per QP, so creating, connecting
// and destroying a QP costs one write (or unlink) whatever the VM's QP count, and a check reads one file. A write is
// a rename of a complete temporary file: a reader sees the old record or the new one, never half of one. A record
// whose pid is no longer alive is stale (the QP died with its backend) and reads as absent; a backend starting
// for a VM removes what an earlier process of the same VM left (`clearVm`).
//
// Why a directory rather than a registry process: nothing to start, supervise or restart, nothing a crash takes
// down with it for the other VMs; the kernel's rename gives the atomicity; the directory is created mode 0700 so only
// the backends' user reads or writes it. A host whose subdirectory exists publishes here; a lookup for a host that
// has none is `unverifiable` (another host: its backends publish through etcd).

import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { GidKey } from './address-resolver.ts';
import type { QpLookup, QpRegistry } from './qp-ownership.ts';

/** A record file is a few dozen bytes; anything larger was not written by a backend and is ignored. */
const MAX_RECORD_BYTES = 1024;

/** Whether process `pid` is alive (signal 0 checks without sending). EPERM: alive, another user's. */
export function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class DirQpRegistry implements QpRegistry {
  readonly root: string;
  private tmpSeq = 0;

  constructor(dir: string) {
    this.root = path.join(dir, 'qpn');
    mkdirSync(this.root, { recursive: true, mode: 0o700 });
  }

  private hostDir(host: GidKey): string {
    if (!/^[0-9a-f]{32}$/.test(host)) throw new RangeError(`not a host GID key: ${host}`);
    return path.join(this.root, host);
  }

  private file(host: GidKey, qpn: number): string {
    return path.join(this.hostDir(host), String(qpn >>> 0));
  }

  private write(host: GidKey, qpn: number, record: object): void {
    const dir = this.hostDir(host);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const tmp = path.join(dir, `.${qpn}.${process.pid}.${this.tmpSeq++}.tmp`);
    writeFileSync(tmp, JSON.stringify({ ...record, pid: process.pid }), { mode: 0o600 });
    renameSync(tmp, this.file(host, qpn));
  }

  created(host: GidKey, qpn: number, vm: string): void {
    this.write(host, qpn, { vm });
  }

  connected(host: GidKey, qpn: number, vm: string, peer: { vm: string; qpn: number }): void {
    this.write(host, qpn, { vm, peer: { vm: peer.vm, qpn: peer.qpn } });
  }

  destroyed(host: GidKey, qpn: number, vm: string): void {
    if (this.read(host, qpn)?.vm !== vm) return; // never remove another VM's record (the QPN was reused)
    try {
      unlinkSync(this.file(host, qpn));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }

  async lookup(host: GidKey, qpn: number): Promise<QpLookup> {
    const rec = this.read(host, qpn);
    if (rec !== undefined) return rec;
    return existsSync(this.hostDir(host)) ? undefined : 'unverifiable';
  }

  /** The record, or undefined when there is none, it is malformed, or its backend is gone. */
  read(host: GidKey, qpn: number): { vm: string; peer?: { vm: string; qpn: number } } | undefined {
    let text: string;
    try {
      text = readFileSync(this.file(host, qpn), 'utf8');
    } catch {
      return undefined;
    }
    if (text.length > MAX_RECORD_BYTES) return undefined;
    let j: unknown;
    try {
      j = JSON.parse(text);
    } catch {
      return undefined;
    }
    const r = j as { vm?: unknown; pid?: unknown; peer?: { vm?: unknown; qpn?: unknown } };
    if (typeof r.vm !== 'string' || typeof r.pid !== 'number' || !pidAlive(r.pid)) return undefined;
    if (r.peer === undefined) return { vm: r.vm };
    if (typeof r.peer.vm !== 'string' || typeof r.peer.qpn !== 'number') return undefined;
    return { vm: r.vm, peer: { vm: r.peer.vm, qpn: r.peer.qpn } };
  }

  /** Marks `host` as publishing here (its lookups answer "no such QP" rather than `unverifiable`). */
  announceHost(host: GidKey): void {
    mkdirSync(this.hostDir(host), { recursive: true, mode: 0o700 });
  }

  /** Removes every record of VM `vm` on `host` (a new backend of the VM: the old one's QPs are gone). */
  clearVm(host: GidKey, vm: string): number {
    let n = 0;
    let names: string[];
    try {
      names = readdirSync(this.hostDir(host));
    } catch {
      return 0;
    }
    for (const name of names) {
      if (!/^\d+$/.test(name)) continue;
      try {
        const j = JSON.parse(readFileSync(path.join(this.hostDir(host), name), 'utf8')) as { vm?: unknown; pid?: unknown };
        if (j.vm === vm && j.pid !== process.pid) {
          rmSync(path.join(this.hostDir(host), name), { force: true });
          n++;
        }
      } catch {
        // a record another backend is replacing right now, or garbage: not ours to judge
      }
    }
    return n;
  }
}
