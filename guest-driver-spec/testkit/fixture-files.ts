// Where the recorded virtqueue fixtures of this repository are, and loading them (for tests and tools).

import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseFixture, type Fixture } from './fixture-format.ts';

export const FIXTURE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'fixtures', 'virtqueue');

/** Fewest fixtures the suite must hold (issue 2). */
export const MIN_FIXTURES = 40;

export function fixtureFiles(): string[] {
  return readdirSync(FIXTURE_DIR)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => join(FIXTURE_DIR, f));
}

export function loadFixture(path: string): Fixture {
  return parseFixture(JSON.parse(readFileSync(path, 'utf8')));
}
