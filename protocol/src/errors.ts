/**
 * Every error the wire layer raises carries a `kind`, so a caller can choose the answer the RFC
 * asks for (a Reject with a given reason, or closing the connection) without parsing messages.
 */
export type WireErrorKind =
  | 'header-digest' // header CRC32C mismatch: the PDU boundary itself cannot be trusted
  | 'data-digest' // data CRC32C mismatch: the boundary is fine, the payload is not
  | 'data-segment-too-large' // DataSegmentLength above what we declared we can receive
  | 'ahs-too-large'
  | 'malformed' // a field that cannot be right (reserved bit, bad AHS, wrong length)
  | 'unknown-opcode'
  | 'framer-failed'; // input after a fatal framing error

export class WireError extends Error {
  override readonly name = 'WireError';
  constructor(
    readonly kind: WireErrorKind,
    message: string,
    /** The BHS of the offending PDU when known: a Reject carries it back to the sender. */
    readonly header?: Buffer,
  ) {
    super(message);
  }
}
