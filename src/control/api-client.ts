// Client side of the HTTP API, for the `detour` subcommands that talk to a running `detour serve`
// (backup, sync, status). Errors carry the sentence an administrator should read; the commands
// print it and exit 1.

import { UsageError } from './cli.ts';
import type { BackupObject, VolumeView } from './model.ts';

export const DEFAULT_API_URL = 'http://127.0.0.1:9270';
/** Ordinary requests are quick; a server that does not answer within this is stuck. */
const REQUEST_TIMEOUT_MS = 30_000;

/** The options every client command accepts, in node:util parseArgs form. */
export const CLIENT_OPTIONS = {
  api: { type: 'string' },
  token: { type: 'string' },
} as const;

/** A failure to report to the user (exit code 1): unreachable server, refused token, API error. */
export class ClientError extends Error {
  constructor(
    message: string,
    /** HTTP status when the server answered, undefined when it could not be reached. */
    readonly status?: number,
  ) {
    super(message);
  }
}

export interface ApiClientOptions {
  /** Base URL, e.g. http://127.0.0.1:9270 */
  url: string;
  token?: string;
}

/**
 * "http://host:port", or "host:port" (http is assumed). Anything else is a usage error, found
 * before any request is sent.
 */
export function normalizeApiUrl(text: string): string {
  const raw = text.trim();
  const hasScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw);
  let url: URL;
  try {
    if (!hasScheme && raw.includes('/')) throw new Error('no scheme');
    url = new URL(hasScheme ? raw : `http://${raw}`);
    if (url.hostname === '') throw new Error('no host');
  } catch {
    throw new UsageError(`--api: '${text}' is not a URL (example: http://127.0.0.1:9270)`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new UsageError(`--api: '${text}' must be an http:// or https:// URL`);
  if (url.username || url.password) throw new UsageError('--api: put the token in --token or DETOUR_TOKEN, not in the URL');
  return url.origin + url.pathname.replace(/\/+$/, '');
}

/** Applies the contract's defaults: --api, else $DETOUR_API, else http://127.0.0.1:9270; --token, else $DETOUR_TOKEN. */
export function clientFromArgs(values: { api?: string; token?: string }, env: NodeJS.ProcessEnv = process.env): ApiClient {
  const api = values.api ?? (env.DETOUR_API || undefined) ?? DEFAULT_API_URL;
  const token = values.token ?? (env.DETOUR_TOKEN || undefined);
  return new ApiClient({ url: normalizeApiUrl(api), token });
}

export class ApiClient {
  readonly url: string;
  readonly #token: string | undefined;

  constructor(opts: ApiClientOptions) {
    this.url = opts.url.replace(/\/+$/, '');
    this.#token = opts.token === '' ? undefined : opts.token;
  }

  health(): Promise<{ ok: boolean }> {
    return this.request('GET', '/healthz');
  }

  volumes(): Promise<VolumeView[]> {
    return this.request('GET', '/v1/volumes');
  }

  startBackup(volume: string, opts: { label?: string } = {}): Promise<BackupObject> {
    return this.request('POST', `/v1/volumes/${encodeURIComponent(volume)}/backups`, opts.label === undefined ? {} : { label: opts.label });
  }

  listBackups(): Promise<BackupObject[]> {
    return this.request('GET', '/v1/backups');
  }

  getBackup(id: string): Promise<BackupObject> {
    return this.request('GET', `/v1/backups/${encodeURIComponent(id)}`);
  }

  async cancelBackup(id: string): Promise<void> {
    await this.request('POST', `/v1/backups/${encodeURIComponent(id)}/cancel`, {});
  }

  sync(volume: string, timeoutMs: number): Promise<{ reflectedSeq: number }> {
    // The server gives up at timeoutMs and answers 504; the margin lets that answer arrive.
    return this.request('POST', `/v1/volumes/${encodeURIComponent(volume)}/sync`, { timeoutMs }, timeoutMs + REQUEST_TIMEOUT_MS);
  }

  async request<T>(method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = REQUEST_TIMEOUT_MS): Promise<T> {
    const headers: Record<string, string> = { Accept: 'application/json' };
    if (this.#token !== undefined) headers.Authorization = `Bearer ${this.#token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res: Response;
    try {
      res = await fetch(this.url + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      throw this.networkError(err);
    }
    let text: string;
    try {
      text = await res.text();
    } catch (err) {
      throw this.networkError(err);
    }
    let parsed: unknown;
    try {
      parsed = text === '' ? undefined : JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    if (res.status === 401) {
      throw new ClientError(
        this.#token === undefined
          ? 'authentication required: pass --token or set DETOUR_TOKEN'
          : 'authentication required: detour rejected the token; pass the right one with --token or DETOUR_TOKEN',
        401,
      );
    }
    if (!res.ok) {
      const reason =
        typeof parsed === 'object' && parsed !== null && typeof (parsed as { error?: unknown }).error === 'string'
          ? (parsed as { error: string }).error
          : `${res.status} ${res.statusText}`.trim();
      throw new ClientError(reason, res.status);
    }
    if (parsed === undefined && text !== '') throw new ClientError(`detour at ${this.url} answered ${method} ${path} with something that is not JSON`, res.status);
    return parsed as T;
  }

  private networkError(err: unknown): ClientError {
    const e = err as Error & { cause?: { code?: string; message?: string } };
    if (e.name === 'TimeoutError' || e.name === 'AbortError') return new ClientError(`detour at ${this.url} did not answer in time`);
    const detail = e.cause?.code ?? e.cause?.message ?? e.message;
    return new ClientError(`cannot reach detour at ${this.url}: is \`detour serve\` running? (${detail})`);
  }
}

/** Runs a client command body, turning ClientError into a message on stderr and exit code 1. */
export async function reportClientErrors(command: string, body: () => Promise<number>): Promise<number> {
  try {
    return await body();
  } catch (err) {
    if (err instanceof ClientError) {
      process.stderr.write(`detour ${command}: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}
