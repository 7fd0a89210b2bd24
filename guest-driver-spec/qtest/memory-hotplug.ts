// RAM hot-added to a running QEMU through QMP, as a management layer does it: a memory backend object (QMP
// `object-add`; QEMU 10 has no `object_add` spelling any more)
// (memory-backend-memfd, share=on, so that a vhost-user back-end can map it: QEMU passes its fd in ADD_MEM_REG or
// SET_MEM_TABLE) and a pc-dimm device on it. QEMU places the DIMM in the machine's device-memory area and maps it
// into the guest's address space at once; a guest OS would then online it after the ACPI notification, but under
// qtest there is no guest and nothing else to wait for. query-memory-devices says where the DIMM landed.
//
// QEMU must have been started with memory slots (QemuQtestOptions.hotplug): without them device_add answers
// "no slots where allocated, please specify the 'slots' option".

import type { QmpClient } from './qmp.ts';

/** Largest DIMM this helper adds (the test machines have a few GiB). */
export const MAX_DIMM_MIB = 4096;
const MIB = 1024 * 1024;

/** One DIMM as query-memory-devices reports it (type "dimm"). */
export interface DimmInfo {
  /** The device's id. */
  id: string;
  /** QOM path of its memory backend ("/objects/<backend id>"). */
  memdev: string;
  /** Guest-physical address of its first byte. */
  gpa: number;
  size: number;
  slot: number;
  node: number;
  hotplugged: boolean;
  hotpluggable: boolean;
}

interface MemoryDeviceInfo {
  type: string;
  data: { id?: string; memdev: string; addr: number; size: number; slot: number; node: number; hotplugged: boolean; hotpluggable: boolean };
}

/** Every DIMM QEMU knows (cold- and hot-plugged), in QEMU's order. */
export async function queryDimms(qmp: QmpClient): Promise<DimmInfo[]> {
  const devices = await qmp.execute<MemoryDeviceInfo[]>('query-memory-devices');
  return devices
    .filter((d) => d.type === 'dimm')
    .map((d) => ({
      id: d.data.id ?? '',
      memdev: d.data.memdev,
      gpa: d.data.addr,
      size: d.data.size,
      slot: d.data.slot,
      node: d.data.node,
      hotplugged: d.data.hotplugged,
      hotpluggable: d.data.hotpluggable,
    }));
}

export interface HotAddOptions {
  /** The DIMM's device id; its backend is `<id>-mem`. */
  id: string;
  sizeMiB: number;
  /** Guest-physical address to ask for (default: QEMU picks the lowest free one in the device-memory area). */
  gpa?: number;
}

/**
 * Adds `sizeMiB` of shared memfd RAM as a pc-dimm and returns where it landed. On a refused device_add the backend
 * object is deleted again, so a failed attempt leaves nothing in QEMU.
 */
export async function hotAddMemory(qmp: QmpClient, o: HotAddOptions): Promise<DimmInfo> {
  if (!/^[A-Za-z][A-Za-z0-9_-]{0,63}$/.test(o.id)) throw new RangeError(`DIMM id ${JSON.stringify(o.id)}: a letter, then letters, digits, - or _`);
  if (!Number.isInteger(o.sizeMiB) || o.sizeMiB < 1 || o.sizeMiB > MAX_DIMM_MIB) throw new RangeError(`DIMM of ${o.sizeMiB} MiB outside 1..${MAX_DIMM_MIB}`);
  const memdev = `${o.id}-mem`;
  await qmp.execute('object-add', { 'qom-type': 'memory-backend-memfd', id: memdev, size: o.sizeMiB * MIB, share: true });
  try {
    await qmp.execute('device_add', { driver: 'pc-dimm', id: o.id, memdev, ...(o.gpa !== undefined ? { addr: o.gpa } : {}) });
  } catch (e) {
    await qmp.execute('object-del', { id: memdev }).catch(() => undefined);
    throw e;
  }
  const dimm = (await queryDimms(qmp)).find((d) => d.id === o.id);
  if (dimm === undefined) throw new Error(`QMP: device_add of ${o.id} succeeded but query-memory-devices does not list it`);
  return dimm;
}
