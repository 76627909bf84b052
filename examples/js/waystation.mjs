// A minimal client of the Waystation agent's local API, using only Node's built-ins.
//   const ws = new Waystation({ socketPath: "/var/lib/waystation/agent/api.sock", token });
//   const ws = new Waystation({ port: 8181, token });          // loopback TCP
//   await ws.put("tasks", "t-1", { route: "route-42", status: "delivered" });
//   await ws.transaction([{ op: "put", collection: "tasks", key: "o-1", fields: {...} }, ...]);
//   await ws.increment("inventory", "bin-a", "stock", -2);    // sent again if the answer is lost
//   for await (const ev of ws.feed({ since: 0 })) console.log(ev.kind, ev.key);
import { randomUUID } from "node:crypto";
import http from "node:http";

// Failures after which a write is sent again with the same Idempotency-Key: the answer
// was lost (connection reset or refused while the agent restarts, no answer in time).
const RETRIED = new Set(["ECONNRESET", "ECONNREFUSED", "EPIPE", "ETIMEDOUT", "ENOENT"]);

export class WaystationError extends Error {
  constructor(status, body) {
    super(`${status} ${body.code}: ${body.message}`);
    this.status = status;
    this.code = body.code;
  }
}

export class Waystation {
  constructor({ socketPath, host = "127.0.0.1", port, token, timeoutMs = 10000 }) {
    this.target = socketPath ? { socketPath } : { host, port };
    this.token = token;
    this.timeoutMs = timeoutMs;
  }

  // One request; `key` sends it with an Idempotency-Key. A write answered from an
  // earlier request with the same key (Idempotent-Replayed) resolves with `replayed: true`.
  request(method, path, body, { key } = {}) {
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = http.request({
        ...this.target, method, path, timeout: this.timeoutMs,
        headers: {
          authorization: `Bearer ${this.token}`,
          ...(data ? { "content-type": "application/json", "content-length": data.length } : {}),
          ...(key ? { "idempotency-key": key } : {}),
        },
      }, (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          const doc = JSON.parse(Buffer.concat(chunks).toString("utf8") || "null");
          if (res.statusCode >= 400) reject(new WaystationError(res.statusCode, doc));
          else if (res.headers["idempotent-replayed"] === "true") resolve({ ...doc, replayed: true });
          else resolve(doc);
        });
      });
      req.on("timeout", () => req.destroy(Object.assign(new Error("no answer in time"),
                                                        { code: "ETIMEDOUT" })));
      req.on("error", reject);
      if (data) req.write(data);
      req.end();
    });
  }

  // A write that is safe to send again (docs/agent-api.md, "Retrying a write whose
  // answer was lost"): one Idempotency-Key for all its tries, so it is applied once.
  async write(method, path, body, { key = randomUUID(), tries = 4 } = {}) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.request(method, path, body, { key });
      } catch (err) {
        const again = RETRIED.has(err.code) || err.status === 503;
        if (!again || attempt >= tries) throw err;
        await new Promise((r) => setTimeout(r, 200 * 2 ** attempt));
      }
    }
  }

  record(collection, key) {
    return `/v1/collections/${encodeURIComponent(collection)}/records/${encodeURIComponent(key)}`;
  }

  // Writes take { key, tries } (see `write`): without a key, each call makes its own.
  put(collection, key, fields, opts) {
    return this.write("PATCH", this.record(collection, key), { fields }, opts);
  }
  increment(collection, key, field, amount, opts) {
    return this.write("POST", `${this.record(collection, key)}/increment`, { field, amount }, opts);
  }
  // Several writes, all or none (docs/TRANSACTIONS.md): ops like
  //   { op: "put", collection, key, fields } | { op: "increment", collection, key, field, amount }
  //   | { op: "delete", collection, key } | { op: "add" | "remove", collection, key, field, members }
  transaction(ops, priority = 0, opts) { return this.write("POST", "/v1/txn", { ops, priority }, opts); }
  get(collection, key) { return this.request("GET", this.record(collection, key)); }
  status() { return this.request("GET", "/v1/status"); }

  // The change feed (Server-Sent Events); resumes after `since` (the last event's seq).
  async *feed({ since, collection } = {}) {
    const query = new URLSearchParams();
    if (since !== undefined) query.set("since", String(since));
    if (collection) query.set("collection", collection);
    const res = await new Promise((resolve, reject) => {
      const req = http.request({
        ...this.target, method: "GET", path: `/v1/feed?${query}`,
        headers: { authorization: `Bearer ${this.token}`, accept: "text/event-stream" },
      }, resolve);
      req.on("error", reject);
      req.end();
    });
    if (res.statusCode !== 200) {
      const chunks = [];
      for await (const c of res) chunks.push(c);
      throw new WaystationError(res.statusCode, JSON.parse(Buffer.concat(chunks).toString()));
    }
    // Decode the stream, not each chunk: a chunk may end inside a multi-byte UTF-8
    // character (a key or value in any script), which per-chunk decoding garbles.
    res.setEncoding("utf8");
    let buffer = "";
    for await (const chunk of res) {
      buffer += chunk;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const line = block.split("\n").find((l) => l.startsWith("data: "));
        if (line) yield JSON.parse(line.slice(6));
      }
    }
  }
}
