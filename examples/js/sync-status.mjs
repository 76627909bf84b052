// Write a record through the local API and follow the feed until the server confirms it:
// what an app shows as "saved locally, pending sync" -> "synced".
//   node sync-status.mjs --port 8181 --token wst_... [--key t-1] [--route route-42]
//   node sync-status.mjs --socket /var/lib/waystation/agent/api.sock --token wst_...
// Prints one JSON line per step; exits 0 once the write is synced.
import { parseArgs } from "node:util";
import { Waystation } from "./waystation.mjs";

const { values: args } = parseArgs({
  options: {
    socket: { type: "string" }, port: { type: "string" }, token: { type: "string" },
    key: { type: "string", default: "t-js-1" }, route: { type: "string", default: "route-42" },
  },
});
const ws = new Waystation({ socketPath: args.socket, port: args.port && Number(args.port),
                            token: args.token });
const say = (doc) => console.log(JSON.stringify(doc));

const status = await ws.status();
say({ step: "status", online: status.online, pending: status.pending });
const start = (await ws.request("GET", "/v1/events?limit=1&since=")).last;
const written = await ws.put("tasks", args.key, { route: args.route, status: "delivered" });
say({ step: "written", state: written.state, change_id: written.change_id,
      message: written.message });
for await (const event of ws.feed({ since: start })) {
  if (event.collection === "") {
    // Device-wide events. A kind this app does not know (newer agents add kinds) is
    // skipped, as every app should.
    if (["online", "offline", "retrying"].includes(event.kind)) {
      say({ step: "link", kind: event.kind, code: event.data.code ?? null });
    } else if (event.kind === "server") {  // the merge servers went down or came back
      say({ step: "server", up: event.data.up, since_ms: event.data.since_ms });
    } else if (event.kind === "schema") {  // field names may have changed: reload them
      say({ step: "schema", from: event.data.from, to: event.data.to });
    }
    continue;
  }
  if (event.key !== args.key) continue;
  const mine = (event.data.change_ids ?? []).includes(written.change_id);
  if (event.kind === "local" && mine) say({ step: "pending", seq: event.seq });
  if (event.kind === "synced" && mine) {
    const record = await ws.get("tasks", args.key);
    say({ step: "synced", seq: event.seq, sync: record.sync });
    process.exit(0);
  }
  if (event.kind === "rejected" && mine) {
    say({ step: "rejected", reason: event.data.reason });
    process.exit(2);
  }
}
