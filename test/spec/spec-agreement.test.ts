// The spec (guest-driver-spec/virtio-rdma.md) and the layout module (vmm-device/abi/rdma/) must say the same
// thing: every marked table of the spec is compared with the module, row by row, in both directions.

import t from 'tap';
import * as L from '../../vmm-device/abi/rdma/index.ts';
import type { FieldDef, Layout } from '../../vmm-device/abi/rdma/index.ts';
import { markedTables, parseNumber, readSpec, type MarkedTable } from './markdown-tables.ts';

const spec = readSpec();
const tables = markedTables(spec);

/** The constants tables the spec must have, and the module object each one mirrors. */
const CONSTANT_SETS: Record<string, Readonly<Record<string, number>>> = {
  FeatureBit: L.FeatureBit,
  Command: L.Command,
  Status: L.Status,
  ResourceKind: L.ResourceKind,
  EventType: L.EventType,
  QpFatalReason: L.QpFatalReason,
  CqErrorReason: L.CqErrorReason,
  PolicyReason: L.PolicyReason,
  DoorbellErrorReason: L.DoorbellErrorReason,
  DoorbellType: L.DoorbellType,
  QpType: L.QpType,
  QpState: L.QpState,
  QpAttrMask: L.QpAttrMask,
  AccessFlag: L.AccessFlag,
  Mtu: L.Mtu,
  PortState: L.PortState,
  LinkLayer: L.LinkLayer,
  GidType: L.GidType,
  AtomicCap: L.AtomicCap,
  SendOpcode: L.SendOpcode,
  SendFlag: L.SendFlag,
  WcOpcode: L.WcOpcode,
  WcStatus: L.WcStatus,
  WcFlag: L.WcFlag,
  Limits: L.Limits,
  HostQueueFormat: L.HostQueueFormat,
  DoorbellMode: L.DoorbellMode,
  MapFlag: L.MapFlag,
};

/** How the spec's Type column spells a field. */
function specType(f: FieldDef): string {
  switch (f.type) {
    case 'bytes':
      return f.ref === undefined ? `u8[${f.size}]` : `struct ${f.ref}`;
    case 'reserved':
      return `u8[${f.size}]`;
    default:
      return f.type;
  }
}

function columnIndex(table: MarkedTable, name: string): number {
  const i = table.header.indexOf(name);
  if (i < 0) throw new Error(`table ${table.name} (line ${table.line}) has no column ${name}`);
  return i;
}

t.test('the spec has at least the tables this test knows, each once', async (t) => {
  const seen = new Map<string, number>();
  for (const tb of tables) {
    const key = `${tb.kind}:${tb.name}`;
    seen.set(key, (seen.get(key) ?? 0) + 1);
  }
  for (const [key, n] of seen) t.equal(n, 1, `${key} appears once`);
  t.ok(seen.has('transitions:transitions'), 'the QP transition table is marked');
});

t.test('every structure of the module has a table in the spec, and every table a structure', async (t) => {
  const specLayouts = new Set(tables.filter((tb) => tb.kind === 'layout').map((tb) => tb.name));
  const moduleLayouts = new Set(L.ALL_LAYOUTS.keys());
  t.same([...moduleLayouts].filter((n) => !specLayouts.has(n)), [], 'structures without a spec table');
  t.same([...specLayouts].filter((n) => !moduleLayouts.has(n)), [], 'spec tables without a structure');
});

for (const table of tables.filter((tb) => tb.kind === 'layout')) {
  t.test(`layout ${table.name}: spec table (line ${table.line}) = module declaration`, async (t) => {
    const layout: Layout<unknown> | undefined = L.ALL_LAYOUTS.get(table.name);
    if (layout === undefined) {
      t.fail(`no structure ${table.name} in the module`);
      return;
    }
    t.same(table.header, ['Offset', 'Size', 'Type', 'Field', 'Meaning'], 'columns');
    t.equal(table.rows.length, layout.fields.length, 'one row per field');
    table.rows.forEach((row, i) => {
      const f = layout.fields[i];
      if (f === undefined) return;
      const [offset, size, type, field] = row as [string, string, string, string];
      t.equal(parseNumber(offset), f.offset, `row ${i} (${field}): offset`);
      t.equal(parseNumber(size), f.size, `row ${i} (${field}): size`);
      t.equal(type, specType(f), `row ${i} (${field}): type`);
      t.equal(field, f.name, `row ${i}: field name`);
    });
    const last = table.rows.at(-1)!;
    t.equal(parseNumber(last[0]!) + parseNumber(last[1]!), layout.size, 'the last row ends at the structure size');
  });
}

t.test('every constants set of the module has a table in the spec, and every table a set', async (t) => {
  const specSets = new Set(tables.filter((tb) => tb.kind === 'constants').map((tb) => tb.name));
  t.same(Object.keys(CONSTANT_SETS).filter((n) => !specSets.has(n)), [], 'sets without a spec table');
  t.same([...specSets].filter((n) => !(n in CONSTANT_SETS)), [], 'spec tables this test does not map');
});

for (const table of tables.filter((tb) => tb.kind === 'constants')) {
  t.test(`constants ${table.name}: spec table (line ${table.line}) = module`, async (t) => {
    const set = CONSTANT_SETS[table.name];
    if (set === undefined) {
      t.fail(`no constants ${table.name} in the module`);
      return;
    }
    const valueCol = columnIndex(table, 'Value');
    const nameCol = columnIndex(table, 'Name');
    const fromSpec: Record<string, number> = {};
    for (const row of table.rows) {
      const name = row[nameCol]!;
      t.notOk(name in fromSpec, `${name} listed once`);
      fromSpec[name] = parseNumber(row[valueCol]!);
    }
    t.same(fromSpec, { ...set }, 'same names with the same values');
  });
}

t.test('command table: request, response and page-list columns = COMMANDS', async (t) => {
  const table = tables.find((tb) => tb.kind === 'constants' && tb.name === 'Command')!;
  const [value, name, request, response, pageList] = ['Value', 'Name', 'Request body', 'Response body', 'Page list'].map(
    (c) => columnIndex(table, c),
  ) as [number, number, number, number, number];
  t.equal(table.rows.length, L.COMMANDS.size, 'one row per command');
  for (const row of table.rows) {
    const spec = L.COMMANDS.get(parseNumber(row[value]!));
    if (spec === undefined) {
      t.fail(`command ${row[value]} is not in COMMANDS`);
      continue;
    }
    t.equal(row[name], spec.name, `${spec.name}: name`);
    t.equal(row[request], spec.request.name, `${spec.name}: request body`);
    t.equal(row[response], spec.response.name, `${spec.name}: response body`);
    t.equal(row[pageList], spec.pageList ? 'yes' : 'no', `${spec.name}: page list`);
  }
});

t.test('QP transition table = REQUIRED_QP_ATTRS and OPTIONAL_QP_ATTRS', async (t) => {
  const table = tables.find((tb) => tb.kind === 'transitions')!;
  t.same(table.header, ['QP type', 'From', 'To', 'Required', 'Optional']);
  const mask = (cell: string): number =>
    cell === ''
      ? 0
      : cell
          .split(',')
          .map((s) => s.trim())
          .reduce((m, bit) => {
            const v = (L.QpAttrMask as Record<string, number>)[bit];
            if (v === undefined) throw new Error(`unknown attribute ${bit}`);
            return m | v;
          }, 0);
  const required: Record<string, number> = {};
  const optional: Record<string, number> = {};
  for (const [type, from, to, req, opt] of table.rows as [string, string, string, string, string][]) {
    const key = L.transitionKey(
      (L.QpType as Record<string, number>)[type]!,
      (L.QpState as Record<string, number>)[from]!,
      (L.QpState as Record<string, number>)[to]!,
    );
    required[key] = mask(req);
    if (opt !== '') optional[key] = mask(opt);
  }
  t.same(required, { ...L.REQUIRED_QP_ATTRS }, 'required attributes');
  t.same(optional, { ...L.OPTIONAL_QP_ATTRS }, 'optional attributes');
});

t.test('prose numbers that the tables do not carry', async (t) => {
  t.match(spec, /## 2\. Device ID\s+42 /, 'section 2 gives device ID 42');
  t.equal(L.VIRTIO_ID_RDMA, 42);
  // Section 3's queue table.
  t.match(spec, new RegExp(`\\| ${L.Queue.CONTROLQ} \\| controlq \\|`), 'controlq index');
  t.match(spec, new RegExp(`\\| ${L.Queue.EVENTQ} \\| eventq \\|`), 'eventq index');
  t.match(spec, new RegExp(`\\| ${L.Queue.DOORBELLQ_FIRST} \\.\\. ${L.Queue.DOORBELLQ_FIRST} \\+ N - 1 \\| doorbellq0`), 'doorbell queues');
  // Page-list entry offsets named in the error lists ("offset 64 + 8i") are the fixed request sizes.
  const entryBases = new Set([...spec.matchAll(/offset (\d+) \+ 8i/g)].map((m) => Number(m[1])));
  const pageListSizes = new Set([...L.COMMANDS.values()].filter((c) => c.pageList).map((c) => c.request.size));
  t.same([...entryBases].sort(), [...pageListSizes].sort(), 'page entry offsets in the prose = fixed request sizes');
  // MODIFY_QP's DESTINATION_UNREACHABLE detail is the dgid's body offset.
  const dgidOffset = L.ModifyQpRequest.offsetOf('attr') + L.QpAttr.offsetOf('dgid');
  t.match(spec, new RegExp(`DESTINATION_UNREACHABLE, offset ${dgidOffset}`), 'MODIFY_QP dgid detail offset');
  // Sizes quoted in prose.
  t.match(spec, new RegExp(`configuration space is ${L.DeviceConfig.size} bytes`));
  t.match(spec, new RegExp(`used length of ${L.Event.size}`));
  t.match(spec, new RegExp(`Send WQEs are ${L.SendWqe.size} bytes, receive WQEs ${L.RecvWqe.size}, completions ${L.Cqe.size}`));
  // Reserved command range.
  t.match(spec, /Numbers 0x100 to 0x1ff are kept/);
  t.equal(L.RESERVED_COMMAND_RANGE.first, 0x100);
  t.equal(L.RESERVED_COMMAND_RANGE.last, 0x1ff);
});

t.test('every requirements subsection named in the conformance section exists', async (t) => {
  const conformance = spec.slice(spec.indexOf('## 14. Conformance'), spec.indexOf('## 15.'));
  // The two sentences that list the subsections: "... every "Driver requirements" subsection: 3.1, 4.1, ...".
  const lists = [...conformance.matchAll(/requirements" subsection: ([\d., and\s]+)/g)].map((m) => m[1]!);
  t.equal(lists.length, 2, 'one list for drivers, one for devices');
  const named = lists.flatMap((l) => [...l.matchAll(/\b(\d+\.\d+)\b/g)].map((m) => m[1]!));
  t.ok(named.length >= 18, 'the conformance section names the requirement subsections');
  for (const n of new Set(named)) {
    t.match(spec, new RegExp(`^### ${n.replace('.', '\\.')} (Driver|Device) requirements`, 'm'), `${n} is a requirements subsection`);
  }
  const all = [...spec.matchAll(/^### (\d+\.\d+) (Driver|Device) requirements/gm)].map((m) => m[1]!);
  t.same(all.filter((n) => !named.includes(n)), [], 'every requirements subsection is named in section 14');
});

t.test('normative key words appear only in requirements subsections and section 14', async (t) => {
  const lines = spec.split('\n');
  let normative = false;
  const offenders: string[] = [];
  lines.forEach((line, i) => {
    if (line.startsWith('## ')) normative = line.startsWith('## 14.');
    if (line.startsWith('### ')) normative = /requirements/.test(line) || line.startsWith('### 14');
    if (/\b(MUST|SHOULD|MAY)\b/.test(line) && !normative && !line.startsWith('- The key words')) offenders.push(`${i + 1}: ${line}`);
  });
  t.same(offenders, [], 'no MUST/SHOULD/MAY outside normative text');
});

t.test('every "offset N" in a command section of chapter 8 is the offset of a field of that command', async (t) => {
  // The request layouts whose field offsets each section's error list may name.
  const sections: Record<string, readonly Layout<unknown>[]> = {
    '8.4': [L.QueryPortRequest],
    '8.5': [L.QueryGidRequest],
    '8.6': [L.HandleRequest],
    '8.7': [L.CreateCqRequest],
    '8.8': [L.HandleRequest],
    '8.9': [L.ArmCqRequest],
    '8.10': [L.CreateQpRequest],
    '8.11': [L.ModifyQpRequest],
    '8.12': [L.HandleRequest],
    '8.13': [L.HandleRequest],
    '8.14': [L.RegMrRequest, L.RegMrContinueRequest],
    '8.15': [L.HandleRequest],
    '8.16': [L.CreateAhRequest, L.HandleRequest],
  };
  const offsetsOf = (layout: Layout<unknown>): number[] =>
    layout.fields.flatMap((f) =>
      f.ref !== undefined ? L.ALL_LAYOUTS.get(f.ref)!.fields.map((g) => f.offset + g.offset) : [f.offset],
    );
  for (const [section, layouts] of Object.entries(sections)) {
    const start = spec.indexOf(`\n### ${section} `);
    t.ok(start >= 0, `section ${section} exists`);
    const end = spec.indexOf('\n### ', start + 1);
    const text = spec.slice(start, end);
    const allowed = new Set(layouts.flatMap(offsetsOf));
    // "offset 4", "offsets 24, 28, 32", "offset 48 or 56"; not the page-entry form "offset 64 + 8i".
    const named = [...text.matchAll(/offsets? (\d+(?:(?:, | or | and )\d+)*)\b(?! \+ 8i)/g)].flatMap((m) =>
      m[1]!.split(/, | or | and /).map(Number),
    );
    t.ok(section === '8.6' || named.length > 0, `section ${section} names offsets`);
    for (const n of named) t.ok(allowed.has(n), `section ${section}: offset ${n} is a field of ${layouts.map((l) => l.name).join('/')}`);
  }
});

t.test('section 13.3: every "offset N" of the mapped error lists is a field of CREATE_CQ or CREATE_QP', async (t) => {
  const start = spec.indexOf('\n### 13.3 ');
  const end = spec.indexOf('\n### ', start + 1);
  t.ok(start >= 0 && end > start, 'section 13.3 exists');
  const text = spec.slice(start, end);
  const cq = spec.indexOf('Errors of CREATE_CQ with MAP', start);
  const qp = spec.indexOf('Errors of CREATE_QP with MAP', start);
  t.ok(cq > start && qp > cq, 'both error lists are there');
  const offsets = (from: number, to: number): number[] =>
    [...spec.slice(from, to).matchAll(/offsets? (\d+(?:(?:, | or | and )\d+)*)\b/g)].flatMap((m) => m[1]!.split(/, | or | and /).map(Number));
  const cqFields = new Set(L.CreateCqRequest.fields.map((f) => f.offset));
  const qpFields = new Set(L.CreateQpRequest.fields.map((f) => f.offset));
  for (const n of offsets(cq, qp)) t.ok(cqFields.has(n), `CREATE_CQ: offset ${n} is a field of CreateCqRequest`);
  for (const n of offsets(qp, end)) t.ok(qpFields.has(n), `CREATE_QP: offset ${n} is a field of CreateQpRequest`);
  t.match(text, new RegExp(`CreateCqRequest \\(offset ${L.CreateCqRequest.offsetOf('map_flags')}\\)`), 'CreateCqRequest map_flags offset');
  t.match(text, new RegExp(`CreateQpRequest\\s+\\(offset ${L.CreateQpRequest.offsetOf('map_flags')}\\)`), 'CreateQpRequest map_flags offset');
  t.match(spec, new RegExp(`\\| ${L.ResourceKind.MAPPING} \\| MAPPING \\|`), 'ResourceKind MAPPING');
  // Section 13.6: slots per doorbell page, as the prose says.
  t.match(spec, new RegExp(`a page holds ${L.MappingLimits.DOORBELL_PAGE_SIZE / L.MappingLimits.DOORBELL_SLOT_SIZE} slots`));
});
