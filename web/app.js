// gochat's web client: plain JavaScript, no build step, no framework.
// Every user-supplied string reaches the page through textContent, never as
// HTML. Every URL is relative to the page, so it works behind a proxy at any
// path prefix.
"use strict";

(() => {
  const MAX_CHARS = 300;
  const PAGE = 50;
  const $ = (id) => document.getElementById(id);

  const state = {
    me: null,
    ws: null,
    lastId: 0, // newest message id seen: reconnects ask for what came after
    oldestId: 0, // oldest message shown: scroll-back asks for what came before
    seen: new Set(), // ids on the page, so replays never show a message twice
    pending: [], // own messages sent and not yet acknowledged, oldest first
    online: new Set(),
    backoff: 0,
    timer: null,
    holdUntil: 0,
    loadingOlder: false,
    noOlder: false,
  };

  // --- HTTP ---

  async function request(path, options = {}) {
    const resp = await fetch(path, { credentials: "same-origin", ...options });
    let body = null;
    try {
      body = await resp.json();
    } catch {
      // a proxy's HTML error page, say: the status still tells
    }
    return { status: resp.status, body };
  }

  function postJSON(path, value) {
    return request(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(value),
    });
  }

  function errorText(res) {
    if (res.status === 429) return "Too many attempts. Wait a moment and try again.";
    return (res.body && res.body.error) || `Request failed (${res.status}).`;
  }

  // --- views ---

  function setStatus(text) {
    $("status").textContent = text;
  }

  function show(view) {
    $("auth").hidden = view !== "auth";
    $("chat").hidden = view !== "chat";
    $("whoami").hidden = view !== "chat";
  }

  function showAuth(message) {
    closeSocket();
    state.me = null;
    show("auth");
    setStatus(message || "");
    $("login-key").focus();
  }

  function enterChat(name) {
    Object.assign(state, {
      me: name, lastId: 0, oldestId: 0, seen: new Set(), pending: [],
      online: new Set(), backoff: 0, noOlder: false,
    });
    $("me").textContent = name;
    $("messages").replaceChildren();
    $("send-error").textContent = "";
    renderOnline();
    show("chat");
    connect();
    $("message-input").focus();
  }

  // --- register and log in ---

  $("register-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("register-error").textContent = "";
    const username = $("register-name").value.trim();
    const res = await postJSON("api/register", { username });
    if (res.status !== 201) {
      $("register-error").textContent = errorText(res);
      return;
    }
    $("key-value").value = res.body.key;
    $("new-key").hidden = false;
    $("register-form").hidden = true;
    $("copy-key").focus();
  });

  $("copy-key").addEventListener("click", async () => {
    const field = $("key-value");
    try {
      await navigator.clipboard.writeText(field.value);
    } catch {
      field.select(); // no clipboard API (plain http): leave it selected
      document.execCommand("copy");
    }
    $("copy-key").textContent = "Copied";
  });

  $("use-key").addEventListener("click", () => login($("key-value").value));

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    login($("login-key").value.trim());
  });

  async function login(key) {
    $("login-error").textContent = "";
    const res = await postJSON("api/login", { key });
    if (res.status !== 200) {
      $("login-error").textContent = res.status === 401 ? "Unknown key." : errorText(res);
      return;
    }
    $("login-key").value = "";
    $("key-value").value = "";
    $("new-key").hidden = true;
    $("register-form").hidden = false;
    $("copy-key").textContent = "Copy";
    enterChat(res.body.username);
  }

  $("logout").addEventListener("click", async () => {
    closeSocket();
    await request("api/logout", { method: "POST" }).catch(() => {});
    showAuth("Logged out.");
  });

  // --- the socket ---

  function socketURL() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (state.lastId > 0) url.searchParams.set("since", String(state.lastId));
    return url.href;
  }

  function connect() {
    clearTimeout(state.timer);
    const ws = new WebSocket(socketURL());
    state.ws = ws;
    setStatus(state.backoff ? "Reconnecting…" : "Connecting…");
    ws.onopen = () => {
      state.backoff = 0;
      setStatus("Connected.");
      refreshOnline();
    };
    ws.onmessage = (e) => {
      if (state.ws !== ws) return;
      try {
        handleFrame(JSON.parse(e.data));
      } catch (err) {
        console.error("bad frame", err);
      }
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.ws = null;
      connectionLost();
    };
  }

  function closeSocket() {
    clearTimeout(state.timer);
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close();
  }

  // connectionLost tells an ended session (back to log in) from a dropped
  // connection (try again, waiting longer each time). A WebSocket never
  // shows the HTTP status of a refused upgrade, so ask the API.
  async function connectionLost() {
    for (const p of state.pending) markPending(p, "not confirmed: connection lost", false);
    let res = null;
    try {
      res = await request("api/user/@me");
    } catch {
      // the server is unreachable: keep trying
    }
    if (state.me === null) return;
    if (res && (res.status === 401 || res.status === 422)) {
      showAuth("Your session has ended. Please log in again.");
      return;
    }
    const delay = Math.max(Math.min(30000, 1000 * 2 ** state.backoff), state.holdUntil - Date.now());
    state.backoff++;
    setStatus(`Connection lost. Reconnecting in ${Math.ceil(delay / 1000)} s…`);
    state.timer = setTimeout(connect, delay);
  }

  // --- frames ---

  function handleFrame(f) {
    if ("status" in f) return handleAck(f);
    switch (f.event) {
      case "join":
        state.online.add(f.username);
        renderOnline();
        return addPresence(f.username, "joined");
      case "leave":
        state.online.delete(f.username);
        renderOnline();
        return addPresence(f.username, "left");
      case "gap":
        return addNotice("Some messages were missed while you were away; scroll up for older ones.", "notice");
    }
    if ("message" in f) addMessage(f);
  }

  const ACK_ERRORS = {
    message_too_long: `Too long: a message has at most ${MAX_CHARS} characters.`,
    invalid_message: "The server could not read that message.",
    rate_limited: "Slow down: you are sending messages too fast.",
    storage_error: "The server could not store that message. Please try again.",
  };

  function handleAck(f) {
    const p = state.pending.shift();
    if (!p) return;
    if (f.status) {
      p.li.dataset.id = f.id;
      state.seen.add(f.id);
      state.lastId = Math.max(state.lastId, f.id);
      if (!state.oldestId) state.oldestId = f.id;
      markPending(p, "delivered", true);
      return;
    }
    markPending(p, "not sent", false);
    p.li.classList.add("failed");
    $("send-error").textContent = ACK_ERRORS[f.code] || `Not sent (${f.code}).`;
  }

  function markPending(p, text, ok) {
    const el = p.li.querySelector(".state");
    el.textContent = ok ? `✓ ${text}` : text;
  }

  function addMessage(m) {
    if (m.id && state.seen.has(m.id)) return;
    if (m.id) {
      state.seen.add(m.id);
      state.lastId = Math.max(state.lastId, m.id);
      if (!state.oldestId || m.id < state.oldestId) state.oldestId = m.id;
    }
    // After a reconnect, the replay may hold an own message whose ack was lost.
    if (m.author === state.me) {
      const i = state.pending.findIndex((p) => p.text === m.message);
      if (i >= 0) {
        const [p] = state.pending.splice(i, 1);
        p.li.dataset.id = m.id;
        markPending(p, "delivered", true);
        return;
      }
    }
    appendItem(messageItem(m, m.author === state.me));
  }

  function messageItem(m, mine) {
    const li = document.createElement("li");
    if (mine) li.classList.add("mine");
    if (m.id) li.dataset.id = m.id;
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = m.author;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.message;
    const time = document.createElement("time");
    time.className = "time";
    const when = m.time ? new Date(m.time) : new Date();
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    li.append(author, text, time);
    return li;
  }

  // A run of joins and leaves with no message between them is one line
  // ("ann, bo and 12 others joined; cy left"), so that a crowd arriving, or
  // someone reconnecting in a loop, cannot flood the page.
  function addPresence(name, what) {
    let li = $("messages").lastElementChild;
    if (!li || !li.presence) {
      li = document.createElement("li");
      li.className = "event";
      li.presence = new Map();
      appendItem(li);
    }
    li.presence.delete(name); // the newest state of each name, in order
    li.presence.set(name, what);
    const groups = { joined: [], left: [] };
    for (const [who, did] of li.presence) groups[did].push(who);
    li.textContent = ["joined", "left"]
      .filter((did) => groups[did].length > 0)
      .map((did) => {
        const names = groups[did];
        const more = names.length > 3 ? ` and ${names.length - 3} others` : "";
        return `${names.slice(0, 3).join(", ")}${more} ${did}`;
      })
      .join("; ");
  }

  function addNotice(text, kind) {
    const li = document.createElement("li");
    li.className = kind;
    li.textContent = text;
    appendItem(li);
  }

  function appendItem(li) {
    const list = $("messages");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(li);
    if (atBottom) list.scrollTop = list.scrollHeight;
    updateOlderButton();
  }

  // --- scroll-back ---

  function updateOlderButton() {
    const list = $("messages");
    let item = list.querySelector("li.older");
    const wanted = state.oldestId > 1 && !state.noOlder;
    if (!wanted) {
      if (item) item.remove();
      return;
    }
    if (item) return;
    item = document.createElement("li");
    item.className = "older notice";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Load older messages";
    button.addEventListener("click", loadOlder);
    item.append(button);
    list.prepend(item);
  }

  async function loadOlder() {
    if (state.loadingOlder || state.noOlder || !state.oldestId) return;
    state.loadingOlder = true;
    try {
      const res = await request(`api/messages?before=${state.oldestId}&limit=${PAGE}`);
      if (res.status !== 200) return;
      const msgs = res.body.messages;
      if (msgs.length < PAGE) state.noOlder = true;
      const list = $("messages");
      const before = list.scrollHeight;
      const anchor = list.querySelector("li.older")?.nextSibling ?? list.firstChild;
      for (const m of msgs) {
        if (state.seen.has(m.id)) continue;
        state.seen.add(m.id);
        state.oldestId = Math.min(state.oldestId, m.id);
        list.insertBefore(messageItem(m, m.author === state.me), anchor);
      }
      list.scrollTop += list.scrollHeight - before; // keep what was in view in place
      if (state.oldestId <= 1) state.noOlder = true;
      updateOlderButton();
    } finally {
      state.loadingOlder = false;
    }
  }

  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 40) loadOlder();
  });

  // --- online list ---

  async function refreshOnline() {
    const res = await request("api/online").catch(() => null);
    if (!res || res.status !== 200) return;
    state.online = new Set(res.body.online_clients);
    renderOnline();
  }

  function renderOnline() {
    const names = [...state.online].sort((a, b) => a.localeCompare(b));
    $("online-list").replaceChildren(...names.map((n) => {
      const li = document.createElement("li");
      li.textContent = n;
      return li;
    }));
    $("online-count").textContent = `(${names.length})`;
  }

  // --- sending ---

  function updateCounter() {
    const n = [...$("message-input").value].length; // code points, as the server counts
    $("counter").textContent = `${n}/${MAX_CHARS}`;
    $("counter").classList.toggle("over", n > MAX_CHARS);
  }

  $("message-input").addEventListener("input", updateCounter);

  $("send-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("message-input");
    const text = input.value;
    if (!text) return;
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      $("send-error").textContent = "Not connected yet: your message is still in the box.";
      return;
    }
    $("send-error").textContent = "";
    state.ws.send(JSON.stringify({ message: text }));
    const li = messageItem({ author: state.me, message: text }, true);
    const mark = document.createElement("span");
    mark.className = "state";
    mark.textContent = "sending…";
    li.append(mark);
    state.pending.push({ li, text });
    appendItem(li);
    $("messages").scrollTop = $("messages").scrollHeight;
    input.value = "";
    updateCounter();
  });

  // A hook for the browser tests, and for trying reconnection by hand:
  // drop the connection as a network failure would, and stay away holdMs.
  window.gochatDebug = {
    dropConnection(holdMs = 0) {
      state.holdUntil = Date.now() + holdMs;
      state.backoff = 0;
      if (state.ws) state.ws.close();
    },
  };

  // --- start: a reload keeps the session (the cookie is HttpOnly: ask) ---

  request("api/user/@me")
    .then((res) => (res.status === 200 ? enterChat(res.body.username) : showAuth()))
    .catch(() => showAuth("The server is not answering."));
})();
