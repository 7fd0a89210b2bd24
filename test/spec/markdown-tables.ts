// Reads the tables of guest-driver-spec/virtio-rdma.md that carry a marker comment:
//   <!-- layout: Name -->     a structure: columns Offset | Size | Type | Field | Meaning
//   <!-- constants: Name -->  a set of numbers: columns Value | Name | ...
//   <!-- transitions -->      the QP transition table
// The parser is strict on purpose: a marker without a well-formed table right after it is an error, so a table
// that someone breaks while editing the spec fails the test instead of silently dropping out of the comparison.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const SPEC_PATH = fileURLToPath(new URL('../../guest-driver-spec/virtio-rdma.md', import.meta.url));

export function readSpec(): string {
  return readFileSync(SPEC_PATH, 'utf8');
}

export interface MarkedTable {
  kind: 'layout' | 'constants' | 'transitions';
  name: string;
  /** 1-based line number of the marker, for messages. */
  line: number;
  header: string[];
  rows: string[][];
}

function cells(line: string): string[] {
  const trimmed = line.trim();
  if (!trimmed.startsWith('|') || !trimmed.endsWith('|')) throw new Error(`not a table row: ${line}`);
  return trimmed
    .slice(1, -1)
    .split('|')
    .map((c) => c.trim());
}

const MARKER = /^<!--\s*(layout|constants|transitions)(?::\s*(\w+))?\s*-->$/;

export function markedTables(markdown: string): MarkedTable[] {
  const lines = markdown.split('\n');
  const tables: MarkedTable[] = [];
  for (let i = 0; i < lines.length; i++) {
    const m = MARKER.exec(lines[i]!.trim());
    if (m === null) continue;
    const kind = m[1] as MarkedTable['kind'];
    const name = m[2] ?? kind;
    const headerLine = lines[i + 1];
    const separator = lines[i + 2];
    if (headerLine === undefined || separator === undefined || !/^\|[\s\-:|]+\|$/.test(separator.trim())) {
      throw new Error(`line ${i + 1}: marker ${name} is not followed by a table header and separator`);
    }
    const header = cells(headerLine);
    const rows: string[][] = [];
    for (let j = i + 3; j < lines.length && lines[j]!.trim().startsWith('|'); j++) {
      const row = cells(lines[j]!);
      if (row.length !== header.length) {
        throw new Error(`line ${j + 1}: ${row.length} cells in a ${header.length}-column table (${name})`);
      }
      rows.push(row);
    }
    if (rows.length === 0) throw new Error(`line ${i + 1}: table ${name} has no rows`);
    tables.push({ kind, name, line: i + 1, header, rows });
  }
  return tables;
}

/** A number cell: decimal or 0x hex, nothing else. */
export function parseNumber(cell: string): number {
  if (!/^(0x[0-9a-fA-F]+|[0-9]+)$/.test(cell)) throw new Error(`not a number: "${cell}"`);
  return Number(cell);
}
