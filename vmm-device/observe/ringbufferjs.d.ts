// Types for ringbufferjs 2.x (a CommonJS FIFO that evicts its oldest entry when full; ships no declarations).
declare module 'ringbufferjs' {
  export default class RingBuffer<T> {
    constructor(capacity?: number, evictedCb?: (element: T) => void);
    capacity(): number;
    isEmpty(): boolean;
    isFull(): boolean;
    peek(): T;
    peekN(count: number): T[];
    deq(): T;
    deqN(count: number): T[];
    enq(element: T): number;
    size(): number;
  }
}
