// Per-device tables from guest handles to the device's objects (spec section 7.6): one namespace per object type,
// handles in [1, HANDLE_MAX], never a host handle. A handle is a key into a Map owned by one device instance, so
// a handle of another VM, of another type or of a destroyed object simply finds nothing.

import { Limits } from '../abi/rdma/index.ts';

export class HandleTable<T> {
  private readonly objects = new Map<number, T>();
  private next = 1;

  constructor(
    /** Most objects held at once (the configuration's max_* limit, the guest's quota). */
    readonly limit: number,
  ) {
    if (!Number.isInteger(limit) || limit < 0 || limit > Limits.HANDLE_MAX) {
      throw new RangeError(`table limit ${limit} is not in 0..${Limits.HANDLE_MAX}`);
    }
  }

  get size(): number {
    return this.objects.size;
  }

  get full(): boolean {
    return this.objects.size >= this.limit;
  }

  /** The object of a guest handle (any u32 the guest wrote), or undefined. */
  get(handle: number): T | undefined {
    return this.objects.get(handle);
  }

  /** Stores an object under a fresh handle; the caller checked `full` first. */
  add(object: T): number {
    if (this.full) throw new RangeError(`table full (${this.limit})`);
    // Free-running counter that skips live handles: a destroyed handle is not handed out again at once, which
    // makes a driver's use-after-destroy fail with INVALID_HANDLE instead of hitting a new object.
    for (;;) {
      const h = this.next;
      this.next = this.next >= Limits.HANDLE_MAX ? 1 : this.next + 1;
      if (!this.objects.has(h)) {
        this.objects.set(h, object);
        return h;
      }
    }
  }

  delete(handle: number): boolean {
    return this.objects.delete(handle);
  }

  values(): IterableIterator<T> {
    return this.objects.values();
  }

  entries(): IterableIterator<[number, T]> {
    return this.objects.entries();
  }

  /** Forgets everything; handles start again at 1 (device reset). */
  clear(): void {
    this.objects.clear();
    this.next = 1;
  }
}
