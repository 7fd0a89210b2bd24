// Fuzz target: vhost-user messages (VMM side input) through the session state machine (transport/vhost-user/
// session.ts), the way connection.ts hands them over: each message's 12-byte header is decoded and checked
// (checkRequestHeader; a bad header closes the connection), its payload read, then session.handle() decides.
// Messages carry real fds (eventfds, memfds of the size the input asks for, socket ends), so SET_MEM_TABLE,
// ADD_MEM_REG, the inflight area and the back-end channel map and close real objects. The device model is the
// conformance echo device (2 queues), as in the recorded fixtures the seeds come from.
//
// Input: messages one after the other, each = header (12) + payload (header.size bytes) + fd byte
// (count = byte & 3; then one kind byte per fd: 0 eventfd, 1 memfd of (next byte + 1) * 64 KiB, 2 socket end).
// Checked: nothing throws out of handle() (refusals are Outcomes), a reply is well-formed, release() closes every
// fd and mapping (open fds and native mappings do not grow over inputs), the heap stays bounded.
import { VhostUserSession } from '../../../vmm-device/transport/vhost-user/session.ts';
import { HEADER_SIZE, VhostUserProtocolError, checkRequestHeader, decodeHeader } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import * as sys from '../../../vmm-device/native/sys.ts';
import { EchoDevice } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { ByteReader, checkFds, countInput, invariant, quietLogger } from './harness.ts';

const NAME = 'vhost-user';
/** Most messages one input sends (a QEMU start-up is about 40). */
export const MAX_MESSAGES = 64;
/** Memfd sizes come in this unit; at most 256 units (16 MiB) per fd and MAX_MEMFD_BYTES per input. */
const MEMFD_UNIT = 64 << 10;
const MAX_MEMFD_BYTES = 32 << 20;
const host = new SysHost();

export const FD_EVENTFD = 0;
export const FD_MEMFD = 1;
export const FD_SOCKET = 2;

export function fuzz(data: Buffer): void {
  countInput(NAME);
  checkFds(NAME);
  const session = new VhostUserSession({ host, model: new EchoDevice(2), log: quietLogger });
  const r = new ByteReader(data);
  let memfdBytes = 0;
  try {
    for (let i = 0; i < MAX_MESSAGES && r.remaining >= HEADER_SIZE; i++) {
      const h = decodeHeader(r.bytes(HEADER_SIZE));
      try {
        checkRequestHeader(h);
      } catch (e) {
        if (e instanceof VhostUserProtocolError) break; // connection.ts closes the connection here
        throw e;
      }
      const payload = r.bytes(h.size);
      const fds: number[] = [];
      const count = r.u8() & 3;
      for (let f = 0; f < count; f++) {
        const kind = r.u8() % 3;
        if (kind === FD_EVENTFD) fds.push(sys.eventfdCreate());
        else if (kind === FD_MEMFD) {
          const size = (r.u8() + 1) * MEMFD_UNIT;
          if (memfdBytes + size > MAX_MEMFD_BYTES) continue;
          memfdBytes += size;
          fds.push(sys.memfdCreate('fuzz-ram', size));
        } else {
          const [a, b] = sys.socketPair();
          sys.close(b);
          fds.push(a);
        }
      }
      const outcome = session.handle(h, payload, fds);
      if (outcome.reply !== undefined) {
        invariant(outcome.reply.bytes.length >= HEADER_SIZE, `${NAME}: reply shorter than a header`);
        const rh = decodeHeader(outcome.reply.bytes);
        invariant(rh.request === h.request, `${NAME}: reply to ${h.request} names request ${rh.request}`);
        invariant(rh.size === outcome.reply.bytes.length - HEADER_SIZE, `${NAME}: reply size field ${rh.size} != payload`);
        // Reply fds stay the session's (connection.ts sends them and keeps nothing): release() closes them.
      }
      if (outcome.close !== undefined) break;
    }
  } finally {
    session.release();
  }
  const stats = sys.nativeStats();
  invariant(stats.mappings === 0, `${NAME}: ${stats.mappings} guest mappings left after release`);
}
