// Bundles one fuzz target into two CommonJS files that Jazzer.js 2.1 loads through require (it has no TypeScript or
// ES-module loader of its own, and instruments only what require loads):
//   <out>.product.cjs  the project's code under vmm-device/ that the target reaches: instrumented (run.sh passes
//                      --includes .product.cjs), so coverage feedback and comparison hooks are about the device;
//   <out>              the target, harness and test kit (driver side: rings, encoders, guest memory allocator) and
//                      FakeVerbs (the host the device runs over: not under test), which
//                      reach vmm-device/ only through the product file: not instrumented. The kit is not what is
//                      under test, and instrumenting it cost most of each input (every comparison a native call).
// Packages stay external (loaded from node_modules, never instrumented). One module graph: the kit's GuestMemory
// is the product's GuestMemory (the harness patches its prototype), so both files share every class and state.
// Usage: node bundle.mjs <target> <out.cjs>
import { build } from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const product = path.join(root, 'vmm-device') + path.sep;
const [name, out] = process.argv.slice(2);
if (!name || !out) throw new Error('usage: node bundle.mjs <target> <out.cjs>');
const entry = path.join(root, 'test/fuzz/targets', `${name}.ts`);
const productOut = out.replace(/\.cjs$/, '') + '.product.cjs';

const common = {
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
};

// Which product files the target's side imports directly (the product bundle exports exactly those, by path).
const boundary = new Set();
/** Under vmm-device/ but the fuzz set-up's host, not under test: FakeVerbs stands in for the RNIC. */
const HOST_DOUBLES = ['verbs/fake-verbs.ts'].map((f) => path.join(product, f));
const isProduct = (file) => file.startsWith(product) && !HOST_DOUBLES.includes(file);
const INNER = Symbol('inner');
/** esbuild's own resolution of a relative import (the plugin's callback stands aside for this inner call). */
const resolve = async (b, args) => {
  const r = await b.resolve(args.path, { resolveDir: args.resolveDir, kind: args.kind, importer: args.importer, pluginData: INNER });
  return r.errors.length === 0 ? r.path : undefined;
};
await build({
  ...common,
  entryPoints: [entry],
  write: false,
  plugins: [
    {
      name: 'find-boundary',
      setup(b) {
        b.onResolve({ filter: /^\./ }, async (args) => {
          if (args.pluginData === INNER) return undefined;
          const file = await resolve(b, args);
          if (file !== undefined && isProduct(file) && !isProduct(args.importer)) boundary.add(file);
          return undefined;
        });
      },
    },
  ],
});
const files = [...boundary].sort();
const key = (file) => `m${files.indexOf(file)}`;

const built = await build({
  ...common,
  metafile: true,
  stdin: {
    contents: files.map((f) => `export * as ${key(f)} from ${JSON.stringify(f)};`).join('\n'),
    resolveDir: root,
    sourcefile: 'fuzz-product-entry.js',
    loader: 'js',
  },
  outfile: productOut,
});
// The product file must hold product code only: a kit module bundled on both sides would exist twice.
const strays = Object.keys(built.metafile.inputs).filter((f) => !isProduct(path.resolve(root, f)) && !f.includes('fuzz-product-entry'));
if (strays.length > 0) throw new Error(`product bundle of ${name} pulled in non-product files: ${strays.join(', ')}`);

const productRequire = `./${path.basename(productOut)}`;
await build({
  ...common,
  entryPoints: [entry],
  outfile: out,
  plugins: [
    {
      name: 'product-external',
      setup(b) {
        b.onResolve({ filter: /^\./ }, async (args) => {
          if (args.pluginData === INNER) return undefined;
          if (args.path === productRequire) return { path: productRequire, external: true };
          const file = await resolve(b, args);
          if (file !== undefined && boundary.has(file)) return { path: file, namespace: 'product' };
          return undefined;
        });
        b.onLoad({ filter: /.*/, namespace: 'product' }, (args) => ({
          contents: `module.exports = require(${JSON.stringify(productRequire)}).${key(args.path)};`,
          loader: 'js',
          resolveDir: path.dirname(out),
        }));
      },
    },
  ],
});
