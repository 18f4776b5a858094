import { createHash } from 'node:crypto';
import fs from 'node:fs';

/** `length` bytes of a file at `offset`, as a disk reads them: zeros past its end. */
export function readFileRange(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

/** SHA-256 of `b`, in hex. */
export function sha256Hex(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}
