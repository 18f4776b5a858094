import type { PduInit } from '../src/pdu.ts';

// One PDU of every type with every field set to a distinctive value, so a field written to or
// read from the wrong offset shows up as a mismatch in the round trip.
const isid = Buffer.from([0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
const text = Buffer.from('InitiatorName=iqn.2026-11.test:host\0SessionType=Normal\0');

export const samples: PduInit[] = [
  { opcode: 0x00, immediate: true, itt: 0x01020304, lun: 3, ttt: 0xffffffff, cmdSN: 0x11111111, expStatSN: 0x22222222, data: Buffer.from('ping') },
  {
    opcode: 0x01, immediate: false, final: true, read: true, write: false, attr: 1, itt: 0xdeadbeef, lun: 7,
    expectedDataTransferLength: 262144, cmdSN: 0xfffffffe, expStatSN: 5,
    cdb: Buffer.from([0x28, 0, 0, 0, 0x10, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0]),
  },
  {
    opcode: 0x01, immediate: false, final: false, read: false, write: true, attr: 2, itt: 9, lun: 300,
    expectedDataTransferLength: 1 << 20, cmdSN: 1, expStatSN: 2,
    cdb: Buffer.from([0x8a, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x08, 0, 0, 0]), data: Buffer.alloc(1001, 0xab),
  },
  {
    // a 32-byte CDB (variable-length, e.g. READ(32)) needs an Extended CDB AHS, plus bidi AHS
    opcode: 0x01, immediate: false, final: true, read: true, write: true, attr: 0, itt: 10, lun: 0,
    expectedDataTransferLength: 4096, cmdSN: 3, expStatSN: 4, bidiReadDataLength: 8192,
    cdb: Buffer.from(Array.from({ length: 32 }, (_, i) => (i === 0 ? 0x7f : i))),
  },
  { opcode: 0x02, immediate: true, function: 1, itt: 11, lun: 2, referencedTaskTag: 0xabcdef01, cmdSN: 12, expStatSN: 13, refCmdSN: 14, expDataSN: 15 },
  {
    opcode: 0x03, itt: 0, transit: true, continue: false, csg: 1, nsg: 3, versionMax: 0, versionMin: 0,
    isid, tsih: 0x1234, cid: 0x4321, cmdSN: 0x0a0b0c0d, expStatSN: 0x0e0f1011, data: text,
  },
  { opcode: 0x04, immediate: false, final: false, continue: true, itt: 21, lun: 0, ttt: 0xffffffff, cmdSN: 22, expStatSN: 23, data: Buffer.from('SendTargets=All\0') },
  { opcode: 0x05, final: true, itt: 31, lun: 1, ttt: 0x5555aaaa, expStatSN: 32, dataSN: 33, bufferOffset: 65536, data: Buffer.alloc(8192, 0x5a) },
  { opcode: 0x06, immediate: true, reasonCode: 1, itt: 41, cid: 2, cmdSN: 42, expStatSN: 43 },
  { opcode: 0x10, type: 1, itt: 0xffffffff, lun: 4, ttt: 51, expStatSN: 52, begRun: 53, runLength: 54 },
  { opcode: 0x20, itt: 0xffffffff, lun: 0, ttt: 61, statSN: 62, expCmdSN: 63, maxCmdSN: 64, data: Buffer.from([1, 2, 3]) },
  {
    opcode: 0x21, itt: 71, bidiOverflow: false, bidiUnderflow: true, overflow: false, underflow: true, response: 0, status: 2,
    snackTag: 0, statSN: 72, expCmdSN: 73, maxCmdSN: 74, expDataSN: 75, bidiReadResidualCount: 76, residualCount: 77,
    data: Buffer.from([0, 18, 0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0]),
  },
  { opcode: 0x22, itt: 81, response: 1, statSN: 82, expCmdSN: 83, maxCmdSN: 84 },
  {
    opcode: 0x23, itt: 91, transit: true, continue: false, csg: 0, nsg: 1, versionMax: 0, versionActive: 0, isid, tsih: 0x0101,
    statSN: 92, expCmdSN: 93, maxCmdSN: 94, statusClass: 1, statusDetail: 1, data: Buffer.from('TargetAddress=127.0.0.1:3261,1\0'),
  },
  { opcode: 0x24, itt: 101, final: true, continue: false, lun: 0, ttt: 0xffffffff, statSN: 102, expCmdSN: 103, maxCmdSN: 104, data: Buffer.from('TargetName=iqn.x\0') },
  {
    opcode: 0x25, itt: 111, final: true, acknowledge: false, overflow: false, underflow: true, statusPresent: true, status: 0,
    lun: 5, ttt: 0xffffffff, statSN: 112, expCmdSN: 113, maxCmdSN: 114, dataSN: 115, bufferOffset: 116, residualCount: 117, data: Buffer.alloc(512, 7),
  },
  { opcode: 0x26, itt: 121, response: 0, statSN: 122, expCmdSN: 123, maxCmdSN: 124, time2Wait: 2, time2Retain: 20 },
  { opcode: 0x31, itt: 131, lun: 6, ttt: 132, statSN: 133, expCmdSN: 134, maxCmdSN: 135, r2tSN: 136, bufferOffset: 137, desiredDataTransferLength: 138 },
  {
    opcode: 0x32, itt: 0xffffffff, lun: 0, statSN: 141, expCmdSN: 142, maxCmdSN: 143, asyncEvent: 1, asyncVCode: 0,
    parameter1: 0, parameter2: 2, parameter3: 20,
  },
  { opcode: 0x3f, itt: 0xffffffff, reason: 4, statSN: 151, expCmdSN: 152, maxCmdSN: 153, dataSN: 0, data: Buffer.alloc(48, 0xee) },
];
