// Where a doorbell's time goes, from the kernel's scheduler statistics of this process's threads (Linux
// /proc/self/task/<tid>/schedstat: ns on a CPU, ns runnable but waiting for one, and status's context switches).
// A doorbell executed late because its thread waited for a CPU shows as run-queue wait of the `vrdma-doorbell`
// threads (the engines) or of the main thread (the guest loop); time on a CPU is the thread's own work (and spin).

import fs from 'node:fs';

export interface ThreadTimes {
  /** Threads summed. */
  threads: number;
  runNs: number;
  waitNs: number;
  voluntary: number;
  involuntary: number;
}

const ZERO: ThreadTimes = { threads: 0, runNs: 0, waitNs: 0, voluntary: 0, involuntary: 0 };

function one(tid: string): ThreadTimes | undefined {
  try {
    const [run, wait] = fs.readFileSync(`/proc/self/task/${tid}/schedstat`, 'utf8').trim().split(/\s+/).map(Number);
    const status = fs.readFileSync(`/proc/self/task/${tid}/status`, 'utf8');
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
    return { threads: 1, runNs: run ?? 0, waitNs: wait ?? 0, voluntary: field('voluntary_ctxt_switches'), involuntary: field('nonvoluntary_ctxt_switches') };
  } catch {
    return undefined; // the thread ended meanwhile
  }
}

/** The sum over this process's threads named `comm` ('main' = the main thread, whose tid is the pid). */
export function threadTimes(comm: string): ThreadTimes {
  const tids = comm === 'main' ? [String(process.pid)] : fs.readdirSync('/proc/self/task').filter((tid) => {
    try {
      return fs.readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim() === comm;
    } catch {
      return false;
    }
  });
  const sum = { ...ZERO };
  for (const tid of tids) {
    const t = one(tid);
    if (t === undefined) continue;
    sum.threads += t.threads;
    sum.runNs += t.runNs;
    sum.waitNs += t.waitNs;
    sum.voluntary += t.voluntary;
    sum.involuntary += t.involuntary;
  }
  return sum;
}

/** What the main thread and the engines did between two snapshots, per `per` events (us and counts). */
export interface SchedSplit {
  engineRunUs: number;
  engineWaitUs: number;
  engineInvoluntary: number;
  mainRunUs: number;
  mainWaitUs: number;
  mainInvoluntary: number;
}

export function snapshot(): { engine: ThreadTimes; main: ThreadTimes } {
  return { engine: threadTimes('vrdma-doorbell'), main: threadTimes('main') };
}

export function splitSince(before: { engine: ThreadTimes; main: ThreadTimes }, per: number): SchedSplit {
  const now = snapshot();
  const r = (x: number) => Math.round((x / per) * 100) / 100;
  return {
    engineRunUs: r((now.engine.runNs - before.engine.runNs) / 1000),
    engineWaitUs: r((now.engine.waitNs - before.engine.waitNs) / 1000),
    engineInvoluntary: r(now.engine.involuntary - before.engine.involuntary),
    mainRunUs: r((now.main.runNs - before.main.runNs) / 1000),
    mainWaitUs: r((now.main.waitNs - before.main.waitNs) / 1000),
    mainInvoluntary: r(now.main.involuntary - before.main.involuntary),
  };
}

export function describeSplit(s: SchedSplit): string {
  return `engines on CPU ${s.engineRunUs} us, waiting for a CPU ${s.engineWaitUs} us (${s.engineInvoluntary} preemptions); guest loop on CPU ${s.mainRunUs} us, waiting ${s.mainWaitUs} us (${s.mainInvoluntary} preemptions)`;
}
