// The HTTP API and /metrics (CONTRACT.md, "HTTP API"). Plain node:http: seven routes do not
// need a framework, and every byte of input is checked here before the engine sees it.

import { createHash, timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import { ConflictError, NotFoundError, TimeoutError, type DetourEngine } from './model.ts';

/** Request bodies are a handful of small fields; anything bigger is a mistake or an attack. */
export const MAX_BODY_BYTES = 64 * 1024;
/** Sync timeout when the request gives none (the CLI's default is the same). */
export const DEFAULT_SYNC_TIMEOUT_MS = 10_000;
/** An hour: longer than any sane wait for the journal to drain, and far below timer overflow. */
export const MAX_SYNC_TIMEOUT_MS = 3_600_000;
export const MAX_LABEL_LENGTH = 256;

export interface ApiServerOptions {
  host: string;
  port: number;
  engine: DetourEngine;
  registry: Registry;
  /** When set, every endpoint but /healthz requires `Authorization: Bearer <token>`. */
  token?: string;
  logger: Logger;
}

export interface RunningApiServer {
  /** "host:port" as bound (the real port when 0 was asked for). */
  address: string;
  port: number;
  /** Base URL for clients, e.g. http://127.0.0.1:9270 */
  url: string;
  close(): Promise<void>;
}

/** 127.0.0.0/8, ::1 (and its IPv4-mapped forms), and the name localhost. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (h === 'localhost' || h === 'localhost.') return true;
  const family = net.isIP(h);
  if (family === 0) return false;
  const loopback = new net.BlockList();
  loopback.addSubnet('127.0.0.0', 8, 'ipv4');
  loopback.addAddress('::1', 'ipv6');
  return loopback.check(h, family === 6 ? 'ipv6' : 'ipv4');
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

type Handler = (req: http.IncomingMessage, params: string[]) => Promise<Reply>;

interface Reply {
  status: number;
  body: unknown;
  /** Set for non-JSON answers (/metrics); body is then sent as it is. */
  contentType?: string;
}

interface Route {
  pattern: RegExp;
  methods: Partial<Record<'GET' | 'POST', Handler>>;
}

function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

export async function startApiServer(opts: ApiServerOptions): Promise<RunningApiServer> {
  const { engine, registry, logger } = opts;
  const token = opts.token === '' ? undefined : opts.token;
  if (token === undefined && !isLoopbackHost(opts.host)) {
    throw new Error(
      `refusing to serve the API on ${formatHostPort(opts.host, opts.port)} without a token: ` +
        'a non-loopback address needs `token` in the config (or bind api to 127.0.0.1)',
    );
  }
  // Comparing digests keeps the comparison constant-time whatever the length of the offered token.
  const tokenDigest = token === undefined ? undefined : createHash('sha256').update(token).digest();

  const routes: Route[] = [
    { pattern: /^\/healthz$/, methods: { GET: async () => ({ status: 200, body: { ok: true } }) } },
    {
      pattern: /^\/metrics$/,
      methods: { GET: async () => ({ status: 200, body: await registry.metrics(), contentType: registry.contentType }) },
    },
    { pattern: /^\/v1\/volumes$/, methods: { GET: async () => ({ status: 200, body: engine.volumes() }) } },
    {
      pattern: /^\/v1\/volumes\/([^/]+)\/backups$/,
      methods: {
        POST: async (req, [name]) => {
          const body = await readJsonObject(req);
          const label = body.label;
          if (label !== undefined && label !== null && typeof label !== 'string') throw new HttpError(400, 'label must be a string');
          if (typeof label === 'string' && label.length > MAX_LABEL_LENGTH) {
            throw new HttpError(400, `label must be at most ${MAX_LABEL_LENGTH} characters`);
          }
          requireVolume(engine, name!);
          const backup = await engine.startBackup(name!, typeof label === 'string' ? { label } : {});
          logger.info({ volume: backup.volume, backupId: backup.id, phase: backup.phase, label: backup.label }, 'backup started');
          return { status: 202, body: backup };
        },
      },
    },
    {
      pattern: /^\/v1\/volumes\/([^/]+)\/sync$/,
      methods: {
        POST: async (req, [name]) => {
          const body = await readJsonObject(req);
          const t = body.timeoutMs;
          if (t !== undefined && t !== null && (typeof t !== 'number' || !Number.isFinite(t) || t < 0 || t > MAX_SYNC_TIMEOUT_MS)) {
            throw new HttpError(400, `timeoutMs must be a number of milliseconds from 0 to ${MAX_SYNC_TIMEOUT_MS}`);
          }
          requireVolume(engine, name!);
          const timeoutMs = typeof t === 'number' ? Math.round(t) : DEFAULT_SYNC_TIMEOUT_MS;
          const result = await engine.sync(name!, timeoutMs);
          return { status: 200, body: { reflectedSeq: result.reflectedSeq } };
        },
      },
    },
    { pattern: /^\/v1\/backups$/, methods: { GET: async () => ({ status: 200, body: engine.listBackups() }) } },
    {
      pattern: /^\/v1\/backups\/([^/]+)$/,
      methods: {
        GET: async (_req, [id]) => {
          const backup = engine.getBackup(id!);
          if (!backup) throw new HttpError(404, `no backup '${id}'`);
          return { status: 200, body: backup };
        },
      },
    },
    {
      pattern: /^\/v1\/backups\/([^/]+)\/cancel$/,
      methods: {
        POST: async (req, [id]) => {
          // The body is optional and carries nothing yet, but it must still be well-formed.
          await readJsonObject(req);
          const backup = engine.getBackup(id!);
          if (!backup) throw new HttpError(404, `no backup '${id}'`);
          await engine.cancelBackup(id!);
          logger.info({ volume: backup.volume, backupId: backup.id, phase: backup.phase }, 'backup cancel requested');
          return { status: 202, body: { id, cancelRequested: true } };
        },
      },
    },
  ];

  function authorized(req: http.IncomingMessage): boolean {
    if (tokenDigest === undefined) return true;
    const m = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(req.headers.authorization ?? '');
    if (!m) return false;
    return timingSafeEqual(createHash('sha256').update(m[1]!).digest(), tokenDigest);
  }

  async function handle(req: http.IncomingMessage): Promise<Reply> {
    let pathname: string;
    try {
      pathname = new URL(req.url ?? '/', 'http://detour').pathname;
    } catch {
      throw new HttpError(400, 'bad request target');
    }
    if (pathname.length > 1 && pathname.endsWith('/')) pathname = pathname.slice(0, -1);
    if (pathname !== '/healthz' && !authorized(req)) {
      throw new HttpError(401, 'authentication required: send Authorization: Bearer <token>', { 'WWW-Authenticate': 'Bearer realm="detour"' });
    }
    for (const route of routes) {
      const m = route.pattern.exec(pathname);
      if (!m) continue;
      let params: string[];
      try {
        params = m.slice(1).map((p) => decodeURIComponent(p));
      } catch {
        throw new HttpError(400, 'bad percent-encoding in path');
      }
      const method = req.method === 'HEAD' ? 'GET' : req.method;
      const handler = route.methods[method as 'GET' | 'POST'];
      if (!handler) {
        const allow = Object.keys(route.methods).join(', ');
        throw new HttpError(405, `${req.method} is not allowed on ${pathname} (allowed: ${allow})`, { Allow: allow });
      }
      return handler(req, params);
    }
    throw new HttpError(404, `no such endpoint: ${pathname}`);
  }

  function send(res: http.ServerResponse, reply: Reply, headers: Record<string, string> = {}): void {
    const text = reply.contentType ? String(reply.body) : JSON.stringify(reply.body) + '\n';
    res.writeHead(reply.status, {
      'Content-Type': reply.contentType ?? 'application/json; charset=utf-8',
      'Content-Length': Buffer.byteLength(text),
      'Cache-Control': 'no-store',
      ...headers,
    });
    res.end(text);
  }

  const server = http.createServer((req, res) => {
    const started = process.hrtime.bigint();
    handle(req)
      .then(
        (reply) => send(res, reply),
        (err: unknown) => {
          const { status, message, headers } = toHttpError(err);
          if (status >= 500 && status !== 504) logger.error({ err, method: req.method, path: safePath(req) }, 'API request failed');
          // An unread request body (413, or an early error) would otherwise keep the connection
          // busy; close it after the answer.
          const extra: Record<string, string> = { ...headers };
          if (!req.complete) extra.Connection = 'close';
          send(res, { status, body: { error: message } }, extra);
          if (!req.complete) req.resume();
        },
      )
      .catch((err: unknown) => {
        // Only reached if writing the answer itself failed (socket gone): nothing left to tell.
        logger.debug({ err }, 'API response not delivered');
      })
      .finally(() => {
        const ms = Number(process.hrtime.bigint() - started) / 1e6;
        logger.debug({ method: req.method, path: safePath(req), status: res.statusCode, ms: Math.round(ms * 10) / 10 }, 'API request');
      });
  });
  // Slow clients must not hold sockets for ever; sync answers may take long, but the request
  // itself is small.
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  server.on('clientError', (err, socket) => {
    logger.debug({ err: (err as Error).message }, 'malformed HTTP request');
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
    else socket.destroy();
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: opts.host, port: opts.port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => logger.error({ err }, 'API listener error'));
  const bound = server.address() as net.AddressInfo;
  const address = formatHostPort(bound.address, bound.port);
  logger.info({ api: address, auth: tokenDigest ? 'bearer' : 'none' }, 'API listening');

  return {
    address,
    port: bound.port,
    url: `http://${address}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function requireVolume(engine: DetourEngine, name: string): void {
  if (!engine.volumes().some((v) => v.name === name)) throw new HttpError(404, `no volume '${name}'`);
}

/** The path without the query string: queries could carry anything, and logs must stay clean. */
function safePath(req: http.IncomingMessage): string {
  return (req.url ?? '').split('?')[0]!.slice(0, 200);
}

function toHttpError(err: unknown): { status: number; message: string; headers: Record<string, string> } {
  if (err instanceof HttpError) return { status: err.status, message: err.message, headers: err.headers };
  const message = err instanceof Error ? err.message : String(err);
  if (err instanceof ConflictError) return { status: 409, message, headers: {} };
  if (err instanceof NotFoundError) return { status: 404, message, headers: {} };
  if (err instanceof TimeoutError) return { status: 504, message, headers: {} };
  return { status: 500, message: `internal error: ${message}`, headers: {} };
}

/** Reads a JSON object body of at most MAX_BODY_BYTES; an empty body is `{}`. */
async function readJsonObject(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > MAX_BODY_BYTES) {
    throw new HttpError(413, `request body over ${MAX_BODY_BYTES} bytes`);
  }
  // Listeners rather than async iteration: leaving a for-await loop early destroys the socket,
  // and the client would never see the 413.
  const chunks = await new Promise<Buffer[]>((resolve, reject) => {
    const parts: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        cleanup();
        reject(new HttpError(413, `request body over ${MAX_BODY_BYTES} bytes`));
        return;
      }
      parts.push(chunk);
    };
    const onEnd = () => {
      cleanup();
      resolve(parts);
    };
    const onError = (err: Error) => {
      cleanup();
      reject(new HttpError(400, `cannot read request body: ${err.message}`));
    };
    // A client that goes away mid-body must not leave the request pending for ever.
    const onClose = () => {
      cleanup();
      reject(new HttpError(400, 'request body cut short'));
    };
    const cleanup = () => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('close', onClose);
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('close', onClose);
  });
  const text = Buffer.concat(chunks).toString('utf8').trim();
  if (text === '') return {};
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new HttpError(400, `body is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new HttpError(400, 'body must be a JSON object');
  return value as Record<string, unknown>;
}
