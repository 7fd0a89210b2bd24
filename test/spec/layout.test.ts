// The layout module on its own: every structure is well formed (no gap, no overlap, natural alignment),
// encode/decode round-trip and put bytes where the tables say, bad values are refused, and the framing helpers
// follow spec section 7.2 case by case.

import t from 'tap';
import * as L from '../../vmm-device/abi/rdma/index.ts';
import type { FieldDef, Layout } from '../../vmm-device/abi/rdma/index.ts';
import { xorshift32 } from '../util/xorshift.ts';

function randomValue(layout: Layout<unknown>, next: () => number): Record<string, unknown> {
  const v: Record<string, unknown> = {};
  for (const f of layout.fields) {
    switch (f.type) {
      case 'u8':
        v[f.name] = next() & 0xff;
        break;
      case 'u16':
        v[f.name] = next() & 0xffff;
        break;
      case 'u32':
        v[f.name] = next();
        break;
      case 'u64':
        v[f.name] = (BigInt(next()) << 32n) | BigInt(next());
        break;
      case 'bytes':
        v[f.name] = Uint8Array.from({ length: f.size }, () => next() & 0xff);
        break;
      case 'reserved':
        break;
    }
  }
  return v;
}

/** The value with every field at its largest: catches sign and width mistakes. */
function maxValue(layout: Layout<unknown>): Record<string, unknown> {
  const v: Record<string, unknown> = {};
  for (const f of layout.fields) {
    if (f.type === 'u64') v[f.name] = 0xffff_ffff_ffff_ffffn;
    else if (f.type === 'bytes') v[f.name] = new Uint8Array(f.size).fill(0xff);
    else if (f.type !== 'reserved') v[f.name] = 2 ** (8 * f.size) - 1;
  }
  return v;
}

const layouts = [...L.ALL_LAYOUTS.values()];

t.test('every structure covers its bytes exactly once, in offset order, naturally aligned', async (t) => {
  t.ok(layouts.length >= 30, `${layouts.length} structures declared`);
  for (const layout of layouts) {
    let end = 0;
    for (const f of layout.fields) {
      t.equal(f.offset, end, `${layout.name}.${f.name}: starts where the previous field ends (no gap, no overlap)`);
      end = f.offset + f.size;
      const alignment = f.ref !== undefined ? L.ALL_LAYOUTS.get(f.ref)!.alignment : L.fieldAlignment(f);
      t.equal(f.offset % alignment, 0, `${layout.name}.${f.name}: offset ${f.offset} is a multiple of ${alignment}`);
      if (f.ref !== undefined) t.equal(f.size, L.ALL_LAYOUTS.get(f.ref)!.size, `${layout.name}.${f.name}: size of ${f.ref}`);
    }
    t.equal(end, layout.size, `${layout.name}: fields end at the size`);
    t.equal(layout.size % 8, 0, `${layout.name}: size ${layout.size} is a multiple of 8`);
    t.equal(layout.size % layout.alignment, 0, `${layout.name}: size is a multiple of its alignment`);
  }
});

t.test('sizes the data path depends on', async (t) => {
  t.equal(L.SendWqe.size, L.Limits.SQ_WQE_SIZE);
  t.equal(L.RecvWqe.size, L.Limits.RQ_WQE_SIZE);
  t.equal(L.Cqe.size, L.Limits.CQE_SIZE);
  t.equal(L.Sge.size, L.Limits.SGE_SIZE);
  t.equal(L.Event.size, L.Limits.EVENT_SIZE);
  t.equal(L.DoorbellRecord.size, L.Limits.DOORBELL_RECORD_SIZE);
  t.equal(L.QueueIndex.size, L.Limits.QUEUE_INDEX_SIZE);
  t.equal(L.SendWqe.field('payload').size, L.Limits.SQ_WQE_MAX_SGE * L.Sge.size, 'send payload holds 4 SGEs');
  t.equal(L.SendWqe.field('payload').size, L.Limits.SQ_WQE_MAX_INLINE, 'or 64 inline bytes');
  t.equal(L.RecvWqe.field('sges').size, L.Limits.RQ_WQE_MAX_SGE * L.Sge.size, 'receive WQE holds 3 SGEs');
  for (const pageShift of [L.Limits.MIN_PAGE_SHIFT, 16, 21, L.Limits.MAX_PAGE_SHIFT]) {
    for (const size of [L.Limits.SQ_WQE_SIZE, L.Limits.RQ_WQE_SIZE, L.Limits.CQE_SIZE]) {
      t.equal(2 ** pageShift % size, 0, `a ${size}-byte entry never crosses a 2^${pageShift} page`);
    }
  }
  t.equal(L.DeviceConfig.offsetOf('gid') % 8, 0, 'the GID starts 8-byte aligned in the configuration');
  t.equal(L.Limits.MAX_QUEUE_DEPTH, 2 ** 22);
  t.equal(L.CtrlRequestHeader.size, 16);
  t.equal(L.CtrlResponseHeader.size, 16);
});

t.test('round trips: random, largest and zero values, at offset 0 and inside a larger buffer', async (t) => {
  const next = xorshift32(0x5eed);
  for (const layout of layouts) {
    const zero = Object.fromEntries(Object.entries(maxValue(layout)).map(([k, v]) => [k, typeof v === 'bigint' ? 0n : v instanceof Uint8Array ? new Uint8Array(v.length) : 0]));
    for (const value of [randomValue(layout, next), randomValue(layout, next), maxValue(layout), zero]) {
      const bytes = layout.encode(value);
      t.equal(bytes.byteLength, layout.size, `${layout.name}: encode gives size bytes`);
      t.same(layout.decode(bytes), value, `${layout.name}: decode(encode(v)) = v`);
      const big = new Uint8Array(layout.size + 24).fill(0xa5);
      layout.encode(value, big, 8);
      t.same(layout.decode(big, 8), value, `${layout.name}: round trip at offset 8`);
      t.ok(big.subarray(0, 8).every((b) => b === 0xa5), `${layout.name}: bytes before untouched`);
      t.ok(big.subarray(8 + layout.size).every((b) => b === 0xa5), `${layout.name}: bytes after untouched`);
    }
  }
});

t.test('fields land little-endian at the declared offsets', async (t) => {
  for (const layout of layouts) {
    const value = maxValue(layout);
    // Distinct recognisable values per field: byte k of a field holds (field index + 1) * 16 + k.
    layout.fields.forEach((f: FieldDef, i) => {
      if (f.type === 'reserved') return;
      const pattern = Array.from({ length: f.size }, (_, k) => ((i + 1) * 16 + k) & 0xff);
      if (f.type === 'bytes') value[f.name] = Uint8Array.from(pattern);
      else if (f.type === 'u64') value[f.name] = pattern.reduce((acc, b, k) => acc | (BigInt(b) << BigInt(8 * k)), 0n);
      else value[f.name] = pattern.reduce((acc, b, k) => acc + b * 2 ** (8 * k), 0);
    });
    const bytes = layout.encode(value);
    layout.fields.forEach((f: FieldDef, i) => {
      const expected = f.type === 'reserved' ? new Array(f.size).fill(0) : Array.from({ length: f.size }, (_, k) => ((i + 1) * 16 + k) & 0xff);
      t.same([...bytes.subarray(f.offset, f.offset + f.size)], expected, `${layout.name}.${f.name} bytes at ${f.offset}`);
    });
  }
});

t.test('reserved bytes: zeroed by encode, ignored by decode', async (t) => {
  const next = xorshift32(7);
  for (const layout of layouts.filter((l) => l.fields.some((f) => f.type === 'reserved'))) {
    const value = randomValue(layout, next);
    const buf = new Uint8Array(layout.size).fill(0xff);
    layout.encode(value, buf);
    t.ok(layout.reservedAreZero(buf), `${layout.name}: reserved bytes zeroed over a 0xff buffer`);
    for (const f of layout.fields.filter((f) => f.type === 'reserved')) buf.fill(0x5a, f.offset, f.offset + f.size);
    t.notOk(layout.reservedAreZero(buf), `${layout.name}: reservedAreZero sees junk`);
    t.same(layout.decode(buf), value, `${layout.name}: decode ignores junk in reserved bytes`);
  }
  t.notOk(L.Cqe.reservedAreZero(new Uint8Array(8)), 'a buffer too short is not "all zero"');
});

t.test('encode refuses values that do not fit; decode refuses short buffers', async (t) => {
  const base = () => ({ handle: 1, type: L.DoorbellType.SQ });
  t.throws(() => L.DoorbellRecord.encode({ ...base(), type: 256 }), L.LayoutError, 'u8 of 256');
  t.throws(() => L.DoorbellRecord.encode({ ...base(), handle: -1 }), L.LayoutError, 'negative');
  t.throws(() => L.DoorbellRecord.encode({ ...base(), handle: 1.5 }), L.LayoutError, 'fraction');
  t.throws(() => L.DoorbellRecord.encode({ ...base(), handle: 2 ** 32 }), L.LayoutError, 'u32 of 2^32');
  t.throws(() => L.DoorbellRecord.encode({ ...base(), handle: Number.NaN }), L.LayoutError, 'NaN');
  t.throws(() => L.CtrlRequestHeader.encode({ command: 0x10000, length: 0, tag: 0n }), L.LayoutError, 'u16 of 2^16');
  t.throws(() => L.Sge.encode({ addr: 1 as unknown as bigint, length: 0, lkey: 0 }), L.LayoutError, 'u64 given a number');
  t.throws(() => L.Sge.encode({ addr: 1n << 64n, length: 0, lkey: 0 }), L.LayoutError, 'u64 of 2^64');
  t.throws(() => L.Sge.encode({ addr: -1n, length: 0, lkey: 0 }), L.LayoutError, 'negative u64');
  t.throws(
    () => L.QueryGidResponse.encode({ gid: new Uint8Array(15), gid_type: 2 }),
    L.LayoutError,
    'a 15-byte GID',
  );
  t.throws(() => L.Cqe.decode(new Uint8Array(31)), L.LayoutError, 'a 31-byte CQE');
  t.throws(() => L.Cqe.decode(new Uint8Array(40), 9), L.LayoutError, 'a CQE that would end past the buffer');
  t.throws(() => L.Cqe.encode(L.Cqe.decode(new Uint8Array(32)), new Uint8Array(32), 1), L.LayoutError, 'encode past the end');
  t.throws(() => L.Cqe.decode(new Uint8Array(64), -1), L.LayoutError, 'negative offset');
  t.throws(() => L.Cqe.field('nope'), L.LayoutError, 'unknown field');
  t.throws(() => L.layout('Bad', 4, [L.u32('a', 2)]), L.LayoutError, 'a field past the end is refused at declaration');
  t.throws(() => L.layout('Dup', 8, [L.u32('a', 0), L.u32('a', 4)]), L.LayoutError, 'duplicate names refused');
});

t.test('decoded byte fields are copies, not views of guest memory', async (t) => {
  const buf = L.QueryGidResponse.encode({ gid: new Uint8Array(16).fill(1), gid_type: 2 });
  const decoded = L.QueryGidResponse.decode(buf);
  buf.fill(9);
  t.same([...decoded.gid], new Array(16).fill(1), 'changing the source afterwards does not change the value');
});

t.test('constants: distinct values, ranges, masks', async (t) => {
  const sets: Record<string, Record<string, number>> = {
    FeatureBit: L.FeatureBit,
    Command: L.Command,
    Status: L.Status,
    EventType: L.EventType,
    DoorbellType: L.DoorbellType,
    SendOpcode: L.SendOpcode,
    WcOpcode: L.WcOpcode,
    WcStatus: L.WcStatus,
    QpState: L.QpState,
    QpAttrMask: L.QpAttrMask,
  };
  for (const [name, set] of Object.entries(sets)) {
    const values = Object.values(set);
    t.equal(new Set(values).size, values.length, `${name}: distinct values`);
  }
  for (const bit of Object.values(L.FeatureBit)) t.ok(bit < 24, `device feature bit ${bit} is in the device-specific range`);
  for (const code of Object.values(L.Command)) {
    t.ok(code < L.RESERVED_COMMAND_RANGE.first || code > L.RESERVED_COMMAND_RANGE.last, `command ${code} outside the reserved range`);
    t.ok(code > 0 && code <= 0xffff, `command ${code} fits the u16 field`);
  }
  t.equal(L.Status.OK, 0, 'OK is 0');
  t.equal(L.SUPPORTED_QP_ATTR_MASK & ~L.DEFINED_QP_ATTR_MASK, 0, 'supported attributes are defined ones');
  const allBits = Object.values(L.QpAttrMask).reduce((a, b) => a | b, 0);
  t.equal(allBits, L.DEFINED_QP_ATTR_MASK, 'DEFINED_QP_ATTR_MASK is every QpAttrMask bit');
  for (const [key, req] of Object.entries(L.REQUIRED_QP_ATTRS)) {
    t.equal(req & ~L.SUPPORTED_QP_ATTR_MASK, 0, `${key}: required bits are supported`);
    t.ok(req & L.QpAttrMask.STATE, `${key}: STATE is required`);
    const opt = L.OPTIONAL_QP_ATTRS[key] ?? 0;
    t.equal(opt & req, 0, `${key}: optional and required are disjoint`);
    t.equal(opt & ~L.SUPPORTED_QP_ATTR_MASK, 0, `${key}: optional bits are supported`);
  }
  for (const key of Object.keys(L.OPTIONAL_QP_ATTRS)) t.ok(key in L.REQUIRED_QP_ATTRS, `${key}: optional only for known transitions`);
  t.equal(Object.values(L.AccessFlag).reduce((a, b) => a | b, 0), L.DEFINED_ACCESS_FLAGS);
  t.equal(Object.values(L.SendFlag).reduce((a, b) => a | b, 0), L.DEFINED_SEND_FLAGS);
  t.same(L.RESERVED_FEATURE_BITS, [L.FeatureBit.MIGRATION, L.FeatureBit.SRQ], 'HOST_QUEUE_MAPPING is offered by a device that can map (section 13.16)');
});

t.test('control framing (spec 7.2), case by case', async (t) => {
  const maxPages = 4;
  const respFor = (code: number) => 16 + L.COMMANDS.get(code)!.response.size;
  const tag = 0x1122_3344_5566_7788n;

  t.test('every command with a well-formed body passes', async (t) => {
    for (const spec of L.COMMANDS.values()) {
      const req = L.encodeRequest(spec.code, tag, new Uint8Array(spec.request.size));
      const r = L.checkRequestFraming(req, respFor(spec.code), maxPages);
      t.equal(r.kind, 'ok', `${spec.name}`);
      if (r.kind === 'ok') {
        t.equal(r.header.tag, tag, `${spec.name}: tag`);
        t.equal(r.body.byteLength, spec.request.size, `${spec.name}: body`);
        t.equal(r.pages, 0);
      }
    }
  });

  t.test('fatal: no room for a header or for a response header', async (t) => {
    t.equal(L.checkRequestFraming(new Uint8Array(15), 64, maxPages).kind, 'fatal', '15 readable bytes');
    t.equal(L.checkRequestFraming(new Uint8Array(0), 64, maxPages).kind, 'fatal', '0 readable bytes');
    const req = L.encodeRequest(L.Command.CREATE_PD, tag, new Uint8Array(0));
    t.equal(L.checkRequestFraming(req, 15, maxPages).kind, 'fatal', '15 writable bytes');
  });

  const statusOf = (r: L.RequestFraming) => (r.kind === 'status' ? [r.statusName, r.detail] : [r.kind]);

  t.test('unknown and reserved command numbers', async (t) => {
    for (const code of [0, 0x04, 0x12, 0x100, 0x1ff, 0xffff]) {
      const req = L.encodeRequest(code, tag, new Uint8Array(0));
      t.same(statusOf(L.checkRequestFraming(req, 64, maxPages)), ['INVALID_COMMAND', 0], `0x${code.toString(16)}`);
    }
  });

  t.test('length errors', async (t) => {
    const body = new Uint8Array(L.HandleRequest.size);
    const req = L.encodeRequest(L.Command.DESTROY_PD, tag, body);
    t.same(statusOf(L.checkRequestFraming(req.subarray(0, req.length - 1), 16, maxPages)), ['INVALID_LENGTH', 0], 'length past the readable part');
    const short = L.encodeRequest(L.Command.DESTROY_PD, tag, new Uint8Array(4));
    t.same(statusOf(L.checkRequestFraming(short, 16, maxPages)), ['INVALID_LENGTH', 0], 'shorter than the fixed body');
    const long = L.encodeRequest(L.Command.DESTROY_PD, tag, new Uint8Array(12));
    t.same(statusOf(L.checkRequestFraming(long, 16, maxPages)), ['INVALID_LENGTH', 0], 'longer than a command without page list');
    t.same(statusOf(L.checkRequestFraming(req, 15 + 1 - 1, maxPages)), ['fatal'], 'writable 15 is fatal, not a status');
    const query = L.encodeRequest(L.Command.QUERY_DEVICE, tag, new Uint8Array(0));
    t.same(statusOf(L.checkRequestFraming(query, 16 + 95, maxPages)), ['INVALID_LENGTH', 1], 'response buffer one byte short');
    const trailing = new Uint8Array(req.length + 5);
    trailing.set(req);
    t.equal(L.checkRequestFraming(trailing, 16, maxPages).kind, 'ok', 'bytes beyond 16 + length are ignored');
  });

  t.test('page lists: count bounded, then length must match exactly', async (t) => {
    const cq = (numPages: number, entries: number) => {
      const body = L.CreateCqRequest.encode({ cqe_count: 128, page_shift: 12, num_pages: numPages, index_gpa: 0x1000n });
      return L.encodeRequest(L.Command.CREATE_CQ, tag, body, Array.from({ length: entries }, (_, i) => BigInt((i + 1) * 4096)));
    };
    const ok = L.checkRequestFraming(cq(2, 2), 64, maxPages);
    t.equal(ok.kind, 'ok');
    if (ok.kind === 'ok') {
      t.equal(ok.pages, 2);
      t.same(L.decodePageList(ok.body, L.CreateCqRequest.size, ok.pages), [4096n, 8192n], 'entries decoded in order');
    }
    t.same(statusOf(L.checkRequestFraming(cq(2, 1), 64, maxPages)), ['INVALID_LENGTH', 0], 'fewer entries than announced');
    t.same(statusOf(L.checkRequestFraming(cq(1, 2), 64, maxPages)), ['INVALID_LENGTH', 0], 'more entries than announced');
    // A guest announcing a huge count: refused from the fixed body alone, no entry read (the CVE-2023-1544 class).
    t.same(statusOf(L.checkRequestFraming(cq(0xffff_ffff, 1), 64, maxPages)), ['INVALID_ARGUMENT', L.CreateCqRequest.offsetOf('num_pages')]);
    t.same(statusOf(L.checkRequestFraming(cq(maxPages + 1, maxPages + 1), 64, maxPages)), ['INVALID_ARGUMENT', 8], 'one above the limit');

    const qpBody = L.CreateQpRequest.encode({
      pd_handle: 1, send_cq_handle: 1, recv_cq_handle: 1, qp_type: L.QpType.RC, sq_sig_all: 0, sq_page_shift: 12,
      rq_page_shift: 12, max_send_wr: 32, max_recv_wr: 64, max_send_sge: 4, max_recv_sge: 3, max_inline_data: 64,
      sq_num_pages: 1, rq_num_pages: 1, sq_index_gpa: 0x2000n, rq_index_gpa: 0x2008n,
    });
    const qp = L.checkRequestFraming(L.encodeRequest(L.Command.CREATE_QP, tag, qpBody, [0x3000n, 0x4000n]), 64, maxPages);
    t.equal(qp.kind === 'ok' && qp.pages, 2, 'CREATE_QP announces SQ + RQ pages');
    const qpTooMany = L.CreateQpRequest.encode({ ...L.CreateQpRequest.decode(qpBody), sq_num_pages: 3, rq_num_pages: 2 });
    // The RQ's pages take the total over the limit: the detail names rq_num_pages (issue 12 item 5: it said 36).
    t.same(statusOf(L.checkRequestFraming(L.encodeRequest(L.Command.CREATE_QP, tag, qpTooMany), 64, maxPages)), [
      'INVALID_ARGUMENT',
      L.CreateQpRequest.offsetOf('rq_num_pages'),
    ]);
    const sqTooMany = L.CreateQpRequest.encode({ ...L.CreateQpRequest.decode(qpBody), sq_num_pages: maxPages + 1, rq_num_pages: 1 });
    t.same(statusOf(L.checkRequestFraming(L.encodeRequest(L.Command.CREATE_QP, tag, sqTooMany), 64, maxPages)), [
      'INVALID_ARGUMENT',
      L.CreateQpRequest.offsetOf('sq_num_pages'),
    ], 'sq_num_pages alone above the limit');

    const mr = L.RegMrRequest.encode({ pd_handle: 1, access_flags: 1, iova: 0x7f00_0000_0000n, length: 8192n, page_shift: 12, total_pages: 2, num_pages: 2 });
    t.equal(L.checkRequestFraming(L.encodeRequest(L.Command.REG_MR, tag, mr, [0x5000n, 0x9000n]), 32, maxPages).kind, 'ok');
    const cont = L.RegMrContinueRequest.encode({ mr_handle: 1, start_index: 4, num_pages: 1 });
    t.equal(L.checkRequestFraming(L.encodeRequest(L.Command.REG_MR_CONTINUE, tag, cont, [0x6000n]), 32, maxPages).kind, 'ok');
  });

  t.test('decodePageList never reads past its buffer', async (t) => {
    t.throws(() => L.decodePageList(new Uint8Array(16), 0, 3), L.LayoutError);
    t.throws(() => L.decodePageList(new Uint8Array(16), 8, 2), L.LayoutError);
    t.throws(() => L.decodePageList(new Uint8Array(16), 0, -1), L.LayoutError);
    t.same(L.decodePageList(new Uint8Array(16), 16, 0), [], 'an empty list at the end');
  });

  t.test('responses', async (t) => {
    const body = L.HandleResponse.encode({ handle: 7 });
    const resp = L.encodeResponse(L.Status.OK, 0, tag, body);
    t.equal(resp.byteLength, 24);
    const d = L.decodeResponse(resp, resp.byteLength);
    t.same(d.header, { status: 0, detail: 0, tag });
    t.same(L.HandleResponse.decode(d.body), { handle: 7 });
    const err = L.encodeResponse(L.Status.NO_RESOURCES, L.ResourceKind.QP, tag);
    t.same(L.decodeResponse(err, 16).header, { status: L.Status.NO_RESOURCES, detail: L.ResourceKind.QP, tag });
    t.throws(() => L.decodeResponse(err, 15), L.LayoutError, 'used length below a header');
    t.throws(() => L.decodeResponse(err, 17), L.LayoutError, 'used length past the buffer');
  });
});

t.test('SGE arrays and ring arithmetic', async (t) => {
  const sges = [
    { addr: 0x7f00_0000_1000n, length: 4096, lkey: 0x1234 },
    { addr: 0xffff_ffff_ffff_fff0n, length: 16, lkey: 0xffff_ffff },
  ];
  const payload = L.encodeSges(sges, L.Limits.SQ_WQE_MAX_SGE);
  t.equal(payload.byteLength, 64);
  t.same(L.decodeSges(payload, 2), sges);
  t.ok(payload.subarray(32).every((b) => b === 0), 'unused slots are zero');
  t.throws(() => L.encodeSges([...sges, ...sges, ...sges], 4), L.LayoutError, '6 SGEs in 4 slots');
  t.throws(() => L.decodeSges(payload, 5), L.LayoutError, '5 SGEs from a 64-byte payload');
  const wqe = L.SendWqe.encode({
    wr_id: 42n, opcode: L.SendOpcode.RDMA_WRITE, flags: L.SendFlag.SIGNALED, num_sge: 2, imm_data: 0, remote_addr: 0x9000n,
    rkey: 5, inline_length: 0, compare_add: 0n, swap: 0n, ah_handle: 0, remote_qpn: 0, remote_qkey: 0, payload,
  });
  t.same(L.decodeSges(L.SendWqe.decode(wqe).payload, 2), sges, 'SGEs through a send WQE');

  t.equal(L.ringPages(64, 32, 12), 1, 'a 2 KiB CQ ring uses one page');
  t.equal(L.ringPages(16384, 128, 12), 512, '16384 send WQEs in 512 pages');
  t.equal(L.ringPages(16384, 128, 21), 1, 'or one 2 MiB page');
  t.equal(L.mrPageCount(0x1000n, 0x1000n, 12), 1n, 'aligned page');
  t.equal(L.mrPageCount(0x1fffn, 2n, 12), 2n, 'two bytes across a page boundary');
  t.equal(L.mrPageCount(0x1234n, 1n, 12), 1n, 'one byte');
  t.equal(L.mrPageCount(0n, (1n << 64n) - 1n, 12), 1n << 52n, 'a huge length stays exact');
  t.equal(L.ringOccupancy(2, 0xffff_fffe), 4, 'occupancy across the u32 wrap');
  t.equal(L.ringOccupancy(0, 1), 0xffff_ffff, 'consumer ahead of producer shows as a huge occupancy');
  t.ok(L.isPowerOfTwo(1) && L.isPowerOfTwo(2 ** 22) && L.isPowerOfTwo(2 ** 31));
  t.notOk(L.isPowerOfTwo(0) || L.isPowerOfTwo(3) || L.isPowerOfTwo(2 ** 32) || L.isPowerOfTwo(1.5));
  // Spec 5.2: the largest QP (16384 WRs) and CQ (65536 CQEs) fit in one command with 4 KiB pages.
  t.equal(L.minPagesPerCommand(16384, 65536), 768, '512 SQ pages + 256 RQ pages; the CQ needs 512');
  t.equal(L.minPagesPerCommand(1, 1), 2, 'even the smallest QP needs one page per ring');
});

t.test('a complete MODIFY_QP to RTR request, as a driver builds it', async (t) => {
  const dgid = Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]);
  const attr = L.QpAttr.encode({
    qp_state: L.QpState.RTR, qp_access_flags: 0, qkey: 0, rq_psn: 0x123456, sq_psn: 0, dest_qp_num: 0x11,
    path_mtu: L.Mtu.MTU_1024, timeout: 0, retry_cnt: 0, rnr_retry: 0, min_rnr_timer: 12, max_rd_atomic: 0,
    max_dest_rd_atomic: 1, port_num: 1, pkey_index: 0, sgid_index: 0, hop_limit: 64, flow_label: 0,
    traffic_class: 0, sl: 0, dgid,
  });
  const attrMask = L.REQUIRED_QP_ATTRS[L.transitionKey(L.QpType.RC, L.QpState.INIT, L.QpState.RTR)]!;
  const body = L.ModifyQpRequest.encode({ qp_handle: 3, attr_mask: attrMask, attr });
  const req = L.encodeRequest(L.Command.MODIFY_QP, 99n, body);
  t.equal(req.byteLength, 16 + 72);
  const r = L.checkRequestFraming(req, 16, 1);
  t.equal(r.kind, 'ok');
  if (r.kind !== 'ok') return;
  const m = L.ModifyQpRequest.decode(r.body);
  const a = L.QpAttr.decode(m.attr);
  t.equal(m.attr_mask, attrMask);
  t.equal(a.rq_psn, 0x123456);
  t.same([...a.dgid], [...dgid], 'the virtual GID arrives intact');
  t.equal(req[16 + 8 + 48 + 15], 2, 'the dgid sits at request body offset 56 (the detail of DESTINATION_UNREACHABLE)');
});

t.test('feature-gated fields (section 13): omitted means zero, named means written, decoded always', async (t) => {
  const v1 = L.CreateQpRequest.encode({
    pd_handle: 1, send_cq_handle: 2, recv_cq_handle: 2, qp_type: L.QpType.RC, sq_sig_all: 0, sq_page_shift: 12,
    rq_page_shift: 12, max_send_wr: 8, max_recv_wr: 8, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0,
    sq_num_pages: 1, rq_num_pages: 1, sq_index_gpa: 0x1000n, rq_index_gpa: 0x1008n,
  });
  t.same([...v1.subarray(44, 48)], [0, 0, 0, 0], 'a version 1 encoder that never names map_flags writes the old reserved zeros');
  t.equal(L.CreateQpRequest.decode(v1).map_flags, 0, 'decode returns the gated field');
  const mapped = L.CreateQpRequest.encode({ ...L.CreateQpRequest.decode(v1), map_flags: L.MapFlag.MAP });
  t.equal(new DataView(mapped.buffer, mapped.byteOffset).getUint32(44, true), L.MapFlag.MAP, 'a named gated field is written');
  t.throws(() => L.CreateCqRequest.encode({ cqe_count: 1, page_shift: 12, num_pages: 0, index_gpa: 0n, map_flags: -1 }), L.LayoutError, 'and checked like any field');
  const cfg = L.DeviceConfig.decode(new Uint8Array(L.DeviceConfig.size));
  t.equal(cfg.max_mapped_queues, 0, 'the configuration decodes the section 13 fields');
});

t.test('section 13 layouts: the mapped responses begin with the version 1 bodies', async (t) => {
  t.equal(L.CreateCqMappedResponse.field('cq').ref, 'CreateCqResponse');
  t.equal(L.CreateQpMappedResponse.field('qp').ref, 'CreateQpResponse');
  t.equal(L.CreateCqMappedResponse.offsetOf('cq'), 0);
  t.equal(L.CreateQpMappedResponse.offsetOf('qp'), 0);
  t.equal(L.MAPPED_RESPONSES.get(L.Command.CREATE_CQ), L.CreateCqMappedResponse);
  t.equal(L.MAPPED_RESPONSES.get(L.Command.CREATE_QP), L.CreateQpMappedResponse);
  t.equal(L.RxeQueueHeader.size, L.MappingLimits.RXE_QUEUE_HEADER_SIZE, 'the rxe header is 384 bytes');
  t.equal(L.MappedDoorbell.size, L.MappingLimits.DOORBELL_SLOT_SIZE);
  t.equal(L.MappingLimits.DOORBELL_PAGE_SIZE / L.MappingLimits.DOORBELL_SLOT_SIZE, 512, '512 slots per doorbell page');
});
