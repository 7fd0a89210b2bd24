// The control commands as one table: command code -> handler, gathered from the groups by object.

import type { CommandHandler } from './context.ts';
import { ahCommands } from './ah.ts';
import { cqCommands } from './cq.ts';
import { mrCommands } from './mr.ts';
import { pdCommands } from './pd.ts';
import { qpCommands } from './qp.ts';
import { queryCommands } from './query.ts';

export const COMMAND_HANDLERS: ReadonlyMap<number, CommandHandler> = new Map(
  [queryCommands, pdCommands, cqCommands, qpCommands, mrCommands, ahCommands].flatMap((g) => Object.entries(g).map(([code, h]) => [Number(code), h] as const)),
);

export { CommandError, ResetDuringRequest, fail } from './errors.ts';
export { HOST_PORT, type CommandContext, type CommandHandler } from './context.ts';
export { releaseMr, mrStillMapped } from './mr.ts';
