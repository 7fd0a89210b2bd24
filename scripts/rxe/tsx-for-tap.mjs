// Preloaded into every node process of the soft-RoCE test host (guest.sh puts it in NODE_OPTIONS); it acts only
// in tap's test processes (tap gives them TAP_CHILD_ID). There it has TypeScript transpiled by tsx (esbuild, a
// native binary) instead of ts-node, which @tapjs/typescript loads by default: under TCG, ts-node took 7 to 10
// minutes to run a one-line .ts file (it loads and runs the whole TypeScript compiler), tsx about 40 s on a busy
// machine. Setting TAP_TYPE_STRIP_ONLY=1 before @tapjs/typescript's own --import hook runs makes that hook skip
// ts-node (the hook reads only this variable). VRDMA_RXE_TS_NODE=1 keeps ts-node (e.g. to type-check in tests).
if (process.env.TAP_CHILD_ID !== undefined && process.env.VRDMA_RXE_TS_NODE !== '1') {
  process.env.TAP_TYPE_STRIP_ONLY = '1';
  await import('tsx/esm');
}
