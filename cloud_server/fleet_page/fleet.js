// The fleet page: the broker's retained status, read over MQTT over WebSockets as the read-only dashboard
// account (config.json, from `sfp-cloud dashboard`), shown live. window.fleet holds what is shown.
"use strict";
const fleet = { server: null, enrolled: [], devices: {}, workers: {}, rounds: {}, connected: false };
window.fleet = fleet;

function device(id) {
  return fleet.devices[id] || (fleet.devices[id] = { status: null, presence: null });
}

function presenceOf(d) {
  if (!d.presence) return "unknown";
  if (d.presence.state === "online") return "online";
  return d.presence.cause === "lost" ? "lost" : "offline";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
}

function render() {
  const s = fleet.server || {};
  const online = Object.values(fleet.devices).filter((d) => presenceOf(d) === "online").length;
  document.getElementById("server").textContent =
    `server ${s.state || "unknown"}, round ${s.round ?? "-"}/${s.rounds ?? "-"}, ` +
    `${fleet.enrolled.length || s.enrolled || 0} enrolled, ${online} online`;
  const workers = Object.entries(fleet.workers).map(([id, w]) => `${id} ${w.state || ""}`);
  document.getElementById("workers").textContent = workers.length ? `body workers: ${workers.join(", ")}` : "";
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  const now = Date.now() / 1000;
  const ids = new Set([...fleet.enrolled, ...Object.keys(fleet.devices)]);
  for (const id of [...ids].sort()) {
    const d = device(id), st = d.status || {}, state = presenceOf(d);
    const row = body.insertRow();
    row.dataset.device = id;
    cell(row, id);
    cell(row, state, state);
    cell(row, (st.activity || "-") + (st.progress != null ? ` ${st.progress}%` : ""));
    cell(row, st.round ?? "-", "num");
    cell(row, st.samples ?? "-", "num");
    cell(row, st.profile || "-");
    cell(row, st.bytes_sent != null ? (st.bytes_sent / 1e6).toFixed(2) : "-", "num");
    cell(row, st.bytes_received != null ? (st.bytes_received / 1e6).toFixed(2) : "-", "num");
    cell(row, st.last_seen ? `${Math.max(0, Math.round(now - st.last_seen))} s ago` : "-", "num");
  }
  const rounds = Object.values(fleet.rounds).sort((a, b) => a.round - b.round);
  const labels = rounds.map((r) => r.round);
  charts.accuracy.data.labels = labels;
  charts.accuracy.data.datasets[0].data = rounds.map((r) => (r.accuracy == null ? null : 100 * r.accuracy));
  charts.traffic.data.labels = labels;
  charts.traffic.data.datasets[0].data = rounds.map((r) => (r.payload_up || 0) / 1e3);
  charts.traffic.data.datasets[1].data = rounds.map((r) => (r.payload_down || 0) / 1e3);
  charts.accuracy.update("none");
  charts.traffic.update("none");
}

const charts = {
  accuracy: new Chart(document.getElementById("accuracy"), {
    type: "line",
    data: { labels: [], datasets: [{ label: "accuracy of the global model (%), devices' test data", data: [] }] },
    options: { animation: false, maintainAspectRatio: false,
               scales: { y: { min: 0, max: 100, title: { display: true, text: "%" } },
                         x: { title: { display: true, text: "round" } } } },
  }),
  traffic: new Chart(document.getElementById("traffic"), {
    type: "bar",
    data: { labels: [], datasets: [{ label: "KB up per device", data: [] }, { label: "KB down per device", data: [] }] },
    options: { animation: false, maintainAspectRatio: false,
               scales: { y: { min: 0, title: { display: true, text: "KB" } },
                         x: { title: { display: true, text: "round" } } } },
  }),
};

function matches(filter, topic) {
  const f = filter.split("/"), t = topic.split("/");
  return f.length === t.length && f.every((level, i) => level === "+" || level === t[i]);
}

function onMessage(config, topic, payload) {
  if (!payload.length) return;                    // a cleared retained message
  let value;
  try { value = JSON.parse(new TextDecoder().decode(payload)); } catch (e) { return; }
  const t = config.topics, id = topic.split("/")[3];
  if (topic === t.server) fleet.server = value;
  else if (topic === t.enrolled && Array.isArray(value)) fleet.enrolled = value;
  else if (matches(t.status, topic)) device(id).status = value;
  else if (matches(t.presence, topic)) device(id).presence = value;
  else if (matches(t.workers, topic)) fleet.workers[id] = value;
  else if (matches(t.rounds, topic)) fleet.rounds[value.round] = value;
  render();
}

async function start() {
  const config = await (await fetch("config.json")).json();
  document.getElementById("title").textContent = `Federation ${config.federation}`;
  const url = new URL("mqtt", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const status = document.getElementById("connection");
  const client = mqtt.connect(url.href, { username: config.username || undefined,
                                          password: config.password || undefined,
                                          protocolVersion: 5, reconnectPeriod: 2000, clean: true });
  client.on("connect", () => {
    fleet.connected = true;
    status.className = "";
    status.textContent = `live from the broker (${config.broker})`;
    client.subscribe(Object.values(config.topics), { qos: 1 });
  });
  client.on("error", (err) => { status.className = "error"; status.textContent = `broker: ${err.message}`; });
  client.on("close", () => { fleet.connected = false; });
  client.on("message", (topic, payload) => onMessage(config, topic, payload));
  setInterval(render, 1000);                      // "last seen" keeps counting
}
start();
