// `detour status [--json]`: volumes, their sessions, and the backups in progress.

import type { Command } from '../cli.ts';
import { UsageError } from '../cli.ts';
import { parseCommandArgs } from '../args.ts';
import { CLIENT_OPTIONS, clientFromArgs, reportClientErrors } from '../api-client.ts';
import type { BackupObject, VolumeView } from '../model.ts';
import { formatBytes, formatTable, formatTime } from './format.ts';

const HELP = `usage: detour status [--json]

Shows each volume (topology, backup phase), its iSCSI sessions, and the backups in progress.

  --json            print one object: {"volumes": [...], "backups": [...]} (backups in progress)
  --api URL         detour's API (default $DETOUR_API, else http://127.0.0.1:9270)
  --token T         bearer token (default $DETOUR_TOKEN)
`;

export const statusCommand: Command = async (argv) => {
  const { values, positionals } = parseCommandArgs(argv, { ...CLIENT_OPTIONS, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  if (positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}'`);
  const client = clientFromArgs(values);
  return reportClientErrors('status', async () => {
    const [volumes, all] = await Promise.all([client.volumes(), client.listBackups()]);
    const backups = all.filter((b) => b.state === 'running');
    if (values.json) {
      process.stdout.write(JSON.stringify({ volumes, backups }) + '\n');
    } else {
      process.stdout.write(renderStatus(volumes, backups));
    }
    return 0;
  });
};

export function renderStatus(volumes: VolumeView[], backups: BackupObject[]): string {
  const out: string[] = [];
  out.push(
    formatTable(
      ['VOLUME', 'TARGET', 'TOPOLOGY', 'PHASE', 'SESSIONS'],
      volumes.map((v) => [v.name, v.target, v.topology, v.phase, String(v.sessions.length)]),
    ),
  );
  const sessions = volumes.flatMap((v) => v.sessions.map((s) => [v.name, s.initiator, s.isid, String(s.tsih), s.mode]));
  out.push('');
  out.push(sessions.length ? formatTable(['VOLUME', 'INITIATOR', 'ISID', 'TSIH', 'MODE'], sessions) : 'no sessions');
  out.push('');
  out.push(
    backups.length
      ? formatTable(
          ['BACKUP', 'VOLUME', 'PHASE', 'COPIED', 'JOURNAL', 'STARTED'],
          backups.map((b) => [
            b.id,
            b.volume,
            b.phase,
            `${formatBytes(b.bytesCopied)}/${formatBytes(b.bytesTotal)}`,
            `${b.journal.unreflected}/${b.journal.records}`,
            formatTime(b.startedAt),
          ]),
        )
      : 'no backup in progress',
  );
  return out.join('\n') + '\n';
}
