import net from 'node:net';
import {
  decodePdu,
  encodePdu,
  isInitiatorOpcode,
  NO_DIGESTS,
  PduFramer,
  type DigestSettings,
  type PduInit,
  type TargetPdu,
} from 'iscsi-node-wire';

/** RFC 7143 13.12: every Login PDU is limited to 8192 bytes of data, whatever is declared later. */
const LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH = 8192;

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
 * One TCP connection to a target: PDU framing on the way in, encoding on the way out.
 *
 * During login the owner pulls Login Responses one at a time (receiveLoginPdu): the framer keeps
 * anything behind the final response until enterFullFeature() has switched the digests and the
 * receive limit, so the first full-feature PDU is never parsed with login-phase settings even
 * when it arrived in the same TCP segment. In full feature phase every PDU goes synchronously to
 * the handler as soon as it is complete.
 */
export class InitiatorConnection {
  readonly socket: net.Socket;
  readonly portal: Portal;
  private readonly framer = new PduFramer({ maxRecvDataSegmentLength: LOGIN_MAX_RECV_DATA_SEGMENT_LENGTH });
  private digests: DigestSettings = NO_DIGESTS;
  private mode: 'login' | 'full-feature' | 'closed' = 'login';
  private corked = false;
  private waiter: { resolve: (p: TargetPdu) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;
  private handler: ((pdu: TargetPdu) => void) | undefined;
  private closeError: Error | undefined;
  private closeListeners: Array<(err: Error) => void> = [];
  /** PDUs received, for idle detection without a clock read per PDU. */
  rxCount = 0;

  private constructor(socket: net.Socket, portal: Portal) {
    this.socket = socket;
    this.portal = portal;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.fail(new ConnectionError(`connection to ${formatPortal(portal)}: ${err.message}`, 'closed', { cause: err })));
    socket.on('close', () => this.fail(new ConnectionError(`connection to ${formatPortal(portal)} closed`, 'closed')));
  }

  static open(opts: OpenOptions): Promise<InitiatorConnection> {
    return new Promise((resolve, reject) => {
      const where = formatPortal(opts.portal);
      const socket = net.connect({
        host: opts.portal.host,
        port: opts.portal.port,
        ...(opts.localAddress !== undefined ? { localAddress: opts.localAddress } : {}),
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
        resolve(new InitiatorConnection(socket, opts.portal));
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
    const ready = this.pullOne();
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
   * as the MaxRecvDataSegmentLength we declared.
   */
  enterFullFeature(digests: DigestSettings, maxRecvDataSegmentLength: number, handler: (pdu: TargetPdu) => void): void {
    if (this.mode === 'closed') return; // the close listeners report it
    if (this.mode !== 'login') throw new Error('enterFullFeature twice');
    this.digests = { headerDigest: digests.headerDigest, dataDigest: digests.dataDigest };
    this.framer.headerDigest = digests.headerDigest;
    this.framer.dataDigest = digests.dataDigest;
    this.framer.maxRecvDataSegmentLength = maxRecvDataSegmentLength;
    this.handler = handler;
    this.mode = 'full-feature';
    // PDUs that arrived together with the final Login Response.
    if (this.framer.bufferedBytes > 0) this.deliverAll();
  }

  close(err?: Error): void {
    this.fail(err ?? new ConnectionError('connection closed locally', 'closed'));
  }

  private onData(chunk: Buffer): void {
    if (this.mode === 'closed') return;
    this.framer.push(chunk);
    if (this.mode === 'full-feature') {
      this.deliverAll();
    } else if (this.waiter) {
      const pdu = this.pullOne();
      if (pdu) {
        const w = this.waiter;
        this.waiter = undefined;
        clearTimeout(w.timer);
        w.resolve(pdu);
      }
    }
  }

  /** Next decoded PDU, or undefined when more bytes are needed (or the connection failed). */
  private pullOne(): TargetPdu | undefined {
    const out = this.framer.next();
    if (!out) return undefined;
    if (out.error) {
      // A data digest error leaves the stream in sync, but at ErrorRecoveryLevel 0 the only way
      // to recover the lost payload is to drop the connection and re-issue the command.
      const code = out.error.kind === 'data-digest' || out.error.kind === 'header-digest' ? 'digest' : 'framing';
      this.fail(new ConnectionError(`receive: ${out.error.message}`, code, { cause: out.error }));
      return undefined;
    }
    let pdu;
    try {
      pdu = decodePdu(out.frame.header, out.frame.data);
    } catch (err) {
      this.fail(new ConnectionError(`receive: ${(err as Error).message}`, 'malformed', { cause: err }));
      return undefined;
    }
    if (isInitiatorOpcode(pdu.opcode)) {
      this.fail(new ConnectionError(`target sent an initiator opcode 0x${pdu.opcode.toString(16)}`, 'protocol'));
      return undefined;
    }
    this.rxCount++;
    return pdu as TargetPdu;
  }

  private deliverAll(): void {
    const handler = this.handler!;
    while (this.mode === 'full-feature') {
      const pdu = this.pullOne();
      if (!pdu) return;
      handler(pdu);
    }
  }

  private fail(err: Error): void {
    if (this.mode === 'closed') return;
    this.mode = 'closed';
    this.closeError = err;
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
