export * from './opcodes.ts';
export * from './status.ts';
export * from './sense.ts';
export * from './cdb.ts';
