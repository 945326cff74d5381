// The demo page: the signed-in user's conversations sorted by activity, live unread badges,
// total unread in the title, mark-as-read on click, a connection indicator. The server URL
// and a token come in the URL fragment: #url=ws://…/v1&token=… (`seqactor demo` prints it).
import { Client, IndexedDBCache, type Conversation } from "../src/index.js";

const params = new URLSearchParams(location.hash.slice(1));
const url = params.get("url") ?? `ws://${location.hostname}:8765/v1`;
const token = params.get("token") ?? "";
const $ = (id: string): HTMLElement => document.getElementById(id)!;

function color(id: string): string {
  let h = 0;
  for (let i = 0; i < id.length; i++) h = (h * 31 + id.charCodeAt(i)) % 360;
  return `hsl(${h} 55% 50%)`;
}

function ago(ms: number): string {
  if (!ms) return "no messages yet";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : new Date(ms).toLocaleTimeString();
}

function row(c: Conversation, client: Client): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.id = c.id;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.style.background = color(c.id);
  avatar.textContent = c.id.replace(/^dm-[^-]+-user/, "U").replace(/^group-/, "G").slice(0, 3).toUpperCase();
  const text = document.createElement("div");
  text.className = "grow";
  text.innerHTML = `<div class="name"></div><div class="meta"></div>`;
  text.querySelector(".name")!.textContent = c.id;
  // a frozen row (left with keep_history) keeps its max: say so, as `seqactor watch` does
  const left = c.frozen ? " · ❄ left" : "";
  text.querySelector(".meta")!.textContent = `seq ${c.maxSequence} · read ${c.readSequence} · ${ago(c.timeMs)}${left}`;
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = String(c.unread);
  badge.hidden = c.unread === 0;
  li.append(avatar, text, badge);
  li.onclick = () => void client.markRead(c.id).catch((e: Error) => showError(e));
  return li;
}

function showError(e: Error): void {
  $("error").hidden = false;
  $("error").textContent = `${e.name}: ${e.message}`;
}

function render(client: Client): void {
  const total = client.totalUnread;
  document.title = total ? `(${total}) seqactor demo` : "seqactor demo";
  $("total").textContent = `total unread: ${total}`;
  $("list").replaceChildren(...client.conversations().map((c) => row(c, client)));
}

function renderState(client: Client): void {
  $("dot").className = client.state;
  $("state").textContent = client.state;
}

async function main(): Promise<void> {
  const claims = JSON.parse(atob((token.split(".")[1] ?? "").replace(/-/g, "+").replace(/_/g, "/")) || "{}") as { sub?: string };
  $("who").textContent = claims.sub ? `${claims.sub}'s conversations` : "seqactor";
  const client = await Client.connect(url, token, {
    deviceId: "demo-page",
    cache: new IndexedDBCache(`${url} ${claims.sub ?? ""}`),
    offlineOk: true,
  });
  (window as unknown as { seqDemo: unknown }).seqDemo = { client };
  client.addEventListener("change", () => render(client));
  client.addEventListener("state", () => renderState(client));
  client.addEventListener("error", () => client.error && showError(client.error));
  render(client);
  renderState(client);
  setInterval(() => render(client), 10_000); // refresh the "… ago" labels
}

main().catch((e: Error) => showError(e));
