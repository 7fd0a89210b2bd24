// The control queue (spec sections 7, 8): requests run one at a time in an async loop, framing checked (7.2), the
// command's handler looked up in the table (commands/index.ts), the status and body written back. A request that a
// reset overtakes is answered to nobody.

import { COMMANDS, CtrlRequestHeader, CtrlResponseHeader, FeatureBit, Limits, MAPPED_RESPONSES, Status, checkRequestFraming, type StatusName } from '../abi/rdma/index.ts';
import type { Logger } from '../util/log.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import { COMMAND_HANDLERS, CommandError, ResetDuringRequest, type CommandContext } from './commands/index.ts';

/** Fixed body of the largest command (CREATE_QP, MODIFY_QP are 64/72 bytes) plus its page list: the most read. */
const LARGEST_FIXED_BODY = 72;

export interface ControlHost {
  readonly isActive: boolean;
  readonly generation: number;
  readonly maxPagesPerCommand: number;
  readonly commands: CommandContext;
  queue(index: number): DeviceQueue | undefined;
  popChain(index: number): DescriptorChain | null;
  pushUsed(index: number, chain: DescriptorChain, len: number): void;
  fatal(queue: number, why: string): void;
  /** Host releases still running (a previous activation's objects): awaited before serving. */
  settled(): Promise<void>;
  readonly releasing: boolean;
  readonly counters: { commands: Record<string, number>; errors: Record<string, number>; hostErrors: number };
  readonly log: Logger;
  /** Runs a promise the event loop continues: a rejection is the device's failure (NEEDS_RESET), never unhandled. */
  background(what: string, p: Promise<unknown>): void;
}

export class ControlQueue {
  private running = false;
  /** The command handler now in the host (settled, never rejecting): a reset's release waits for it (idle()). */
  private current: Promise<unknown> | undefined;

  constructor(
    private readonly host: ControlHost,
    private readonly index: number,
  ) {}

  /**
   * Resolves when the command being served (if any) has left its handler: by then a command a reset overtook has
   * handed its host object to its undo (checkGeneration), so the reset can release parents after children.
   */
  idle(): Promise<void> {
    return this.current === undefined ? Promise.resolve() : this.current.then(() => undefined);
  }

  /** Serves requests until the queue is empty; a second call while it runs does nothing (one at a time, 7.3). */
  async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    const h = this.host;
    const gen = h.generation;
    try {
      if (h.releasing) await h.settled(); // a previous VM's objects are gone before we serve
      for (;;) {
        if (gen !== h.generation || !h.isActive) return;
        const q = h.queue(this.index)!;
        q.disableNotifications();
        const chain = h.popChain(this.index);
        if (chain === null) {
          if (!h.isActive || !q.enableNotifications()) return;
          continue;
        }
        await this.serve(chain, gen);
      }
    } finally {
      this.running = false;
      // A kick that came while this loop was finishing a request of an old activation.
      if (gen !== h.generation && h.isActive) h.background('control queue', this.run());
    }
  }

  private async serve(chain: DescriptorChain, gen: number): Promise<void> {
    const h = this.host;
    const readable = chain.readableBytes;
    if (readable < CtrlRequestHeader.size || chain.writableBytes < CtrlResponseHeader.size) {
      h.fatal(this.index, `control request with ${readable} readable and ${chain.writableBytes} writable bytes (spec 7.2 check 1)`);
      return;
    }
    const maxPages = h.maxPagesPerCommand;
    const maxRequest = CtrlRequestHeader.size + LARGEST_FIXED_BODY + Limits.PAGE_ADDR_SIZE * maxPages;
    const bytes = chain.reader().read(Math.min(readable, maxRequest)); // the one read of the request
    const header = CtrlRequestHeader.decode(bytes);
    let framing = checkRequestFraming(bytes.subarray(0, Math.min(bytes.length, CtrlRequestHeader.size + header.length)), chain.writableBytes, maxPages);
    if (framing.kind === 'status' && framing.statusName === 'INVALID_LENGTH' && framing.detail === 0 && readable > bytes.length) {
      // The request is longer than anything valid: read no further. Its page count decides between check 4's
      // INVALID_ARGUMENT and INVALID_LENGTH exactly as if the whole request had been read.
      framing = this.frameOversized(bytes, header, readable, chain.writableBytes);
    }
    if (framing.kind === 'fatal') {
      h.fatal(this.index, framing.reason);
      return;
    }
    // Check 5 with the negotiated response sizes (spec 13.3: CREATE_CQ and CREATE_QP grow with HOST_QUEUE_MAPPING).
    const mapped = framing.kind === 'ok' && h.commands.hasFeature(FeatureBit.HOST_QUEUE_MAPPING) ? MAPPED_RESPONSES.get(framing.spec.code) : undefined;
    if (framing.kind === 'ok' && mapped !== undefined && chain.writableBytes < CtrlResponseHeader.size + mapped.size) {
      framing = { kind: 'status', header: framing.header, status: Status.INVALID_LENGTH, statusName: 'INVALID_LENGTH', detail: 1 };
    }
    const name = COMMANDS.get(header.command)?.name ?? `0x${header.command.toString(16)}`;
    h.counters.commands[name] = (h.counters.commands[name] ?? 0) + 1;
    let status: StatusName = 'OK';
    let detail = 0;
    let body: Uint8Array = new Uint8Array(0);
    if (framing.kind === 'status') {
      status = framing.statusName;
      detail = framing.detail;
    } else {
      try {
        const handler = COMMAND_HANDLERS.get(framing.spec.code);
        if (handler === undefined) throw new CommandError('INVALID_COMMAND', 0);
        const running = Promise.resolve(handler(h.commands, framing.body));
        const settled = running.then(
          () => undefined,
          () => undefined,
        );
        this.current = settled;
        try {
          body = await running;
        } finally {
          if (this.current === settled) this.current = undefined;
        }
      } catch (e) {
        if (e instanceof ResetDuringRequest || gen !== h.generation) return;
        if (e instanceof CommandError) {
          status = e.statusName;
          detail = e.detail;
        } else {
          status = 'DEVICE_ERROR';
          detail = 0;
          h.counters.hostErrors++;
          h.log.log('error', 'control request failed inside the device', { command: name, error: (e as Error).message });
        }
      }
    }
    if (gen !== h.generation || !h.isActive) return; // reset meanwhile: write nothing into guest memory
    if (status !== 'OK') {
      const key = `${name}:${status}`;
      h.counters.errors[key] = (h.counters.errors[key] ?? 0) + 1;
      h.log.log('debug', 'control request refused', { command: name, status, detail });
      body = new Uint8Array(0);
    }
    const out = new Uint8Array(CtrlResponseHeader.size + body.length);
    CtrlResponseHeader.encode({ status: Status[status], detail, tag: header.tag }, out, 0);
    out.set(body, CtrlResponseHeader.size);
    chain.writer().write(out);
    h.pushUsed(this.index, chain, out.length);
  }

  private frameOversized(
    bytes: Uint8Array,
    header: { command: number; length: number; tag: bigint },
    readable: number,
    writable: number,
  ): ReturnType<typeof checkRequestFraming> {
    const spec = COMMANDS.get(header.command)!;
    const base = { kind: 'status' as const, header };
    if (header.length > readable - CtrlRequestHeader.size) return { ...base, status: Status.INVALID_LENGTH, statusName: 'INVALID_LENGTH', detail: 0 };
    // Frame the fixed body alone, with the length the guest claimed: the checks then agree with the full request.
    const fixed = bytes.slice(0, CtrlRequestHeader.size + spec.request.size);
    CtrlRequestHeader.encode({ ...header, length: spec.request.size }, fixed, 0);
    const r = checkRequestFraming(fixed, writable, this.host.maxPagesPerCommand);
    if (r.kind === 'status' && r.statusName === 'INVALID_ARGUMENT') return r;
    return { ...base, status: Status.INVALID_LENGTH, statusName: 'INVALID_LENGTH', detail: 0 };
  }
}
