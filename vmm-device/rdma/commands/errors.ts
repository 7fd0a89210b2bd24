// How a command handler ends other than with a response body.

import type { StatusName } from '../../abi/rdma/index.ts';

/** A command's error: status and detail (section 7.4), thrown by the handlers and answered by the control loop. */
export class CommandError extends Error {
  constructor(
    readonly statusName: StatusName,
    readonly detail: number,
  ) {
    super(`${statusName} detail ${detail}`);
  }
}

/** A request overtaken by a device reset: answered to nobody. */
export class ResetDuringRequest extends Error {}

export function fail(statusName: StatusName, detail = 0): never {
  throw new CommandError(statusName, detail);
}
