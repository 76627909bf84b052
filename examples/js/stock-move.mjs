// Move stock between two bins as ONE transaction through the local API, and follow the
// feed until the server answered it: both changes synced together, or both rolled back
// together (the server refused one, e.g. a bin would go below 0). docs/TRANSACTIONS.md.
//   node stock-move.mjs --port 8181 --token wst_... --from bin-a --to bin-b --qty 2
//   node stock-move.mjs --socket /var/lib/waystation/agent/api.sock --token wst_... ...
// Prints one JSON line per step; exits 0 when synced, 2 when rolled back.
// The move is sent with an Idempotency-Key (--key, default a new UUID): if its answer is
// lost it is sent again and still moves the stock once (docs/agent-api.md).
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { Waystation } from "./waystation.mjs";

const { values: args } = parseArgs({
  options: {
    socket: { type: "string" }, port: { type: "string" }, token: { type: "string" },
    from: { type: "string" }, to: { type: "string" }, qty: { type: "string" },
    order: { type: "string" }, route: { type: "string", default: "route-42" },
    key: { type: "string" },
  },
});
const ws = new Waystation({ socketPath: args.socket, port: args.port && Number(args.port),
                            token: args.token });
const say = (doc) => console.log(JSON.stringify(doc));
const qty = Number(args.qty);

const start = (await ws.request("GET", "/v1/events?limit=1&since=")).last;
const ops = [
  { op: "increment", collection: "inventory", key: args.from, field: "stock", amount: -qty },
  { op: "increment", collection: "inventory", key: args.to, field: "stock", amount: qty },
];
if (args.order) {  // the order that takes the stock, and its line, in the same transaction
  ops.push({ op: "put", collection: "tasks", key: args.order,
             fields: { route: args.route, status: "ordered" } });
  ops.push({ op: "put", collection: "tasks", key: `${args.order}:1`,
             fields: { route: args.route, notes: `${qty} from ${args.from}` } });
}
const key = args.key ?? randomUUID();
const written = await ws.transaction(ops, 0, { key });
say({ step: "written", change_ids: written.change_ids, message: written.message, key,
      replayed: written.replayed === true });
const waiting = new Set(written.change_ids);
const synced = new Set();
const rolledBack = new Map();
for await (const event of ws.feed({ since: start })) {
  const ids = (event.data?.change_ids ?? []).filter((id) => waiting.has(id));
  if (ids.length === 0) continue;
  if (event.kind === "local") say({ step: "pending", key: event.key, change_ids: ids });
  if (event.kind === "synced") ids.forEach((id) => synced.add(id));
  if (event.kind === "rejected") {
    ids.forEach((id) => rolledBack.set(id, event.data.code));
    say({ step: "rolled_back", key: event.key, code: event.data.code,
          transaction: event.data.transaction, reason: event.data.reason });
  }
  if (synced.size === waiting.size) {
    const stock = {};
    for (const key of [args.from, args.to]) stock[key] = (await ws.get("inventory", key)).fields.stock ?? 0;
    say({ step: "synced", stock });
    process.exit(0);
  }
  if (rolledBack.size === waiting.size) {
    const stock = {};
    for (const key of [args.from, args.to]) stock[key] = (await ws.get("inventory", key)).fields.stock ?? 0;
    say({ step: "rejected", codes: Object.fromEntries(rolledBack), stock });
    process.exit(2);
  }
}
