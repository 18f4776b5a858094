import net from 'node:net';
import {
  decodePdu,
  encodePdu,
  isInitiatorOpcode,
  NO_DIGESTS,
  PduReceiver,
  type DigestSettings,
  type Frame,
  type PayloadSink,
  type PduInit,
  type TargetPdu,
  type WireError,
} from 'iscsi-node-wire';

/**
 * The socket reads into one reused buffer per connection (headers, small payloads, several PDUs
 * at a time) instead of into a fresh chunk Node allocates per read: at hundreds of MB/s those
 * chunks are external memory that keeps V8 running full garbage collections.
 */
const RECEIVE_BUFFER_SIZE = 256 * 1024;

export type { PayloadSink };

/** The connection failed below iSCSI: TCP, framing, digests, or a target PDU we cannot decode. */
export class ConnectionError extends Error {
  override readonly name = 'ConnectionError';
  constructor(
    message: string,
    readonly code: 'connect-failed' | 'connect-timeout' | 'closed' | 'framing' | 'digest' | 'malformed' | 'timeout' | 'protocol',
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export interface Portal {
  host: string;
  port: number;
}

/** Parses "host:port", "[v6]:port" or a bare host (port 3260). */
export function parsePortal(text: string): Portal {
  const t = text.trim();
  if (t.startsWith('[')) {
    const end = t.indexOf(']');
    if (end < 0) throw new RangeError(`bad portal ${JSON.stringify(text)}`);
    const host = t.slice(1, end);
    const rest = t.slice(end + 1);
    const port = rest.startsWith(':') ? Number(rest.slice(1)) : 3260;
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`bad portal ${JSON.stringify(text)}`);
    return { host, port };
  }
  const colon = t.lastIndexOf(':');
  // More than one colon without brackets: a bare IPv6 address.
  if (colon < 0 || t.indexOf(':') !== colon) return { host: t, port: 3260 };
  const port = Number(t.slice(colon + 1));
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`bad portal ${JSON.stringify(text)}`);
  return { host: t.slice(0, colon), port };
}

export function formatPortal(p: Portal): string {
  return p.host.includes(':') ? `[${p.host}]:${p.port}` : `${p.host}:${p.port}`;
}

export interface OpenOptions {
  portal: Portal;
  localAddress?: string;
  timeoutMs: number;
}

/**
 * One TCP connection to a target: PDU framing on the way in (see Receiver), encoding on the way
 * out. During login the owner pulls Login Responses one at a time (receiveLoginPdu); in full
 * feature phase every PDU goes synchronously to the handler as soon as it is complete.
 */
export class InitiatorConnection {
  readonly socket: net.Socket;
  readonly portal: Portal;
  private readonly rx: PduReceiver;
  private digests: DigestSettings = NO_DIGESTS;
  private mode: 'login' | 'full-feature' | 'closed' = 'login';
  private corked = false;
  private loginQueue: TargetPdu[] = [];
  private waiter: { resolve: (p: TargetPdu) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;
  private handler: ((pdu: TargetPdu) => void) | undefined;
  private closeError: Error | undefined;
  private closeListeners: Array<(err: Error) => void> = [];
  /** PDUs received, for idle detection without a clock read per PDU. */
  rxCount = 0;

  private constructor(socket: net.Socket, portal: Portal, rx: PduReceiver) {
    this.socket = socket;
    this.portal = portal;
    this.rx = rx;
    socket.setNoDelay(true);
    socket.on('error', (err) => this.fail(new ConnectionError(`connection to ${formatPortal(portal)}: ${err.message}`, 'closed', { cause: err })));
    socket.on('close', () => this.fail(new ConnectionError(`connection to ${formatPortal(portal)} closed`, 'closed')));
  }

  static open(opts: OpenOptions): Promise<InitiatorConnection> {
    return new Promise((resolve, reject) => {
      const where = formatPortal(opts.portal);
      // The receiver exists before the socket: Node asks it for the first read buffer as soon as
      // the handle is created. Its PDUs go to whichever connection object it ends up in.
      let conn: InitiatorConnection | undefined;
      const rx = new PduReceiver({ bufferSize: RECEIVE_BUFFER_SIZE });
      rx.onFrame = (frame) => conn?.onFrame(frame);
      rx.onError = (err) => conn?.onWireError(err);
      const socket = net.connect({
        host: opts.portal.host,
        port: opts.portal.port,
        ...(opts.localAddress !== undefined ? { localAddress: opts.localAddress } : {}),
        onread: {
          buffer: () => rx.nextReadBuffer(),
          callback: (n: number) => {
            if (conn) conn.onRead(n);
            return true;
          },
        },
      });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ConnectionError(`connecting to ${where} timed out after ${opts.timeoutMs} ms`, 'connect-timeout'));
      }, opts.timeoutMs);
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(new ConnectionError(`connecting to ${where}: ${err.message}`, 'connect-failed', { cause: err }));
      };
      socket.once('error', onError);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        conn = new InitiatorConnection(socket, opts.portal, rx);
        resolve(conn);
      });
    });
  }

  get closed(): boolean {
    return this.mode === 'closed';
  }

  get localAddress(): string | undefined {
    return this.socket.localAddress;
  }

  /** Called once, with the reason, when the connection ends for any cause. */
  onClose(listener: (err: Error) => void): void {
    if (this.closeError) queueMicrotask(() => listener(this.closeError!));
    else this.closeListeners.push(listener);
  }

  /**
   * Encodes and queues one PDU. Writes issued in the same tick are corked together, so a
   * command and its unsolicited Data-Out, or a burst of Data-Out PDUs, leave in one writev
   * without their payloads being copied.
   */
  send(pdu: PduInit): void {
    if (this.mode === 'closed') throw this.closeError ?? new ConnectionError('connection closed', 'closed');
    const parts = encodePdu(pdu, this.digests);
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    for (const part of parts) this.socket.write(part);
  }

  /** Login phase: the next PDU from the target. */
  receiveLoginPdu(timeoutMs: number): Promise<TargetPdu> {
    if (this.mode !== 'login') return Promise.reject(new Error('receiveLoginPdu outside the login phase'));
    if (this.waiter) return Promise.reject(new Error('a login PDU is already awaited'));
    if (this.closeError) return Promise.reject(this.closeError);
    const ready = this.pullLoginPdu();
    if (ready) return Promise.resolve(ready);
    if (this.closeError) return Promise.reject(this.closeError);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new ConnectionError(`no Login Response within ${timeoutMs} ms`, 'timeout'));
      }, timeoutMs);
      this.waiter = { resolve, reject, timer };
    });
  }

  /**
   * Switches to full feature phase right after the final Login Response: digests apply from the
   * next PDU in both directions (RFC 7143 13.1), and incoming data segments may now be as long
   * as the MaxRecvDataSegmentLength we declared. `sink` places incoming payloads (see
   * PayloadSink).
   */
  enterFullFeature(digests: DigestSettings, maxRecvDataSegmentLength: number, handler: (pdu: TargetPdu) => void, sink?: PayloadSink): void {
    if (this.mode === 'closed') return; // the close listeners report it
    if (this.mode !== 'login') throw new Error('enterFullFeature twice');
    this.digests = { headerDigest: digests.headerDigest, dataDigest: digests.dataDigest };
    this.rx.headerDigest = digests.headerDigest;
    this.rx.dataDigest = digests.dataDigest;
    this.rx.maxRecvDataSegmentLength = maxRecvDataSegmentLength;
    this.rx.sink = sink;
    this.handler = handler;
    this.mode = 'full-feature';
    // PDUs that arrived together with the final Login Response, parsed now with the new settings.
    const early = this.loginQueue;
    this.loginQueue = [];
    for (const pdu of early) {
      if (this.mode !== 'full-feature') return;
      handler(pdu);
    }
    this.rx.startStreaming();
  }

  close(err?: Error): void {
    this.fail(err ?? new ConnectionError('connection closed locally', 'closed'));
  }

  private onRead(n: number): void {
    if (this.mode === 'closed') return;
    this.rx.onRead(n);
    if (this.mode === 'login' && this.waiter) {
      const pdu = this.pullLoginPdu();
      if (pdu) {
        const w = this.waiter;
        this.waiter = undefined;
        clearTimeout(w.timer);
        w.resolve(pdu);
      }
    }
  }

  /** Login phase: the next decoded PDU, or undefined when more bytes are needed (or it failed). */
  private pullLoginPdu(): TargetPdu | undefined {
    if (this.loginQueue.length === 0) this.rx.pull();
    return this.loginQueue.shift();
  }

  private onFrame(frame: Frame): void {
    if (this.mode === 'closed') return;
    let pdu;
    try {
      pdu = decodePdu(frame.header, frame.data);
    } catch (err) {
      this.fail(new ConnectionError(`receive: ${(err as Error).message}`, 'malformed', { cause: err }));
      return;
    }
    if (isInitiatorOpcode(pdu.opcode)) {
      this.fail(new ConnectionError(`target sent an initiator opcode 0x${pdu.opcode.toString(16)}`, 'protocol'));
      return;
    }
    this.onPdu(pdu as TargetPdu);
  }

  /**
   * Every receive error ends the connection, a data digest error included: at ErrorRecoveryLevel
   * 0 the only way to recover the lost payload is to drop the connection and re-issue the command.
   */
  private onWireError(err: WireError): void {
    const code = err.kind === 'header-digest' || err.kind === 'data-digest' ? 'digest' : 'framing';
    this.fail(new ConnectionError(`receive: ${err.message}`, code, { cause: err }));
  }

  private onPdu(pdu: TargetPdu): void {
    if (this.mode === 'closed') return;
    this.rxCount++;
    if (this.mode === 'login') this.loginQueue.push(pdu);
    else this.handler!(pdu);
  }

  private fail(err: Error): void {
    if (this.mode === 'closed') return;
    this.mode = 'closed';
    this.closeError = err;
    this.rx.close();
    this.socket.destroy();
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      clearTimeout(w.timer);
      w.reject(err);
    }
    const listeners = this.closeListeners;
    this.closeListeners = [];
    for (const l of listeners) l(err);
  }
}
