// A minimal client of the Waystation agent's local API, using only Node's built-ins.
//   const ws = new Waystation({ socketPath: "/var/lib/waystation/agent/api.sock", token });
//   const ws = new Waystation({ port: 8181, token });          // loopback TCP
//   await ws.put("tasks", "t-1", { route: "route-42", status: "delivered" });
//   await ws.transaction([{ op: "put", collection: "tasks", key: "o-1", fields: {...} }, ...]);
//   for await (const ev of ws.feed({ since: 0 })) console.log(ev.kind, ev.key);
import http from "node:http";

export class WaystationError extends Error {
  constructor(status, body) {
    super(`${status} ${body.code}: ${body.message}`);
    this.status = status;
    this.code = body.code;
  }
}

export class Waystation {
  constructor({ socketPath, host = "127.0.0.1", port, token }) {
    this.target = socketPath ? { socketPath } : { host, port };
    this.token = token;
  }

  request(method, path, body) {
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = http.request({
        ...this.target, method, path,
        headers: {
          authorization: `Bearer ${this.token}`,
          ...(data ? { "content-type": "application/json", "content-length": data.length } : {}),
        },
      }, (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          const doc = JSON.parse(Buffer.concat(chunks).toString("utf8") || "null");
          if (res.statusCode >= 400) reject(new WaystationError(res.statusCode, doc));
          else resolve(doc);
        });
      });
      req.on("error", reject);
      if (data) req.write(data);
      req.end();
    });
  }

  record(collection, key) {
    return `/v1/collections/${encodeURIComponent(collection)}/records/${encodeURIComponent(key)}`;
  }

  put(collection, key, fields) { return this.request("PATCH", this.record(collection, key), { fields }); }
  // Several writes, all or none (docs/TRANSACTIONS.md): ops like
  //   { op: "put", collection, key, fields } | { op: "increment", collection, key, field, amount }
  //   | { op: "delete", collection, key } | { op: "add" | "remove", collection, key, field, members }
  transaction(ops, priority = 0) { return this.request("POST", "/v1/txn", { ops, priority }); }
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
