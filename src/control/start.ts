import type { Command } from './cli.ts';

// `npm start` runs this. The embedded target, the proxy and the API arrive with later work; until
// then it says plainly what exists, so a new user is not left guessing.
export const startCommand: Command = async () => {
  process.stdout.write(
    [
      'detour: the proxy, the embedded target and the API are not built yet.',
      'What works today:',
      '  npx detour pcap-dump FILE [--port N]   decode iSCSI PDUs from a capture',
      '  npm test                               run the test suite against real tgtd',
      '',
    ].join('\n'),
  );
  return 0;
};
