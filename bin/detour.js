#!/usr/bin/env node
// The CLI is TypeScript run through tsx's loader, so `npx detour` works straight after `npm ci`
// without a build step.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/control/cli.ts');
process.exitCode = await main(process.argv.slice(2));
