// The perftest result parsers on output in the format Debian 12's perftest (4.5, report version 6.06) prints: result
// rows with figures of this bench's runs on rxe0, headers abridged; and the statistics helpers of the records.

import t from 'tap';
import { PerftestError, parseBandwidth, parseLatency } from './perftest.ts';
import { median, percentile, record } from './results.ts';

const WRITE_LAT = `
                    RDMA_Write Latency Test
 Dual-port       : OFF          Device         : rxe0
 Number of qps   : 1            Transport type : IB
 Connection type : RC           Using SRQ      : OFF
 TX depth        : 1
 Mtu             : 1024[B]
 Link type       : Ethernet
 GID index       : 1
 Max inline data : 220[B]
 rdma_cm QPs     : OFF
 Data ex. method : Ethernet
---------------------------------------------------------------------------------------
 local address: LID 0000 QPN 0x0011 PSN 0x8fd1d1 RKey 0x000512 VAddr 0x0055d0c0a55000
 GID: 00:00:00:00:00:00:00:00:00:00:255:255:10:233:00:01
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 2       1000          31.52          8311.86      47.88               112.40           401.13          1841.52                 8311.86 
---------------------------------------------------------------------------------------
`;

const WRITE_BW = `
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      2000             9.54               9.32               0.000149
---------------------------------------------------------------------------------------
`;

t.test('latency line: t_typical and t_avg of the row with the asked size and count', async (t) => {
  const r = parseLatency(WRITE_LAT, 2, 1000);
  t.same(r, { bytes: 2, iterations: 1000, minUs: 31.52, maxUs: 8311.86, typicalUs: 47.88, avgUs: 112.4 });
});

t.test('latency: a run of another size or count is not taken for this one', async (t) => {
  t.throws(() => parseLatency(WRITE_LAT, 2, 500), PerftestError);
  t.throws(() => parseLatency(WRITE_LAT, 64, 1000), PerftestError);
  t.throws(() => parseLatency('Couldn\'t connect to 127.0.0.1:18515', 2, 1000), /no latency line/);
});

t.test('bandwidth line: BW average in MiB/s (perftest MB = 2^20 bytes)', async (t) => {
  t.same(parseBandwidth(WRITE_BW, 65536, 2000), { bytes: 65536, iterations: 2000, peakMiBs: 9.54, averageMiBs: 9.32 });
  t.throws(() => parseBandwidth(WRITE_BW, 65536, 1000), PerftestError);
  // The header row names no numbers: it never matches.
  t.throws(() => parseBandwidth(' #bytes     #iterations    BW peak[MB/sec]', 65536, 2000), PerftestError);
});

t.test('records: ratio ours/baseline rounded to 3 places; impossible ratios refused', async (t) => {
  t.same(record('m', 3, 2, 'b', 'us', 'lower'), { metric: 'm', ours: 3, baseline: 2, baseline_name: 'b', ratio: 1.5, unit: 'us', better: 'lower' });
  t.equal(record('m', 1, 3, 'b', 'us', 'lower').ratio, 0.333);
  t.throws(() => record('m', 1, 0, 'b', 'us', 'lower'), /cannot form a ratio/);
  t.throws(() => record('m', Number.NaN, 1, 'b', 'us', 'lower'), /cannot form a ratio/);
});

t.test('median and nearest-rank percentile', async (t) => {
  t.equal(median([3, 1, 2]), 2);
  t.equal(median([4, 1, 3, 2]), 2.5);
  t.equal(percentile([5, 1, 4, 2, 3], 50), 3);
  t.equal(percentile([5, 1, 4, 2, 3], 99), 5);
  t.equal(percentile([5, 1, 4, 2, 3], 0), 1);
  t.throws(() => median([]));
  t.throws(() => percentile([], 50));
});
