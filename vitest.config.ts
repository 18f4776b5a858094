import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['protocol/test/**/*.test.ts', 'test/**/*.test.ts'],
    // Test files run one at a time: most of them drive real peers (tgtd, QEMU, fio) on a
    // 2-core machine, and their timing checks must not depend on what runs beside them.
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
