// `detour sync VOLUME [--timeout 10s]`: waits until every write accepted before the call has
// reached the main target, e.g. before a snapshot of the main target's storage is taken.

import type { Command } from '../cli.ts';
import { UsageError } from '../cli.ts';
import { parseCommandArgs } from '../args.ts';
import { parseDuration } from '../config.ts';
import { CLIENT_OPTIONS, ClientError, clientFromArgs, reportClientErrors } from '../api-client.ts';
import { DEFAULT_SYNC_TIMEOUT_MS, MAX_SYNC_TIMEOUT_MS } from '../api-server.ts';

const USAGE = 'sync VOLUME [--timeout 10s] [--json]';

const HELP = `usage: detour ${USAGE}

Returns when every write accepted for VOLUME before the call has reached the main target, and
prints the journal sequence number reflected so far.

  --timeout DUR     give up after DUR (default 10s; examples: 500ms, 30s, 2m)
  --json            print {"reflectedSeq": N}
  --api URL         detour's API (default $DETOUR_API, else http://127.0.0.1:9270)
  --token T         bearer token (default $DETOUR_TOKEN)

Exit status: 0 synced, 1 timed out or API error, 2 bad arguments.
`;

export const syncCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, {
    ...CLIENT_OPTIONS,
    timeout: { type: 'string' },
    json: { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  if (positionals.length === 0) throw new UsageError(`VOLUME is required\nusage: detour ${USAGE}`);
  if (positionals.length > 1) throw new UsageError(`unexpected argument '${positionals[1]}'`);
  const volume = positionals[0]!;
  let timeoutMs = DEFAULT_SYNC_TIMEOUT_MS;
  if (values.timeout !== undefined) {
    const ms = parseDuration(values.timeout);
    if (ms === undefined || ms > MAX_SYNC_TIMEOUT_MS) {
      throw new UsageError(`--timeout: '${values.timeout}' is not a duration up to 1h (examples: 500ms, 10s, 2m)`);
    }
    timeoutMs = ms;
  }
  const client = clientFromArgs(values);
  return reportClientErrors('sync', async () => {
    try {
      const { reflectedSeq } = await client.sync(volume, timeoutMs);
      process.stdout.write(values.json ? JSON.stringify({ reflectedSeq }) + '\n' : `${reflectedSeq}\n`);
      return 0;
    } catch (err) {
      if (err instanceof ClientError && err.status === 504) {
        throw new ClientError(`${volume}: writes not yet on the main target after ${values.timeout ?? '10s'} (${err.message})`, 504);
      }
      throw err;
    }
  });
};
