#!/usr/bin/env node
// The CLI is TypeScript run through tsx's loader, so `npx detour` works straight after `npm ci`
// without a build step.
// Block I/O runs on libuv's thread pool (4 threads by default); a target serving 32 commands in
// flight needs more. libuv reads this once, when the pool first starts, so it is set before any
// asynchronous file operation.
process.env.UV_THREADPOOL_SIZE ??= '16';
// libuv 1.46 (Node 20) sends file reads and writes through io_uring when the kernel has it. Measured
// on Linux 6.x with 4 KiB random reads at QD 32 from a page-cached image, that path costs the event
// loop ~28 us per read (the copy happens in the submitting thread), against a few us to hand the
// read to the thread pool: `detour target` served 53-80% of tgtd's IOPS with it, 92% without it.
// libuv reads this once, at the first file operation, so it too is set before any.
process.env.UV_USE_IO_URING ??= '0';

const { register } = await import('tsx/esm/api');

register();
const { main } = await import('../src/control/cli.ts');
process.exitCode = await main(process.argv.slice(2));
