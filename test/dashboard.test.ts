import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createMetrics } from '../src/control/metrics.ts';

const file = path.resolve(import.meta.dirname, '../dashboards/detour.json');

interface Target {
  expr: string;
  refId: string;
  datasource?: { type: string; uid: string };
}
interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos: { h: number; w: number; x: number; y: number };
  datasource?: { type: string; uid: string };
  targets?: Target[];
  panels?: Panel[];
}

const dashboard = JSON.parse(fs.readFileSync(file, 'utf8')) as {
  title: string;
  uid: string;
  schemaVersion: number;
  panels: Panel[];
  templating: { list: { name: string; type: string; query: unknown; datasource?: { uid: string } }[] };
};

function allPanels(panels: Panel[]): Panel[] {
  return panels.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
}
const panels = allPanels(dashboard.panels);
const queries = panels.filter((p) => p.type !== 'row');

/** The detour_ metric names an expression uses, histogram series folded onto their metric. */
function metricNames(expr: string): string[] {
  return [...expr.matchAll(/\b(detour_[a-z0-9_]+)\b/g)].map((m) => m[1]!.replace(/_(bucket|sum|count)$/, ''));
}

describe('Grafana dashboard dashboards/detour.json', () => {
  it('is a dashboard with a Prometheus data source variable and a volume variable', () => {
    expect(dashboard.title).toBe('detour');
    expect(dashboard.uid).toMatch(/^[a-z0-9-]{1,40}$/);
    expect(dashboard.schemaVersion).toBeGreaterThanOrEqual(36);
    const ds = dashboard.templating.list.find((v) => v.type === 'datasource');
    expect(ds).toMatchObject({ name: 'datasource', query: 'prometheus' });
    const volume = dashboard.templating.list.find((v) => v.name === 'volume');
    expect(volume).toMatchObject({ type: 'query', datasource: { uid: '${datasource}' } });
    expect(JSON.stringify(volume!.query)).toContain('label_values(detour_sessions, volume)');
  });

  it('has the panels an operator needs', () => {
    const titles = panels.map((p) => p.title);
    for (const t of [
      'Sessions by mode',
      'SCSI IOPS',
      'SCSI latency',
      'Backup phase',
      'Backup progress',
      'Journal depth',
      'Drain rate',
      'Cutover pauses',
      'Time since last good backup',
    ]) {
      expect(titles, t).toContain(t);
    }
    const latency = queries.find((p) => p.title === 'SCSI latency')!;
    expect(latency.targets!.some((t) => /histogram_quantile\(0\.99, sum by \(le, volume\) \(rate\(detour_scsi_command_duration_seconds_bucket/.test(t.expr))).toBe(true);
    const sessions = queries.find((p) => p.title === 'Sessions by mode')!;
    expect(sessions.targets![0]!.expr).toMatch(/sum by \(volume, mode\) \(detour_sessions\{/);
  });

  it('uses only metric names that detour registers', async () => {
    const registry = createMetrics({ defaultMetrics: false }).registry;
    const registered = new Set((await registry.getMetricsAsJSON()).map((m) => m.name));
    const used = new Set(queries.flatMap((p) => (p.targets ?? []).flatMap((t) => metricNames(t.expr))));
    expect(used.size).toBeGreaterThanOrEqual(12);
    for (const name of used) expect(registered, name).toContain(name);
    // Every contract metric is on the dashboard.
    for (const name of [
      'detour_sessions',
      'detour_scsi_commands_total',
      'detour_scsi_command_duration_seconds',
      'detour_backup_phase',
      'detour_backup_bytes_copied_total',
      'detour_backup_bytes_total',
      'detour_journal_records',
      'detour_journal_bytes',
      'detour_journal_unreflected_records',
      'detour_drain_bytes_total',
      'detour_cutover_pause_seconds',
      'detour_last_backup_success_timestamp_seconds',
    ]) {
      expect(used, name).toContain(name);
    }
  });

  it('every query panel reads the chosen data source, with balanced, volume-filtered expressions', () => {
    const ids = panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(queries.length).toBeGreaterThanOrEqual(9);
    for (const p of queries) {
      expect(p.datasource, p.title).toEqual({ type: 'prometheus', uid: '${datasource}' });
      expect(p.targets!.length, p.title).toBeGreaterThan(0);
      expect(p.gridPos.x + p.gridPos.w, p.title).toBeLessThanOrEqual(24);
      for (const t of p.targets!) {
        expect(t.datasource, p.title).toEqual({ type: 'prometheus', uid: '${datasource}' });
        for (const [open, close] of ['()', '{}', '[]']) {
          expect(t.expr.split(open).length, `${p.title}: ${t.expr}`).toBe(t.expr.split(close).length);
        }
        // Every selector of a detour metric is filtered by the dashboard's volume variable.
        for (const m of t.expr.matchAll(/\b(detour_[a-z0-9_]+)(\{[^}]*\})?/g)) expect(m[2] ?? '', `${p.title}: ${m[1]}`).toContain('volume=~"$volume"');
      }
    }
  });
});
