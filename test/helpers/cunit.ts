import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export type CuResult = 'passed' | 'failed';

export interface ConformanceRun {
  /** "Suite/Test" → result; a suite name that recurs gets "#2", "#3"... in order of appearance. */
  results: Map<string, CuResult>;
  passed: number;
  failed: number;
  /** The text iscsi-test-cu printed, for diagnosing a failure. */
  output: string;
}

/**
 * Runs libiscsi's conformance suite (iscsi-test-cu --dataloss) against one iSCSI URL and reads
 * its per-test verdicts from CUnit's XML report, which is unambiguous where the text output
 * interleaves test messages with verdicts.
 */
export async function runIscsiTestCu(url: string, opts: { timeoutMs?: number; extraArgs?: string[] } = {}): Promise<ConformanceRun> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'detour-cu-'));
  try {
    const output = await new Promise<string>((resolve, reject) => {
      const p = spawn('iscsi-test-cu', ['--dataloss', '-x', ...(opts.extraArgs ?? []), url], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      p.stdout.on('data', (d: Buffer) => (out += d.toString()));
      p.stderr.on('data', (d: Buffer) => (out += d.toString()));
      const timer = setTimeout(() => {
        p.kill('SIGKILL');
        reject(new Error(`iscsi-test-cu against ${url} did not finish in ${opts.timeoutMs} ms:\n${out.slice(-2000)}`));
      }, opts.timeoutMs ?? 600_000);
      p.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`cannot run iscsi-test-cu (Debian package libiscsi-bin): ${err.message}`));
      });
      p.once('exit', () => {
        clearTimeout(timer);
        resolve(out);
      });
    });
    const xmlFile = path.join(dir, 'CUnitAutomated-Results.xml');
    if (!fs.existsSync(xmlFile)) throw new Error(`iscsi-test-cu wrote no results for ${url}:\n${output.slice(-2000)}`);
    const results = parseCunitXml(fs.readFileSync(xmlFile, 'utf8'));
    let passed = 0;
    let failed = 0;
    for (const r of results.values()) r === 'passed' ? passed++ : failed++;
    return { results, passed, failed, output };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export function parseCunitXml(xml: string): Map<string, CuResult> {
  const results = new Map<string, CuResult>();
  const suiteSeen = new Map<string, number>();
  const suiteRe = /<SUITE_NAME>\s*([^<]*?)\s*<\/SUITE_NAME>([\s\S]*?)<\/CUNIT_RUN_SUITE>/g;
  for (const s of xml.matchAll(suiteRe)) {
    // Test names are unique within a suite, but a suite name can recur in another family.
    const n = (suiteSeen.get(s[1]!) ?? 0) + 1;
    suiteSeen.set(s[1]!, n);
    const suite = n === 1 ? s[1]! : `${s[1]}#${n}`;
    const testRe = /<CUNIT_RUN_TEST_(SUCCESS|FAILURE)>\s*<TEST_NAME>\s*([^<]*?)\s*<\/TEST_NAME>/g;
    for (const t of s[2]!.matchAll(testRe)) {
      const key = `${suite}/${t[2]}`;
      // A failing test has one FAILURE record per failed assertion: any failure fails it.
      if (t[1] === 'FAILURE') results.set(key, 'failed');
      else if (!results.has(key)) results.set(key, 'passed');
    }
  }
  return results;
}

/** Tests that pass in the reference run but not in the other. */
export function regressions(reference: ConformanceRun, other: ConformanceRun): string[] {
  const out: string[] = [];
  for (const [name, r] of reference.results) if (r === 'passed' && other.results.get(name) !== 'passed') out.push(name);
  return out;
}
