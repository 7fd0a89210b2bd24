// Loads the native addon (native/, built by `npm install`). Its two parts are typed by their own wrappers:
// vmm-device/native/sys.ts (fds, sockets, mmap, eventfd, poll), vmm-device/verbs/ (libibverbs) and
// vmm-device/native/vfio-user.ts (libvfio-user).
// Nothing outside those wrappers touches the raw addon.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const ADDON_PATH = path.resolve(here, '../../native/build/Release/vrdma_native.node');

export interface RawAddon {
  sys: Record<string, unknown>;
  verbs: Record<string, unknown>;
  /** libvfio-user server contexts (vfio-user.ts). */
  vfioUser: Record<string, unknown>;
}

let cached: RawAddon | undefined;

/** The raw addon; throws a message saying how to build it when it is missing. */
export function loadAddon(): RawAddon {
  if (cached !== undefined) return cached;
  const require = createRequire(import.meta.url);
  try {
    cached = require(ADDON_PATH) as RawAddon;
  } catch (e) {
    throw new Error(
      `the native addon is not built (${ADDON_PATH}): run \`npm install\` (or scripts/setup.sh as root) ` +
        `in the project folder. Cause: ${(e as Error).message}`,
    );
  }
  return cached;
}
