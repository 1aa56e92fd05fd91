#!/usr/bin/env node
// Long-running @grpc/grpc-js(-xds) client of weft.demo.v1.Echo, driven over stdin by the
// weft-tests harness. Same protocol as ../python/xds_client.py:
//
//   node xds_client.js --target xds:///echo      (needs GRPC_XDS_BOOTSTRAP)
//   node xds_client.js --target 127.0.0.1:50051  (plain target, to test the client itself)
//
//   call N [DEADLINE_S] -> {"echo-1": 34, ..., "errors": k, "last_error": "..."}
//   ping                -> {"pong": true}
//   quit                -> exits 0
// Prints {"ready": true} at startup.
'use strict';

const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

function emit(obj) {
  const sorted = {};
  for (const k of Object.keys(obj).sort()) sorted[k] = obj[k];
  process.stdout.write(JSON.stringify(sorted) + '\n');
}

const target = arg('--target');
if (!target) {
  emit({ fatal: '--target is required' });
  process.exit(2);
}
const protoDir = arg('--proto-dir', path.resolve(__dirname, '..', '..', '..', 'proto'));

if (target.startsWith('xds:')) {
  if (!process.env.GRPC_XDS_BOOTSTRAP) {
    emit({ fatal: 'GRPC_XDS_BOOTSTRAP is not set' });
    process.exit(2);
  }
  require('@grpc/grpc-js-xds').register();
}

const def = protoLoader.loadSync('weft/demo/v1/echo.proto', {
  includeDirs: [protoDir],
  keepCase: true,
  defaults: true,
});
const pkg = grpc.loadPackageDefinition(def);
const client = new pkg.weft.demo.v1.Echo(target, grpc.credentials.createInsecure());

function callOnce(i, deadlineS) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + deadlineS * 1000);
    client.Echo({ message: 'm' + i }, { deadline, waitForReady: true }, (err, reply) => {
      resolve(err ? { err } : { backend: reply.backend });
    });
  });
}

async function run(n, deadlineS) {
  const out = {};
  let errors = 0;
  let lastError = null;
  for (let i = 0; i < n; i++) {
    const r = await callOnce(i, deadlineS);
    if (r.err) {
      errors++;
      lastError = `${r.err.code}: ${r.err.details || r.err.message}`;
    } else {
      out[r.backend] = (out[r.backend] || 0) + 1;
    }
  }
  out.errors = errors;
  if (lastError !== null) out.last_error = lastError;
  return out;
}

// Commands run strictly one after another, in arrival order.
let queue = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  queue = queue.then(async () => {
    const parts = line.trim().split(/\s+/).filter((p) => p.length > 0);
    if (parts.length === 0) return;
    const cmd = parts[0];
    if (cmd === 'quit') {
      client.close();
      process.exit(0);
    } else if (cmd === 'ping') {
      emit({ pong: true });
    } else if (cmd === 'call') {
      const n = parts.length > 1 ? parseInt(parts[1], 10) : 1;
      const d = parts.length > 2 ? parseFloat(parts[2]) : 5.0;
      emit(await run(n, d));
    } else {
      emit({ fatal: `unknown command ${JSON.stringify(cmd)}` });
    }
  });
});
rl.on('close', () => {
  queue.then(() => {
    client.close();
    process.exit(0);
  });
});
emit({ ready: true });
