// Entry point of the `detour` command. Each subcommand lives in its own module and is loaded on
// demand, so `detour pcap-dump` does not pay for the proxy's start-up.

export type Command = (argv: string[]) => Promise<number>;

const commands: Record<string, { summary: string; load: () => Promise<Command> }> = {
  'pcap-dump': {
    summary: 'pcap-dump FILE [--port N]   one JSON line per iSCSI PDU in a pcap/pcapng file',
    load: async () => (await import('../tools/pcap-dump.ts')).pcapDumpCommand,
  },
  serve: {
    summary: 'serve --config FILE        run the proxy',
    load: async () => (await import('./serve.ts')).serveCommand,
  },
  target: {
    summary: 'target --file IMG [--size 1G] [--listen 127.0.0.1:3261] [--iqn IQN]   a file-backed iSCSI target',
    load: async () => (await import('./target-command.ts')).targetCommand,
  },
  backup: {
    summary: 'backup start VOLUME [--label TEXT] [--wait] [--json] | list | show ID | cancel ID   manage backups',
    load: async () => (await import('./commands/backup.ts')).backupCommand,
  },
  sync: {
    summary: 'sync VOLUME [--timeout 10s]   wait until accepted writes have reached the main target',
    load: async () => (await import('./commands/sync.ts')).syncCommand,
  },
  status: {
    summary: 'status [--json]             volumes, sessions and backups in progress',
    load: async () => (await import('./commands/status.ts')).statusCommand,
  },
  restore: {
    summary: 'restore ID --to-file PATH [--store DIR | --config FILE]   write a backup\'s raw image to a file',
    load: async () => (await import('./restore-command.ts')).restoreCommand,
  },
  'target-ctl': {
    summary: 'target-ctl --socket PATH redirect-on HOST PORT | redirect-off | list | kick [SID [CID]]   control an embedded target',
    load: async () => (await import('./target-control.ts')).targetCtlCommand,
  },
  start: {
    summary: 'start                       run detour on embedded defaults (npm start)',
    load: async () => (await import('./start.ts')).startCommand,
  },
};

function usage(): string {
  return ['usage: detour COMMAND [ARGS]', '', 'commands:', ...Object.values(commands).map((c) => `  ${c.summary}`)].join('\n');
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage() + '\n');
    return name === undefined ? 2 : 0;
  }
  const entry = commands[name];
  if (!entry) {
    process.stderr.write(`detour: unknown command '${name}'\n${usage()}\n`);
    return 2;
  }
  try {
    return await (await entry.load())(rest);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`detour ${name}: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
}

/** A bad command-line argument: reported on stderr with exit code 2, never a stack trace. */
export class UsageError extends Error {}
