// Bundles one fuzz target (test/fuzz/targets/<name>.ts and the project code it imports) into a CommonJS file that
// Jazzer.js 2.1 instruments while loading it (its hook instruments files loaded through require; it has no
// TypeScript or ES-module loader of its own). Packages stay external (loaded from node_modules, not instrumented):
// coverage feedback is about our code, not zod's or pino's. Usage: node bundle.mjs <name> <out.cjs>
import { build } from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const [name, out] = process.argv.slice(2);
if (!name || !out) throw new Error('usage: node bundle.mjs <target> <out.cjs>');
await build({
  entryPoints: [path.join(root, 'test/fuzz/targets', `${name}.ts`)],
  outfile: out,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  packages: 'external',
  sourcemap: 'inline',
  logLevel: 'warning',
  // import.meta.url in bundled modules (the native loader finds the addon relative to itself) keeps its meaning.
  define: { 'import.meta.url': '__fuzz_import_meta_url' },
  banner: { js: `const __fuzz_import_meta_url = require('node:url').pathToFileURL(__filename).href;` },
});
