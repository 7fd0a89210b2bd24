// Errors the reference driver raises. A device's answer that breaks the spec is a ProtocolError (the driver never
// guesses what the device meant); a well-formed error status is a CommandError with the status and detail named.

import { Command, EventType, ResourceKind, Status, WcStatus } from '../../vmm-device/abi/rdma/index.ts';

function nameOf(table: Readonly<Record<string, number>>, value: number): string {
  for (const [k, v] of Object.entries(table)) if (v === value) return k;
  return `unknown(${value})`;
}

export const commandName = (code: number): string => nameOf(Command, code);
export const statusName = (code: number): string => nameOf(Status, code);
export const eventTypeName = (code: number): string => nameOf(EventType, code);
export const resourceKindName = (code: number): string => nameOf(ResourceKind, code);
export const wcStatusName = (code: number): string => nameOf(WcStatus, code);

/** The device answered a control request with a status other than OK. */
export class CommandError extends Error {
  readonly commandName: string;
  readonly statusName: string;

  constructor(
    readonly command: number,
    readonly status: number,
    readonly detail: number,
  ) {
    const s = statusName(status);
    const d = status === Status.NO_RESOURCES || status === Status.BUSY ? `${detail} (${resourceKindName(detail)})` : String(detail);
    super(`${commandName(command)}: ${s}, detail ${d}`);
    this.name = 'CommandError';
    this.commandName = commandName(command);
    this.statusName = s;
  }
}

/** The device did something the spec does not allow (a wrong used length, a foreign tag, a bad event). */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

/** The device did not answer in time, or set DEVICE_NEEDS_RESET. */
export class DeviceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DeviceError';
  }
}

/** The caller asked for something the driver will not send (a spec rule the driver enforces on itself). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}
