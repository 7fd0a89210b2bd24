// A client of QEMU's qtest protocol (system/qtest.c in QEMU): the test program plays the guest CPU. One line per
// request, one reply line per request in order ("OK [VALUE]" or "FAIL ..."/"ERR ..."), and asynchronous
// "IRQ raise N" / "IRQ lower N" lines that may arrive at any time, between or before replies, once
// irq_intercept_in is on. Every request is queued on the socket at once; replies are matched in order.

import type net from 'node:net';

/** Longest reply line accepted (a `b64read` of MAX_TRANSFER_BYTES plus slack): a longer one is a protocol error. */
export const MAX_TRANSFER_BYTES = 1 << 20;
const MAX_LINE_CHARS = Math.ceil((MAX_TRANSFER_BYTES * 4) / 3) + 64;
/** Default time a caller waits for an interrupt line before giving up. */
export const DEFAULT_IRQ_TIMEOUT_MS = 5000;

export class QtestError extends Error {
  override name = 'QtestError';
  constructor(
    readonly command: string,
    readonly reply: string,
  ) {
    super(`qtest: \`${command}\` -> ${reply}`);
  }
}

interface Pending {
  command: string;
  resolve: (value: string) => void;
  reject: (error: Error) => void;
}

interface IrqWaiter {
  irq: number;
  level: boolean;
  resolve: () => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const hex = (value: number | bigint): string => `0x${value.toString(16)}`;

function checkAddress(what: string, value: number | bigint): void {
  if (typeof value === 'bigint' ? value < 0n || value >= 1n << 64n : !Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`qtest ${what}: ${String(value)} is not a 64-bit address`);
  }
}

function checkValue(what: string, value: number | bigint, bits: number): void {
  const big = BigInt(value);
  if (typeof value === 'number' && !Number.isSafeInteger(value)) throw new RangeError(`qtest ${what}: ${value} is not an integer`);
  if (big < 0n || big >= 1n << BigInt(bits)) throw new RangeError(`qtest ${what}: ${String(value)} does not fit in ${bits} bits`);
}

export class QtestClient {
  private readonly pending: Pending[] = [];
  private buffered = '';
  private closedError: Error | undefined;
  /** Current level of every intercepted interrupt line seen so far (true = raised). */
  private readonly irqLevels = new Map<number, boolean>();
  /** How many times each line went from low to high. */
  private readonly irqRaiseCounts = new Map<number, number>();
  private readonly irqWaiters = new Set<IrqWaiter>();
  /** Replies and async lines, newest last, bounded: for failure messages. */
  readonly transcript: string[] = [];
  private static readonly TRANSCRIPT_LINES = 64;

  constructor(private readonly socket: net.Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (error) => this.fail(error));
    socket.on('close', () => this.fail(new Error('qtest: QEMU closed the qtest connection')));
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  close(): void {
    this.socket.destroy();
    this.fail(new Error('qtest: client closed'));
  }

  // -------------------------------------------------------------------------------------------------------------
  // The wire

  /** Sends one request line and resolves with what follows "OK" in its reply. */
  command(line: string): Promise<string> {
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    if (line.includes('\n')) throw new Error('qtest: a command is one line');
    return new Promise<string>((resolve, reject) => {
      this.pending.push({ command: line, resolve, reject });
      this.socket.write(`${line}\n`);
    });
  }

  private onData(chunk: string): void {
    this.buffered += chunk;
    let newline: number;
    while ((newline = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, newline);
      this.buffered = this.buffered.slice(newline + 1);
      this.onLine(line);
    }
    if (this.buffered.length > MAX_LINE_CHARS) {
      this.fail(new Error(`qtest: a reply line longer than ${MAX_LINE_CHARS} characters`));
      this.socket.destroy();
    }
  }

  private onLine(line: string): void {
    this.transcript.push(line.length > 200 ? `${line.slice(0, 200)}...` : line);
    if (this.transcript.length > QtestClient.TRANSCRIPT_LINES) this.transcript.shift();
    const irq = /^IRQ (raise|lower) (-?\d+)$/.exec(line);
    if (irq !== null) {
      this.onIrq(Number(irq[2]), irq[1] === 'raise');
      return;
    }
    const request = this.pending.shift();
    if (request === undefined) {
      this.fail(new Error(`qtest: unexpected line with no request pending: ${line}`));
      return;
    }
    if (line === 'OK' || line.startsWith('OK ')) request.resolve(line.slice(3));
    else request.reject(new QtestError(request.command, line));
  }

  private onIrq(irq: number, level: boolean): void {
    if (level && this.irqLevels.get(irq) !== true) this.irqRaiseCounts.set(irq, (this.irqRaiseCounts.get(irq) ?? 0) + 1);
    this.irqLevels.set(irq, level);
    for (const waiter of [...this.irqWaiters]) {
      if (waiter.irq === irq && waiter.level === level) {
        clearTimeout(waiter.timer);
        this.irqWaiters.delete(waiter);
        waiter.resolve();
      }
    }
  }

  private fail(error: Error): void {
    if (this.closedError !== undefined) return;
    this.closedError = error;
    for (const request of this.pending.splice(0)) request.reject(error);
    for (const waiter of this.irqWaiters) {
      clearTimeout(waiter.timer);
      waiter.reject(error);
    }
    this.irqWaiters.clear();
  }

  private async valueOf(line: string): Promise<bigint> {
    const reply = await this.command(line);
    const token = reply.trim().split(/\s+/)[0] ?? '';
    if (!/^(0x[0-9a-fA-F]+|\d+)$/.test(token)) throw new QtestError(line, `OK ${reply} (no value)`);
    return BigInt(token);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Port I/O

  async outb(port: number, value: number): Promise<void> {
    checkValue('outb', value, 8);
    await this.command(`outb ${hex(port)} ${hex(value)}`);
  }
  async outw(port: number, value: number): Promise<void> {
    checkValue('outw', value, 16);
    await this.command(`outw ${hex(port)} ${hex(value)}`);
  }
  async outl(port: number, value: number): Promise<void> {
    checkValue('outl', value, 32);
    await this.command(`outl ${hex(port)} ${hex(value)}`);
  }
  async inb(port: number): Promise<number> {
    return Number(await this.valueOf(`inb ${hex(port)}`));
  }
  async inw(port: number): Promise<number> {
    return Number(await this.valueOf(`inw ${hex(port)}`));
  }
  async inl(port: number): Promise<number> {
    return Number(await this.valueOf(`inl ${hex(port)}`));
  }

  // -------------------------------------------------------------------------------------------------------------
  // Memory (guest physical addresses: RAM or MMIO)

  async writeb(addr: number | bigint, value: number): Promise<void> {
    checkAddress('writeb', addr);
    checkValue('writeb', value, 8);
    await this.command(`writeb ${hex(addr)} ${hex(value)}`);
  }
  async writew(addr: number | bigint, value: number): Promise<void> {
    checkAddress('writew', addr);
    checkValue('writew', value, 16);
    await this.command(`writew ${hex(addr)} ${hex(value)}`);
  }
  async writel(addr: number | bigint, value: number): Promise<void> {
    checkAddress('writel', addr);
    checkValue('writel', value, 32);
    await this.command(`writel ${hex(addr)} ${hex(value)}`);
  }
  async writeq(addr: number | bigint, value: bigint | number): Promise<void> {
    checkAddress('writeq', addr);
    checkValue('writeq', value, 64);
    await this.command(`writeq ${hex(addr)} ${hex(value)}`);
  }
  async readb(addr: number | bigint): Promise<number> {
    checkAddress('readb', addr);
    return Number(await this.valueOf(`readb ${hex(addr)}`));
  }
  async readw(addr: number | bigint): Promise<number> {
    checkAddress('readw', addr);
    return Number(await this.valueOf(`readw ${hex(addr)}`));
  }
  async readl(addr: number | bigint): Promise<number> {
    checkAddress('readl', addr);
    return Number(await this.valueOf(`readl ${hex(addr)}`));
  }
  async readq(addr: number | bigint): Promise<bigint> {
    checkAddress('readq', addr);
    return this.valueOf(`readq ${hex(addr)}`);
  }

  /** Reads `length` bytes of guest memory (base64 on the wire). */
  async read(addr: number | bigint, length: number): Promise<Uint8Array> {
    checkAddress('read', addr);
    if (!Number.isInteger(length) || length < 1 || length > MAX_TRANSFER_BYTES) {
      throw new RangeError(`qtest read: length ${length} must be in 1..${MAX_TRANSFER_BYTES}`);
    }
    const reply = (await this.command(`b64read ${hex(addr)} ${hex(length)}`)).trim();
    const bytes = Buffer.from(reply, 'base64');
    if (bytes.length !== length) throw new QtestError(`b64read ${hex(addr)} ${length}`, `${bytes.length} bytes came back`);
    return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
  }

  /** Writes bytes into guest memory (base64 on the wire). */
  async write(addr: number | bigint, bytes: Uint8Array): Promise<void> {
    checkAddress('write', addr);
    if (bytes.length < 1 || bytes.length > MAX_TRANSFER_BYTES) {
      throw new RangeError(`qtest write: length ${bytes.length} must be in 1..${MAX_TRANSFER_BYTES}`);
    }
    const b64 = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString('base64');
    await this.command(`b64write ${hex(addr)} ${hex(bytes.length)} ${b64}`);
  }

  async memset(addr: number | bigint, length: number, value: number): Promise<void> {
    checkAddress('memset', addr);
    checkValue('memset', value, 8);
    await this.command(`memset ${hex(addr)} ${hex(length)} ${hex(value)}`);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Clock and interrupts

  /** Advances the virtual clock (to the next deadline when `ns` is absent); resolves with the clock in ns. */
  async clockStep(ns?: number): Promise<bigint> {
    return this.valueOf(ns === undefined ? 'clock_step' : `clock_step ${ns}`);
  }

  /** Reports the input lines of the device at `qomPath` as "IRQ raise/lower N" (on `pc`: "ioapic"). */
  async irqInterceptIn(qomPath: string): Promise<void> {
    await this.command(`irq_intercept_in ${qomPath}`);
  }

  /** Whether line `irq` is raised (as far as the intercepted lines reported). */
  irqRaised(irq: number): boolean {
    return this.irqLevels.get(irq) === true;
  }

  /** How many low-to-high transitions line `irq` made so far. */
  irqRaiseCount(irq: number): number {
    return this.irqRaiseCounts.get(irq) ?? 0;
  }

  /** Resolves when line `irq` is at `level` (at once if it already is); rejects after `timeoutMs`. */
  waitIrq(irq: number, level = true, timeoutMs = DEFAULT_IRQ_TIMEOUT_MS): Promise<void> {
    if (this.irqRaised(irq) === level) return Promise.resolve();
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    return new Promise<void>((resolve, reject) => {
      const waiter: IrqWaiter = {
        irq,
        level,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.irqWaiters.delete(waiter);
          reject(new Error(`qtest: IRQ ${irq} not ${level ? 'raised' : 'lowered'} within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.irqWaiters.add(waiter);
    });
  }
}
