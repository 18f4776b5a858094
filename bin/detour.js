#!/usr/bin/env node
// The CLI is TypeScript run through tsx's loader, so `npx detour` works straight after `npm ci`
// without a build step.
// Block I/O runs on libuv's thread pool (4 threads by default); a target serving 32 commands in
// flight needs more. libuv reads this once, when the pool first starts, so it is set before any
// asynchronous file operation.
process.env.UV_THREADPOOL_SIZE ??= '16';

const { register } = await import('tsx/esm/api');

register();
const { main } = await import('../src/control/cli.ts');
process.exitCode = await main(process.argv.slice(2));
