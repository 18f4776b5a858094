#!/usr/bin/env node
// The tests run against real peers (tgtd, libiscsi, QEMU, fio, tshark), never against stand-ins.
// When one is missing this installs the Debian packages if it can (running as root) and otherwise
// stops with a message naming them: a test that cannot reach its peer must fail, not skip.
import { execFileSync, spawnSync } from 'node:child_process';

const peers = [
  { bin: 'tgtd', pkg: 'tgt' },
  { bin: 'tgtadm', pkg: 'tgt' },
  { bin: 'iscsi-test-cu', pkg: 'libiscsi-bin' },
  { bin: 'iscsi-perf', pkg: 'libiscsi-bin' },
  { bin: 'iscsi-ls', pkg: 'libiscsi-bin' },
  { bin: 'qemu-img', pkg: 'qemu-utils' },
  { bin: 'qemu-io', pkg: 'qemu-utils' },
  { bin: 'qemu-nbd', pkg: 'qemu-utils' },
  { bin: 'fio', pkg: 'fio' },
  { bin: 'tshark', pkg: 'tshark' },
  { bin: 'dumpcap', pkg: 'tshark' },
  { bin: 'curl', pkg: 'curl' },
  { bin: 'script', pkg: 'bsdutils' },
  // A backup store on a disk of its own that a test makes fail (loop device, ext4).
  { bin: 'losetup', pkg: 'mount' },
  { bin: 'mkfs.ext4', pkg: 'e2fsprogs' },
];
// qemu-utils alone cannot open iscsi:// URLs: the libiscsi block driver ships in qemu-block-extra.
const extraPackages = ['qemu-block-extra'];

function have(bin) {
  return spawnSync('sh', ['-c', `command -v ${bin} || test -x /usr/sbin/${bin}`], { stdio: 'ignore' }).status === 0;
}

function installed(pkg) {
  return spawnSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8' }).stdout?.includes('install ok installed') ?? false;
}

const missing = [...new Set([...peers.filter((p) => !have(p.bin)).map((p) => p.pkg), ...extraPackages.filter((p) => !installed(p))])];
if (missing.length === 0) process.exit(0);

const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
if (!isRoot) {
  console.error(`detour tests need these Debian packages, which are missing: ${missing.join(' ')}`);
  console.error(`install them with: sudo apt-get install -y ${missing.join(' ')}`);
  process.exit(1);
}
console.error(`installing test peers: ${missing.join(' ')}`);
const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
try {
  execFileSync('apt-get', ['update'], { stdio: 'inherit', env });
  execFileSync('apt-get', ['install', '-y', '--no-install-recommends', ...missing], { stdio: 'inherit', env });
} catch {
  console.error(`could not install ${missing.join(' ')}; the tests cannot run without them`);
  process.exit(1);
}
const still = peers.filter((p) => !have(p.bin)).map((p) => p.bin);
if (still.length) {
  console.error(`still missing after install: ${still.join(' ')}`);
  process.exit(1);
}
