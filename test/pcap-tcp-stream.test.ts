import { describe, expect, it } from 'vitest';
import { TcpFlag, type TcpSegment } from '../src/tools/pcap/packets.ts';
import { TcpReassembler, type GapInfo, type PacketRef, type Side, type TcpConnection } from '../src/tools/pcap/tcp-stream.ts';

const { SYN, ACK, FIN, RST } = TcpFlag;

type Event =
  | { kind: 'data'; conn: number; side: Side; text: string; at: number }
  | { kind: 'gap'; conn: number; side: Side; length: number; at: number; resumesAt?: number; cutShort?: number }
  | { kind: 'closed'; conn: number; at: number };

function recorder(wants?: (c: TcpConnection) => boolean) {
  const events: Event[] = [];
  const conns: TcpConnection[] = [];
  const r = new TcpReassembler({
    ...(wants ? { wants } : {}),
    data: (c, side, bytes, at) => events.push({ kind: 'data', conn: c.id, side, text: bytes.toString('latin1'), at: at.index }),
    gap: (c, side, g: GapInfo, at) =>
      events.push({
        kind: 'gap', conn: c.id, side, length: g.length, at: at.index,
        ...(g.resumesAt ? { resumesAt: g.resumesAt.index } : {}),
        ...(g.cutShort ? { cutShort: g.cutShort.index } : {}),
      }),
    closed: (c, at) => {
      conns.push(c);
      events.push({ kind: 'closed', conn: c.id, at: at.index });
    },
  });
  let index = 0;
  const push = (seg: Partial<TcpSegment> & { from: 'c' | 's' }) => {
    const fromClient = seg.from === 'c';
    const payload = seg.payload ?? Buffer.alloc(0);
    const full: TcpSegment = {
      srcAddr: fromClient ? '10.0.0.1' : '10.0.0.2',
      dstAddr: fromClient ? '10.0.0.2' : '10.0.0.1',
      srcPort: fromClient ? (seg.srcPort ?? 40000) : 3260,
      dstPort: fromClient ? 3260 : (seg.dstPort ?? 40000),
      seq: seg.seq ?? 0,
      ack: seg.ack ?? 0,
      flags: seg.flags ?? ACK,
      payload,
      payloadLength: seg.payloadLength ?? payload.length,
    };
    index++;
    const at: PacketRef = { index, time: index / 1000 };
    r.push(full, at);
    return index;
  };
  const text = (side: Side, conn = 0) =>
    events.filter((e): e is Extract<Event, { kind: 'data' }> => e.kind === 'data' && e.side === side && e.conn === conn).map((e) => e.text).join('');
  return { r, events, conns, push, text };
}

const b = (s: string) => Buffer.from(s, 'latin1');

describe('TcpReassembler', () => {
  it('delivers both directions in order from the SYN', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 100 });
    t.push({ from: 's', flags: SYN | ACK, seq: 900, ack: 101 });
    t.push({ from: 'c', seq: 101, ack: 901 });
    t.push({ from: 'c', seq: 101, payload: b('hello ') });
    t.push({ from: 's', seq: 901, payload: b('HI') });
    t.push({ from: 'c', seq: 107, payload: b('world') });
    t.r.finish();
    expect(t.text(0)).toBe('hello world');
    expect(t.text(1)).toBe('HI');
    expect(t.conns[0]!.sawSyn).toEqual([true, true]);
    expect(t.conns[0]!.endpoints[0]).toEqual({ addr: '10.0.0.1', port: 40000 });
  });

  it('takes the receiver of a SYN-ACK as the opener when the SYN was not captured', () => {
    const t = recorder();
    t.push({ from: 's', flags: SYN | ACK, seq: 900, ack: 101 });
    t.push({ from: 'c', seq: 101, payload: b('abc') });
    t.r.finish();
    expect(t.conns[0]!.endpoints[0]!.port).toBe(40000);
    expect(t.conns[0]!.sawSyn).toEqual([false, true]);
    expect(t.text(0)).toBe('abc');
  });

  it('drops retransmitted and overlapping bytes', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 0 });
    t.push({ from: 'c', seq: 1, payload: b('abcd') });
    t.push({ from: 'c', seq: 1, payload: b('abcd') }); // exact repeat
    t.push({ from: 'c', seq: 3, payload: b('cdefgh') }); // overlaps the tail
    t.push({ from: 'c', seq: 2, payload: b('bc') }); // entirely old
    t.r.finish();
    expect(t.text(0)).toBe('abcdefgh');
    expect(t.conns[0]!.retransmittedBytes).toBe(4 + 2 + 2);
  });

  it('holds out-of-order segments and delivers them when the hole fills', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 0 });
    t.push({ from: 'c', seq: 1, payload: b('aa') });
    t.push({ from: 'c', seq: 7, payload: b('dd') });
    t.push({ from: 'c', seq: 5, payload: b('cc') });
    t.push({ from: 'c', seq: 7, payload: b('dd') }); // the held segment again
    expect(t.text(0)).toBe('aa');
    const filler = t.push({ from: 'c', seq: 3, payload: b('bbc') }); // overlaps the held 'cc'
    expect(t.text(0)).toBe('aabbccdd');
    // Everything after the hole became available with the packet that filled it.
    expect(t.events.filter((e) => e.kind === 'data').slice(1).every((e) => e.at === filler)).toBe(true);
    expect(t.conns.length).toBe(0);
    t.r.finish();
    expect(t.events.some((e) => e.kind === 'gap')).toBe(false);
    expect(t.conns[0]!.outOfOrderSegments).toBe(2);
  });

  it('handles sequence numbers wrapping around 2^32', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 0xfffffffa });
    t.push({ from: 'c', seq: 0xfffffffb, payload: b('0123') });
    t.push({ from: 'c', seq: 0x00000003, payload: b('89') }); // past the wrap, ahead of a hole
    t.push({ from: 'c', seq: 0xffffffff, payload: b('4567') }); // fills the hole across the wrap
    t.push({ from: 'c', seq: 0xfffffffd, payload: b('23') }); // old
    t.push({ from: 'c', seq: 0x00000005, payload: b('ab') });
    t.r.finish();
    expect(t.text(0)).toBe('0123456789ab');
    expect(t.events.some((e) => e.kind === 'gap')).toBe(false);
  });

  it('starts mid-connection at the first segment carrying data', () => {
    const t = recorder();
    t.push({ from: 'c', seq: 4999 }); // a keep-alive-like pure ACK does not fix the start
    t.push({ from: 'c', seq: 5000, payload: b('xyz') });
    t.push({ from: 's', seq: 70000, payload: b('Q') });
    t.push({ from: 'c', seq: 5003, payload: b('!') });
    t.r.finish();
    expect(t.text(0)).toBe('xyz!');
    expect(t.text(1)).toBe('Q');
    expect(t.conns[0]!.sawSyn).toEqual([false, false]);
  });

  it('reports a gap as soon as the peer acknowledges past it, then continues', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 0 });
    t.push({ from: 's', flags: SYN | ACK, seq: 0, ack: 1 });
    t.push({ from: 'c', seq: 1, payload: b('aaaa') });
    // 'bbbb' at 5 is never captured
    const after = t.push({ from: 'c', seq: 9, payload: b('cccc') });
    expect(t.events.some((e) => e.kind === 'gap')).toBe(false); // could still be reordering
    const ackAt = t.push({ from: 's', seq: 1, ack: 13 });
    expect(t.events.filter((e) => e.kind !== 'data' || e.side === 0)).toEqual([
      { kind: 'data', conn: 0, side: 0, text: 'aaaa', at: 3 },
      { kind: 'gap', conn: 0, side: 0, length: 4, at: ackAt, resumesAt: after },
      { kind: 'data', conn: 0, side: 0, text: 'cccc', at: ackAt },
    ]);
  });

  it('reports a gap at once when data arrives past an already acknowledged hole', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 0 });
    t.push({ from: 'c', seq: 1, payload: b('aaaa') });
    t.push({ from: 's', seq: 1, ack: 9 }); // 'bbbb' acknowledged but not captured
    const p = t.push({ from: 'c', seq: 9, payload: b('cc') });
    expect(t.events.filter((e) => e.kind === 'gap')).toEqual([{ kind: 'gap', conn: 0, side: 0, length: 4, at: p, resumesAt: p }]);
    expect(t.text(0)).toBe('aaaacc');
  });

  it('gives up on a hole when the hold-back buffer is full, and at the end of the capture', () => {
    const events: string[] = [];
    const r = new TcpReassembler(
      {
        data: (_c, _s, bytes) => events.push(bytes.toString()),
        gap: (_c, _s, g) => events.push(`<gap ${g.length}>`),
      },
      { maxBufferedBytes: 10 },
    );
    const seg = (seq: number, text: string): TcpSegment => ({
      srcAddr: '1.1.1.1', dstAddr: '2.2.2.2', srcPort: 1, dstPort: 2, seq, ack: 0, flags: 0, payload: b(text), payloadLength: text.length,
    });
    let i = 0;
    const at = () => ({ index: ++i, time: 0 });
    r.push(seg(100, 'aa'), at());
    r.push(seg(110, 'bbbbbb'), at());
    expect(events).toEqual(['aa']);
    r.push(seg(116, 'ccccc'), at()); // 11 bytes held > 10
    expect(events).toEqual(['aa', '<gap 8>', 'bbbbbb', 'ccccc']);
    r.push(seg(130, 'dd'), at());
    r.finish();
    expect(events).toEqual(['aa', '<gap 8>', 'bbbbbb', 'ccccc', '<gap 9>', 'dd']);
  });

  it('reports bytes cut off by the snap length as a gap in the same packet', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 0 });
    const p = t.push({ from: 'c', seq: 1, payload: b('abc'), payloadLength: 10 });
    t.push({ from: 'c', seq: 11, payload: b('next') });
    t.r.finish();
    expect(t.events.filter((e) => e.kind !== 'closed')).toEqual([
      { kind: 'data', conn: 0, side: 0, text: 'abc', at: p },
      { kind: 'gap', conn: 0, side: 0, length: 7, at: p, cutShort: p },
      { kind: 'data', conn: 0, side: 0, text: 'next', at: p + 1 },
    ]);
  });

  it('closes after both FINs, flushes on RST, and numbers a reused tuple as a new connection', () => {
    const t = recorder();
    t.push({ from: 'c', flags: SYN, seq: 10 });
    t.push({ from: 's', flags: SYN | ACK, seq: 20, ack: 11 });
    t.push({ from: 'c', seq: 11, payload: b('one') });
    t.push({ from: 'c', flags: FIN | ACK, seq: 14 });
    expect(t.conns).toHaveLength(0);
    const fin2 = t.push({ from: 's', flags: FIN | ACK, seq: 21 });
    expect(t.events.at(-1)).toEqual({ kind: 'closed', conn: 0, at: fin2 });
    t.push({ from: 'c', seq: 15, ack: 22 }); // the last ACK: nothing more
    // Same ports again, new ISN: a new connection.
    t.push({ from: 'c', flags: SYN, seq: 5000 });
    t.push({ from: 'c', seq: 5001, payload: b('two') });
    t.push({ from: 'c', seq: 5010, payload: b('late') }); // held behind a hole
    const rst = t.push({ from: 's', flags: RST, seq: 0 });
    expect(t.text(0, 1)).toBe('twolate');
    expect(t.events.slice(-3)).toEqual([
      { kind: 'gap', conn: 1, side: 0, length: 6, at: rst, resumesAt: rst - 1 },
      { kind: 'data', conn: 1, side: 0, text: 'late', at: rst },
      { kind: 'closed', conn: 1, at: rst },
    ]);
    t.push({ from: 'c', seq: 5014, payload: b('ignored after reset') });
    t.r.finish();
    expect(t.text(0, 0)).toBe('one');
    expect(t.text(0, 1)).toBe('twolate');
  });

  it('numbers connections it is not asked to reassemble, without delivering their data', () => {
    const t = recorder((c) => c.endpoints[0]!.port !== 40000);
    t.push({ from: 'c', srcPort: 40000, seq: 1, payload: b('skip me') });
    t.push({ from: 'c', srcPort: 40001, seq: 1, payload: b('keep') });
    t.r.finish();
    expect(t.events.filter((e) => e.kind === 'data')).toEqual([{ kind: 'data', conn: 1, side: 0, text: 'keep', at: 2 }]);
  });
});
