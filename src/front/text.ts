import { Opcode, RESERVED_TAG, type TextRequest } from 'iscsi-node-wire';
import { encodeTextData, splitTextData, TextAssembler, type TextPair } from '../../protocol/src/text.ts';
import type { FrontConnection } from './connection.ts';
import type { FrontTarget, TargetDirectory } from './types.ts';

/** The SendTargets answer (RFC 7143 appendix C): each visible target with its addresses. */
export function sendTargetsText(value: string, dir: TargetDirectory, initiatorName: string, discovery: boolean, current: FrontTarget | undefined): TextPair[] {
  let targets: FrontTarget[];
  if (value === 'All') {
    // "All" is for discovery sessions; a normal session may only ask about its own target.
    targets = discovery ? dir.list() : current ? [current] : [];
  } else if (value === '') {
    targets = current ? [current] : [];
  } else {
    const t = dir.get(value);
    targets = t && (discovery || t === current) ? [t] : [];
  }
  const out: TextPair[] = [];
  for (const t of targets) {
    if (t.allows && !t.allows(initiatorName)) continue;
    out.push(['TargetName', t.name]);
    for (const a of dir.addresses(t)) out.push(['TargetAddress', a]);
  }
  return out;
}

/**
 * Text Request handling in full feature phase: SendTargets, and long answers split over several
 * Text Responses with the C bit, the initiator fetching the rest with empty requests that echo
 * our TTT.
 */
export class TextResponder {
  private readonly assembler = new TextAssembler();
  private remainder: { ttt: number; chunks: Array<{ data: Buffer; continue: boolean }> } | undefined;
  private nextTtt = 0x7000_0000;

  constructor(private readonly conn: FrontConnection) {}

  handle(pdu: TextRequest): void {
    const params = this.conn.params!;
    if (pdu.ttt !== RESERVED_TAG) {
      // Continuation of an answer we split: send the next piece.
      if (this.remainder && this.remainder.ttt === pdu.ttt) return this.sendNext(pdu);
      this.remainder = undefined;
    }
    let pairs: TextPair[] | undefined;
    try {
      pairs = this.assembler.push(pdu.data, pdu.continue);
    } catch {
      return this.respond(pdu, encodeTextData([]), false);
    }
    if (!pairs) {
      // More request text to come: acknowledge with an empty response (RFC 7143 11.10.2).
      return this.respond(pdu, Buffer.alloc(0), false, this.allocTtt());
    }
    const session = this.conn.session!;
    const answer: TextPair[] = [];
    for (const [k, v] of pairs) {
      if (k === 'SendTargets') answer.push(...sendTargetsText(v, this.conn.host.directory, session.initiatorName, session.discovery, session.target));
      else if (k === 'MaxRecvDataSegmentLength') {
        // Declarative in full feature phase: the initiator changes what we may send.
        const n = Number(v);
        if (Number.isInteger(n) && n >= 512 && n <= 16_777_215) params.maxSendDataSegmentLength = n;
        else answer.push([k, 'Reject']);
      } else if (k.startsWith('X-') || k.startsWith('X#')) answer.push([k, 'NotUnderstood']);
      else answer.push([k, 'NotUnderstood']);
    }
    const text = encodeTextData(answer);
    const chunks = splitTextData(text, params.maxSendDataSegmentLength);
    if (chunks.length === 1) return this.respond(pdu, chunks[0]!.data, false);
    this.remainder = { ttt: this.allocTtt(), chunks };
    this.sendNext(pdu);
  }

  private sendNext(pdu: TextRequest): void {
    const r = this.remainder!;
    const chunk = r.chunks.shift()!;
    if (!chunk.continue) this.remainder = undefined;
    this.respond(pdu, chunk.data, chunk.continue, chunk.continue ? r.ttt : RESERVED_TAG);
  }

  private respond(pdu: TextRequest, data: Buffer, cont: boolean, ttt = RESERVED_TAG): void {
    this.conn.sendText({
      opcode: Opcode.TextResponse, itt: pdu.itt, final: !cont && ttt === RESERVED_TAG, continue: cont, lun: 0, ttt,
      statSN: this.conn.nextStatSN(), ...this.conn.windowFields(), data,
    });
  }

  private allocTtt(): number {
    this.nextTtt = this.nextTtt >= 0x7fff_fff0 ? 0x7000_0000 : this.nextTtt + 1;
    return this.nextTtt;
  }
}
