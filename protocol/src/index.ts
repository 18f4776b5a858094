// iscsi-node-wire: the iSCSI wire format (RFC 7143) with no I/O.
export * from './errors.ts';
export * from './serial.ts';
export * from './digest.ts';
export * from './pdu.ts';
export * from './framer.ts';
export * from './receiver.ts';
export * from './scsi/index.ts';
export * from './text.ts';
export * from './keys.ts';
export * from './negotiation.ts';
export * from './login-stage.ts';
export * from './chap.ts';
