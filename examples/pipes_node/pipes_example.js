#!/usr/bin/env node
// A Dagster Pipes external process in Node.js, standard library only (zlib, fs, Buffer).
//
// It reads the two bootstrap variables the orchestrator sets (dpipes, or Dagster's own
// PipesSubprocessClient), computes a small result, and reports it as Pipes messages, protocol 0.1:
// opened, a log, an asset materialization with metadata, an asset check, and closed (with the
// exception if anything fails). Messages are JSON lines, appended to the messages file, or written
// to stderr/stdout when the orchestrator asked for the stdio channel.
"use strict";

const fs = require("fs");
const zlib = require("zlib");

const PIPES_PROTOCOL_VERSION = "0.1";

// A bootstrap value is base64(zlib(json)): a zlib stream, so inflate (not gunzip) undoes it.
function decodeParam(value) {
  if (!value) return null;
  const compressed = Buffer.from(value, "base64");
  return JSON.parse(zlib.inflateSync(compressed).toString("utf-8"));
}

function loadContext(params) {
  if (params === null) throw new Error("DAGSTER_PIPES_CONTEXT is not set: not launched by a Pipes orchestrator");
  if (typeof params.path === "string") return JSON.parse(fs.readFileSync(params.path, "utf-8"));
  if (params.data && typeof params.data === "object") return params.data;
  throw new Error(`unsupported Pipes context params: ${JSON.stringify(params)}`);
}

// Returns a function that writes one message as one line, synchronously, so order is kept and
// nothing is lost at exit.
function openMessageWriter(params) {
  if (params === null) throw new Error("DAGSTER_PIPES_MESSAGES is not set");
  if (typeof params.path === "string") {
    // Like dagster-pipes: open in append mode for each message, write the line, close.
    return (line) => fs.appendFileSync(params.path, line);
  }
  if (params.stdio === "stderr" || params.stdio === "stdout") {
    const fd = params.stdio === "stderr" ? 2 : 1;
    return (line) => writeAll(fd, Buffer.from(line, "utf-8"));
  }
  throw new Error(`unsupported Pipes messages params: ${JSON.stringify(params)}`);
}

function writeAll(fd, buf) {
  let off = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(fd, buf, off);
    } catch (err) {
      if (err.code !== "EAGAIN") throw err; // a non-blocking stream that is full: try again
    }
  }
}

function main() {
  const contextParams = decodeParam(process.env.DAGSTER_PIPES_CONTEXT);
  const messagesParams = decodeParam(process.env.DAGSTER_PIPES_MESSAGES);
  const context = loadContext(contextParams);
  const write = openMessageWriter(messagesParams);
  const send = (method, params) =>
    write(JSON.stringify({ __dagster_pipes_version: PIPES_PROTOCOL_VERSION, method, params }) + "\n");

  send("opened", { extras: {} });
  try {
    const assetKey = (context.asset_keys && context.asset_keys[0]) || "node_example";
    const count = Number((context.extras && context.extras.count) || 100);
    send("log", { message: `computing ${count} squares for ${assetKey} (run ${context.run_id})`, level: "INFO" });

    const started = Date.now();
    const values = Array.from({ length: count }, (_, i) => i * i);
    const total = values.reduce((a, b) => a + b, 0);
    const mean = count ? total / count : 0;

    send("report_asset_materialization", {
      asset_key: assetKey,
      data_version: String(total),
      metadata: {
        row_count: { raw_value: count, type: "int" },
        mean: { raw_value: mean, type: "float" },
        runtime: { raw_value: "node " + process.version, type: "text" },
        sample: { raw_value: values.slice(0, 5), type: "json" },
        summary: { raw_value: `**${count}** squares, mean ${mean.toFixed(2)}`, type: "md" },
        computed_at: { raw_value: started / 1000, type: "timestamp" },
        first_rows: {
          raw_value: {
            records: values.slice(0, 3).map((v, i) => ({ i, square: v })),
            schema: [
              { name: "i", type: "int" },
              { name: "square", type: "int" },
            ],
          },
          type: "table",
        },
      },
    });
    send("report_asset_check", {
      asset_key: assetKey,
      check_name: "non_negative",
      passed: values.every((v) => v >= 0),
      severity: "ERROR",
      metadata: { checked: { raw_value: count, type: "int" } },
    });
    if (context.extras && context.extras.fail) throw new Error(String(context.extras.fail));
  } catch (err) {
    send("closed", {
      exception: {
        message: String(err && err.message),
        stack: String((err && err.stack) || "").split("\n"),
        name: (err && err.name) || null,
        cause: null,
        context: null,
      },
    });
    process.exitCode = 1;
    return;
  }
  send("closed", {});
}

main();
