import net from 'node:net';
import type { Logger } from 'pino';
import type { PduReceiver } from 'iscsi-node-wire';
import { FrontConnection, type ConnectionHost } from './connection.ts';
import { LoginController } from './login.ts';
import { SessionTable } from './session.ts';
import { DEFAULT_LIMITS, type FrontLimits, type FrontTarget, type TargetDirectory } from './types.ts';

export interface PortalOptions {
  host: string;
  port: number;
  targets: FrontTarget[] | TargetDirectory;
  logger: Logger;
  limits?: Partial<FrontLimits>;
  /** Addresses to advertise in SendTargets; defaults to the address the initiator connected to. */
  advertise?: string[];
}

/** A static list of targets, advertised at the portal's own address. */
export class StaticDirectory implements TargetDirectory {
  private readonly byName = new Map<string, FrontTarget>();
  constructor(
    targets: FrontTarget[],
    private readonly advertised: () => string[],
  ) {
    for (const t of targets) this.byName.set(t.name, t);
  }
  get(name: string): FrontTarget | undefined {
    return this.byName.get(name);
  }
  list(): FrontTarget[] {
    return [...this.byName.values()];
  }
  addresses(t: FrontTarget): string[] {
    return this.advertised().map((a) => `${a},${t.portalGroupTag}`);
  }
  add(t: FrontTarget): void {
    this.byName.set(t.name, t);
  }
}

function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * Moves an accepted connection onto a socket that reads into the receiver's own buffer (Node's
 * `onread`), which a server cannot ask for: without it every TCP read allocates a fresh buffer,
 * and at hundreds of MB/s of Data-Out that churn keeps V8 busy with garbage collection. The
 * handle is re-wrapped before its first read (the server pauses new connections). Returns
 * undefined, leaving `accepted` as it is, where the runtime does not allow it.
 */
function readIntoReceiver(accepted: net.Socket, rx: PduReceiver, onRead: (n: number) => void): net.Socket | undefined {
  const internal = accepted as unknown as { _handle?: object | null };
  const handle = internal._handle;
  if (!handle) return undefined;
  let socket: net.Socket;
  try {
    socket = new net.Socket({
      handle,
      readable: true,
      writable: true,
      onread: {
        buffer: () => rx.nextReadBuffer(),
        callback: (n: number) => {
          onRead(n);
          return true;
        },
      },
    } as net.SocketConstructorOpts);
  } catch {
    return undefined;
  }
  internal._handle = null;
  // The server counts the socket it created; it is released when ours closes.
  socket.once('close', () => accepted.destroy());
  return socket;
}

/** An iSCSI network portal: a TCP listener whose connections log in to the directory's targets. */
export class Portal implements ConnectionHost {
  readonly sessions = new SessionTable();
  readonly connections = new Set<FrontConnection>();
  readonly limits: FrontLimits;
  readonly directory: TargetDirectory;
  readonly logger: Logger;
  private readonly server: net.Server;
  private boundPort = 0;

  constructor(private readonly opts: PortalOptions) {
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.logger = opts.logger;
    this.directory = Array.isArray(opts.targets)
      ? new StaticDirectory(opts.targets, () => opts.advertise ?? [formatHostPort(opts.host, this.boundPort)])
      : opts.targets;
    // Paused: the socket is handed to a reader of our own before a byte is read (accept()).
    this.server = net.createServer({ pauseOnConnect: true }, (socket) => this.accept(socket));
    this.server.on('error', (err) => this.logger.error({ err }, 'portal listener error'));
  }

  get port(): number {
    return this.boundPort;
  }

  get address(): string {
    return formatHostPort(this.opts.host, this.boundPort);
  }

  async listen(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      this.server.once('error', onError);
      this.server.listen({ host: this.opts.host, port: this.opts.port }, () => {
        this.server.off('error', onError);
        resolve();
      });
    });
    this.boundPort = (this.server.address() as net.AddressInfo).port;
    this.logger.info({ portal: this.address }, 'portal listening');
  }

  newLogin(conn: FrontConnection): LoginController {
    return new LoginController(conn, this);
  }

  onSessionEvent(event: 'login' | 'logout', conn: FrontConnection): void {
    const s = conn.session;
    if (!s) return;
    if (event === 'logout') {
      s.connections.delete(conn);
      if (s.connections.size === 0 && !s.closed) {
        s.closed = true;
        s.dropPending();
        this.sessions.remove(s);
        if (!s.discovery) void s.target?.device.nexusClosed?.(s.nexus);
        this.logger.info({ ...s.target?.logFields, initiator: s.initiatorName, tsih: s.tsih, target: s.target?.name }, 'session ended');
      }
    }
  }

  private accept(accepted: net.Socket): void {
    const rx = FrontConnection.newReceiver(this);
    let conn: FrontConnection | undefined;
    const socket = readIntoReceiver(accepted, rx, (n) => conn?.onRead(n));
    conn = socket ? new FrontConnection(socket, this, rx) : new FrontConnection(accepted, this);
    const c = conn;
    this.connections.add(c);
    c.socket.once('close', () => this.connections.delete(c));
    c.socket.resume();
  }

  private serverClosed: Promise<void> | undefined;

  /**
   * Stops taking new connections; the ones open keep working (a shutdown lets their commands in
   * flight finish). The listener is fully closed only once they are gone too.
   */
  stopListening(): void {
    this.serverClosed ??= new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Stops listening and drops every connection. */
  async close(): Promise<void> {
    this.stopListening();
    for (const c of this.connections) c.close();
    await this.serverClosed;
  }
}
