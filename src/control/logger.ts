import pino, { type Logger } from 'pino';

/**
 * JSON lines on stdout by default (one object per event, as operators' log shippers expect);
 * DETOUR_LOG_LEVEL sets the level. Secrets never reach the logger: callers pass names, not
 * credentials, and the redaction list below is a second line of defence.
 */
export function createLogger(name: string, level = process.env.DETOUR_LOG_LEVEL ?? 'info'): Logger {
  return pino({
    name,
    level,
    base: { pid: process.pid },
    redact: { paths: ['secret', 'password', 'token', '*.secret', '*.password', '*.token', 'chap.secret'], censor: '[redacted]' },
  });
}
