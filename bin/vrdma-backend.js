#!/usr/bin/env node
// The package's `vrdma-backend` command, runnable with plain node: registers tsx's ESM loader (the project ships
// TypeScript sources) and runs vmm-device/cli/main.ts.
import { register } from 'tsx/esm/api';

register();
const { run } = await import('../vmm-device/cli/main.ts');
process.exitCode = await run(process.argv.slice(2));
