// A Prometheus histogram for the data path. prom-client's Histogram validates and hashes the label
// set on every observe(), even through a labels() child: at tens of thousands of SCSI commands a
// second that was most of what metrics cost detour (about 4% of its CPU on 4 KiB reads). Here a
// series is looked up once and observe() is a bucket search and three additions; the exposition
// is built only when /metrics is scraped, in the same text and JSON shape prom-client produces,
// so it registers in a prom-client Registry beside the other metrics.

import type { Registry } from 'prom-client';

type Labels<L extends string> = Partial<Record<L, string | number>>;

/** One label combination: observe() on it directly, once it has been looked up with series(). */
export class HistogramSeries<L extends string> {
  /** Per bucket, not cumulative; the last slot is above the highest bound (+Inf only). */
  readonly counts: Float64Array;
  sum = 0;
  count = 0;

  constructor(
    readonly labels: Labels<L>,
    private readonly bounds: readonly number[],
  ) {
    this.counts = new Float64Array(bounds.length + 1);
  }

  observe(value: number): void {
    if (!Number.isFinite(value)) throw new TypeError(`histogram value is not a finite number: ${value}`);
    const b = this.bounds;
    let i = 0;
    while (i < b.length && value > b[i]!) i++;
    this.counts[i]!++;
    this.sum += value;
    this.count++;
  }
}

interface ExportValue {
  value: number;
  labels: Record<string, string | number>;
  metricName: string;
  sharedLabels?: Record<string, string | number>;
}

export class LatencyHistogram<L extends string> {
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  readonly name: string;
  readonly help: string;
  private readonly labelNames: readonly L[];
  private readonly bounds: readonly number[];
  private readonly bySeries = new Map<string, HistogramSeries<L>>();

  constructor(opts: { name: string; help: string; labelNames: readonly L[]; buckets: readonly number[]; registers?: Registry[] }) {
    this.name = opts.name;
    this.help = opts.help;
    this.labelNames = opts.labelNames;
    this.bounds = [...opts.buckets].sort((a, b) => a - b);
    // The registry only needs name, type, help and get(); its declared parameter type lists
    // prom-client's own classes.
    for (const r of opts.registers ?? []) r.registerMetric(this as unknown as Parameters<Registry['registerMetric']>[0]);
  }

  /** The series of a label set, created at its first use. Keep it: the lookup is the costly part. */
  series(labels: Labels<L>): HistogramSeries<L> {
    for (const k of Object.keys(labels)) {
      if (!(this.labelNames as readonly string[]).includes(k)) throw new Error(`${this.name}: unknown label "${k}"`);
    }
    const key = this.key(labels);
    let s = this.bySeries.get(key);
    if (!s) {
      s = new HistogramSeries({ ...labels }, this.bounds);
      this.bySeries.set(key, s);
    }
    return s;
  }

  remove(labels: Labels<L>): void {
    this.bySeries.delete(this.key(labels));
  }

  reset(): void {
    this.bySeries.clear();
  }

  /** The text exposition's form: `le` in the value's labels, the series' own labels shared. */
  async getForPromString(): Promise<{ name: string; help: string; type: 'histogram'; aggregator: 'sum'; values: ExportValue[] }> {
    const values: ExportValue[] = [];
    const bucketName = `${this.name}_bucket`;
    for (const s of this.bySeries.values()) {
      const shared = s.labels as Record<string, string | number>;
      let acc = 0;
      for (let i = 0; i < this.bounds.length; i++) {
        acc += s.counts[i]!;
        values.push({ value: acc, labels: { le: this.bounds[i]! }, metricName: bucketName, sharedLabels: shared });
      }
      values.push({ value: s.count, labels: { le: '+Inf' }, metricName: bucketName, sharedLabels: shared });
      values.push({ value: s.sum, labels: {}, metricName: `${this.name}_sum`, sharedLabels: shared });
      values.push({ value: s.count, labels: {}, metricName: `${this.name}_count`, sharedLabels: shared });
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values };
  }

  /** The JSON form: every label of a value in `labels`, as prom-client's get() gives it. */
  async get(): Promise<{ name: string; help: string; type: 'histogram'; aggregator: 'sum'; values: ExportValue[] }> {
    const data = await this.getForPromString();
    data.values = data.values.map(({ sharedLabels, labels, ...rest }) => ({ ...rest, labels: { ...labels, ...sharedLabels } }));
    return data;
  }

  private key(labels: Labels<L>): string {
    return this.labelNames.map((n) => String(labels[n] ?? '')).join('\0');
  }
}
