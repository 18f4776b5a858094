// The config file of a `detour serve` under test: one volume in front of a tgtd, detour's portal on
// 127.0.0.2 (tgt does not redirect a login coming from the redirect address itself), its API on
// 127.0.0.1, both on free ports.
import fs from 'node:fs';
import path from 'node:path';
import { freePort } from './ports.ts';

export interface TestVolume {
  name: string;
  /** The main target's IQN. */
  target: string;
  /** The main target's portal, host:port. */
  main: string;
  topology: 'inline' | 'proxy-directed' | 'main-directed';
  /** A tgt control adapter: the target's tid and tgtd's -C control port. */
  tgt?: { tid: number; controlPort: number };
  /** Further volume keys, written as given (`ioTimeoutBudget: '5s'`). */
  keys?: Record<string, string | number>;
}

export interface TestConfig {
  /** The YAML file. */
  file: string;
  portalHost: string;
  portalPort: number;
  /** host:port */
  portal: string;
  apiHost: string;
  apiPort: number;
  /** http://host:port */
  api: string;
  dataDir: string;
}

export async function writeDetourConfig(
  dir: string,
  volume: TestVolume,
  o: { fileName?: string; dataDir?: string; portalHost?: string; apiHost?: string } = {},
): Promise<TestConfig> {
  const portalHost = o.portalHost ?? '127.0.0.2';
  const apiHost = o.apiHost ?? '127.0.0.1';
  const portalPort = await freePort(portalHost);
  const apiPort = await freePort(apiHost);
  const dataDir = o.dataDir ?? path.join(dir, 'data');
  const file = path.join(dir, o.fileName ?? 'detour.yaml');
  fs.writeFileSync(
    file,
    [
      `portal: ${portalHost}:${portalPort}`,
      `api: ${apiHost}:${apiPort}`,
      `dataDir: ${dataDir}`,
      'volumes:',
      `  - name: ${volume.name}`,
      `    target: ${volume.target}`,
      `    main: ${volume.main}`,
      `    topology: ${volume.topology}`,
      ...(volume.tgt ? [`    control: { type: tgt, tid: ${volume.tgt.tid}, controlPort: ${volume.tgt.controlPort} }`] : []),
      ...Object.entries(volume.keys ?? {}).map(([k, v]) => `    ${k}: ${v}`),
      '',
    ].join('\n'),
  );
  return {
    file,
    portalHost,
    portalPort,
    portal: `${portalHost}:${portalPort}`,
    apiHost,
    apiPort,
    api: `http://${apiHost}:${apiPort}`,
    dataDir,
  };
}
