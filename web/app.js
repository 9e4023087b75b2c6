// gochat's web client: plain JavaScript, no build step, no framework.
// Every user-supplied string reaches the page through textContent, never as
// HTML. Every URL is relative to the page, so it works behind a proxy at any
// path prefix.
"use strict";

(() => {
  const MAX_CHARS = 300;
  const PAGE = 50;
  const MAX_ITEMS = 500; // lines kept on the page; older ones can be loaded again
  const TITLE = document.title;
  const $ = (id) => document.getElementById(id);

  const state = {
    me: null,
    ws: null,
    lastId: 0, // newest message id seen: reconnects ask for what came after
    generation: "", // the database's, when lastId was seen: a restore changes it
    oldestId: 0, // oldest message shown: scroll-back asks for what came before
    seen: new Set(), // ids on the page, so replays never show a message twice
    pending: [], // own messages sent and not yet acknowledged, oldest first
    online: new Set(),
    backoff: 0,
    timer: null,
    holdUntil: 0,
    loadingOlder: false,
    noOlder: false,
    admin: false, // may delete messages and ban users
    opened: false, // the current socket got as far as open
    hadSocket: false, // some socket of this sign-in got as far as open
    conflicts: 0, // refusals in a row while the server counted us online
    countdownTimer: null,
    retryAt: 0, // when the next reconnect is due, for the countdown
    unread: 0, // messages that came while the tab was hidden
    typing: new Map(), // who is typing: name -> timer that forgets them
    typedAt: 0, // when we last told the server we are typing
    takeover: false, // the next connect replaces this user's socket elsewhere
    banned: false, // the server said so, right before it closed the socket
  };

  // --- HTTP ---

  // request fetches path. Every POST and DELETE says it is JSON, as the
  // server insists, so that no plain form can change anything.
  async function request(path, options = {}) {
    const headers = options.method ? { "Content-Type": "application/json", ...options.headers } : options.headers;
    const resp = await fetch(path, { credentials: "same-origin", ...options, headers });
    let body = null;
    try {
      body = await resp.json();
    } catch {
      // a proxy's HTML error page, say: the status still tells
    }
    return { status: resp.status, body };
  }

  function postJSON(path, value) {
    return request(path, { method: "POST", body: JSON.stringify(value) });
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

  // enterChat shows the room to name; admin and generation are what
  // /api/user/@me said, or undefined after a login, which does not say.
  function enterChat(name, admin, generation) {
    Object.assign(state, {
      me: name, lastId: 0, generation: generation || "", oldestId: 0, seen: new Set(), pending: [],
      online: new Set(), backoff: 0, noOlder: false, unread: 0, hadSocket: false, conflicts: 0, banned: false,
    });
    $("notify").hidden = !("Notification" in window) || Notification.permission !== "default";
    $("me").textContent = name;
    state.admin = admin === true;
    if (admin === undefined) {
      request("api/user/@me").then((res) => {
        state.admin = res.status === 200 && res.body.admin === true;
        if (res.status === 200 && !state.generation) state.generation = res.body.generation;
        document.querySelectorAll("#messages li[data-id]").forEach(addMessageActions);
        renderOnline();
        showAdminPanel();
      }).catch(() => {});
    }
    $("messages").replaceChildren();
    $("send-error").textContent = "";
    renderOnline();
    showAdminPanel();
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
    // A real form with a username and a new password: browsers and password
    // managers offer to save the key when it is submitted.
    $("key-user").value = username;
    $("key-value").value = res.body.key;
    $("key-shown").textContent = res.body.key;
    $("new-key").hidden = false;
    $("register-form").hidden = true;
    $("copy-key").focus();
  });

  $("download-key").addEventListener("click", () => {
    const text = `gochat key for ${$("key-user").value} at ${location.origin}${location.pathname}\n${$("key-value").value}\n`;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
    a.download = `gochat-key-${$("key-user").value}.txt`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
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

  $("new-key").addEventListener("submit", (e) => {
    e.preventDefault();
    login($("key-value").value);
  });

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    login($("login-key").value.trim());
  });

  async function login(key) {
    $("login-error").textContent = "";
    const res = await postJSON("api/login", { key });
    if (res.status !== 200) {
      $("login-error").textContent = res.status === 401 ? "Unknown key."
        : res.status === 403 ? "You have been banned from this chat." : errorText(res);
      return;
    }
    $("login-key").value = "";
    $("key-value").value = "";
    $("key-shown").textContent = "";
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
    if (state.lastId > 0 && state.generation) url.searchParams.set("generation", state.generation);
    if (state.takeover) url.searchParams.set("takeover", "1");
    return url.href;
  }

  function connect() {
    clearTimeout(state.timer);
    const ws = new WebSocket(socketURL());
    state.ws = ws;
    state.opened = false;
    setStatus(state.backoff ? "Reconnecting…" : "Connecting…");
    ws.onopen = () => {
      state.takeover = false;
      state.backoff = 0;
      state.opened = state.hadSocket = true;
      state.conflicts = 0;
      $("banner").hidden = true;
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
    ws.onclose = (e) => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (e.code === 4000) return openElsewhere(); // another tab or device took over
      connectionLost();
    };
  }

  function closeSocket() {
    clearTimeout(state.timer);
    $("banner").hidden = true;
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
      showAuth(state.banned ? "You have been banned from this chat." : "Your session has ended. Please log in again.");
      return;
    }
    let delay = Math.max(Math.min(30000, 1000 * 2 ** state.backoff), state.holdUntil - Date.now());
    // Refused before it opened while the server counts us online: another
    // tab or device holds this user's one socket. Retrying silently would
    // never end; say so and let the user take over once it is closed.
    if (!state.opened && res && res.status === 200 && res.body.online) {
      // Right after a drop it may be this tab's own old socket, which the
      // server checks within 5 s: try once more after that.
      if (!state.hadSocket || state.conflicts++ > 0) return openElsewhere();
      delay = 6000;
    }
    state.backoff++;
    state.retryAt = Date.now() + delay;
    state.timer = setTimeout(connect, delay);
    countdown();
  }

  // countdown keeps the banner's "Reconnecting in N s" true each second.
  function countdown() {
    if (state.ws || !state.retryAt || state.me === null) return;
    const secs = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
    setStatus(`Connection lost. Reconnecting in ${secs} s…`);
    showBanner(`Connection lost. Reconnecting in ${secs} s…`, "Retry now");
    clearTimeout(state.countdownTimer);
    if (secs > 0) state.countdownTimer = setTimeout(countdown, 250);
  }

  // openElsewhere offers to take over from the tab or device that has this
  // user's one socket, and meanwhile shows the room read-only: the newest
  // history and who is online. It does not retry on its own.
  async function openElsewhere() {
    for (const p of state.pending) markPending(p, "not confirmed: open elsewhere", false);
    setStatus("Open elsewhere.");
    showBanner("gochat is open in another tab or device.", "Use it here");
    state.takeover = true;
    refreshOnline();
    if (state.lastId > 0) return;
    const res = await request(`api/messages?limit=${PAGE}`).catch(() => null);
    if (!res || res.status !== 200 || state.ws) return;
    for (const m of res.body.messages) addMessage({ ...m, history: true });
    if (res.body.messages.length < PAGE) state.noOlder = true;
    updateOlderButton();
    scrollToEnd();
  }

  function showBanner(text, action) {
    $("banner-text").textContent = text;
    $("retry").textContent = action;
    $("banner").hidden = false;
  }

  $("retry").addEventListener("click", () => {
    state.retryAt = 0;
    state.holdUntil = 0;
    connect();
  });

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
      case "delete":
        document.querySelector(`#messages li[data-id="${Number(f.id)}"]`)?.remove();
        return renderDays();
      case "gap": // the newest history follows: start the page again from it
        state.generation = f.generation || state.generation;
        state.seen = new Set();
        state.lastId = state.oldestId = 0;
        state.noOlder = false;
        $("messages").replaceChildren();
        return addNotice("Some messages were missed while you were away; scroll up for older ones.", "notice");
      case "typing":
        return showTyping(f.username, true);
      case "banned":
        state.banned = true;
        return;
    }
    if ("message" in f) {
      showTyping(f.author, false); // her message is what she was typing
      addMessage(f);
    }
  }

  // The server sends a typing event at most every 2 s per user: someone is
  // shown typing until 5 s after the last one, or until their message.
  function showTyping(name, typing) {
    clearTimeout(state.typing.get(name));
    state.typing.delete(name);
    if (typing) state.typing.set(name, setTimeout(() => showTyping(name, false), 5000));
    const names = [...state.typing.keys()];
    $("typing").textContent =
      names.length === 0 ? "" :
      names.length === 1 ? `${names[0]} is typing…` :
      names.length <= 3 ? `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…` :
      "Several people are typing…";
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
      addMessageActions(p.li);
      state.seen.add(f.id);
      state.lastId = Math.max(state.lastId, f.id);
      if (!state.oldestId) state.oldestId = f.id;
      markPending(p, "delivered", true);
      return;
    }
    markPending(p, "not sent", false);
    p.li.classList.add("failed");
    $("send-error").textContent = ACK_ERRORS[f.code] || `Not sent (${f.code}).`;
    const input = $("message-input");
    if (!input.value) { // give the text back, to edit and send again
      input.value = p.text;
      inputChanged();
    }
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
    const mine = m.author === state.me;
    appendItem(messageItem(m, mine), !m.history && !mine);
    if (m.history || mine) return;
    $("announcer").textContent = `${m.author}: ${m.message}`;
    if (document.hidden) {
      state.unread++;
      document.title = `(${state.unread}) ${TITLE}`;
      if (mentionsMe(m.message) && "Notification" in window && Notification.permission === "granted") {
        new Notification(`${m.author} mentioned you`, { body: m.message, tag: "gochat-mention" });
      }
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      state.unread = 0;
      document.title = TITLE;
    }
  });

  $("notify").addEventListener("click", async () => {
    await Notification.requestPermission();
    $("notify").hidden = Notification.permission !== "default";
  });

  function messageItem(m, mine) {
    const li = document.createElement("li");
    if (mine) li.classList.add("mine");
    if (m.id) li.dataset.id = m.id;
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = m.author;
    const text = document.createElement("span");
    text.className = "text";
    text.append(...richText(m.message));
    const time = document.createElement("time");
    time.className = "time";
    const when = m.time ? new Date(m.time) : new Date();
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    time.title = when.toLocaleString([], { dateStyle: "full", timeStyle: "short" });
    time.setAttribute("aria-label", time.title);
    li.dataset.day = when.toDateString();
    li.dataset.author = m.author;
    li.dataset.ts = String(when.getTime());
    li.append(author, text, time);
    addMessageActions(li);
    return li;
  }

  // A stored message of one's own, or any for an admin, gets a small menu
  // to delete it.
  function addMessageActions(li) {
    const mine = li.classList.contains("mine");
    if (!(state.admin || mine) || !li.dataset.id || li.querySelector("button.more")) return;
    actionMenu(li, "Delete", "Delete this message?", async () => {
      const res = await request(`api/messages/${li.dataset.id}`, { method: "DELETE" }).catch(() => null);
      if (res && res.status !== 204 && res.status !== 404) addNotice(`Not deleted: ${errorText(res)}`, "notice");
    });
  }

  // actionMenu adds to el a "⋯" button that opens a small menu of one
  // action, which asks before it acts.
  function actionMenu(el, label, question, act) {
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.textContent = "⋯";
    more.setAttribute("aria-label", `${label}…`);
    more.setAttribute("aria-expanded", "false");
    const menu = document.createElement("span");
    menu.className = "popover";
    menu.hidden = true;
    const close = () => {
      menu.hidden = true;
      more.setAttribute("aria-expanded", "false");
    };
    more.addEventListener("click", () => {
      if (!menu.hidden) return close();
      menu.replaceChildren(actionButton(label, "", () => {
        const ask = document.createElement("span");
        ask.textContent = question;
        menu.replaceChildren(ask, actionButton(label, "danger", () => { close(); act(); }), actionButton("Cancel", "", close));
        menu.querySelector("button.danger").focus();
      }));
      menu.hidden = false;
      more.setAttribute("aria-expanded", "true");
      menu.querySelector("button").focus();
    });
    el.append(more, menu);
  }

  function actionButton(text, className, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.className = className;
    b.addEventListener("click", onClick);
    return b;
  }

  // richText turns a message into nodes: text as text, http(s) and www.
  // links as links, and @name of the signed-in user marked. Nothing else
  // becomes markup.
  function richText(message) {
    const nodes = [];
    const pattern = /(?:https?:\/\/|www\.)[^\s<>"]+|@[A-Za-z0-9]{1,32}\b/g;
    let at = 0;
    for (const match of message.matchAll(pattern)) {
      if (match.index < at) continue;
      const token = match[0].startsWith("@") ? match[0] : trimLink(match[0]);
      let node = null;
      if (token.startsWith("@") && token.slice(1).toLowerCase() === String(state.me).toLowerCase()) {
        node = document.createElement("mark");
        node.className = "mention";
      } else if (!token.startsWith("@")) {
        node = document.createElement("a");
        node.href = token.startsWith("www.") ? `https://${token}` : token;
        node.rel = "noopener noreferrer";
        node.target = "_blank";
      }
      if (!node) continue;
      nodes.push(document.createTextNode(message.slice(at, match.index)));
      node.textContent = token;
      nodes.push(node);
      at = match.index + token.length;
    }
    nodes.push(document.createTextNode(message.slice(at)));
    return nodes;
  }

  // trimLink leaves out of a link the punctuation that ends the sentence
  // around it: "see https://x.org/a." links to https://x.org/a. A closing
  // parenthesis stays when the link opened one: (wiki/Go_(language)).
  function trimLink(link) {
    let end = link.length;
    while (end > 0 && ".,;:!?'\")]".includes(link[end - 1])) {
      const part = link.slice(0, end);
      if (link[end - 1] === ")" && part.split("(").length >= part.split(")").length) break;
      end--;
    }
    return link.slice(0, end);
  }

  function mentionsMe(message) {
    return new RegExp(`@${state.me}\\b`, "i").test(message);
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

  function atBottom() {
    const list = $("messages");
    return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  }

  // appendItem adds a line at the end, following it when the reader was at
  // the end, else offering to jump there when it is news.
  function appendItem(li, news = false) {
    const list = $("messages");
    const follow = atBottom();
    // One author's messages within a few minutes show the name once.
    const prev = list.lastElementChild;
    if (li.dataset.author && prev && prev.dataset.author === li.dataset.author &&
        prev.dataset.day === li.dataset.day && Number(li.dataset.ts) - Number(prev.dataset.ts) < 5 * 60 * 1000) {
      li.classList.add("cont");
    }
    if (li.dataset.day && li.dataset.day !== lastDay()) list.append(daySeparator(li.dataset.day));
    list.append(li);
    if (trimOldest()) renderDays();
    if (follow) list.scrollTop = list.scrollHeight;
    else if (news) $("new-pill").hidden = false;
    updateOlderButton();
  }

  function scrollToEnd() {
    $("messages").scrollTop = $("messages").scrollHeight;
    $("new-pill").hidden = true;
  }

  $("new-pill").addEventListener("click", scrollToEnd);

  // trimOldest keeps the page to MAX_ITEMS lines; what goes can be loaded
  // again from the server. It reports whether it took any away.
  function trimOldest() {
    const list = $("messages");
    if (list.childElementCount <= MAX_ITEMS) return false;
    const items = list.querySelectorAll("li:not(.older):not(.day):not(.start)");
    for (let i = 0; i < items.length - MAX_ITEMS; i++) {
      if (items[i].dataset.id) state.seen.delete(Number(items[i].dataset.id));
      items[i].remove();
    }
    if (items.length > MAX_ITEMS) {
      const first = list.querySelector("li[data-id]");
      if (first) state.oldestId = Number(first.dataset.id);
      state.noOlder = false;
      list.querySelector("li.start")?.remove();
    }
    return items.length > MAX_ITEMS;
  }

  // lastDay is the day of the newest message on the page.
  function lastDay() {
    for (let li = $("messages").lastElementChild; li; li = li.previousElementSibling) {
      if (li.dataset.day) return li.dataset.day;
    }
    return null;
  }

  // renderDays puts "Today", "Yesterday" or the date before the first
  // message of each day, all over again: after older messages came in
  // above, or some went. A message arriving at the end needs only
  // appendItem's check.
  function renderDays() {
    const list = $("messages");
    list.querySelectorAll("li.day").forEach((li) => li.remove());
    let last = null;
    for (const li of list.querySelectorAll("li[data-day]")) {
      if (li.dataset.day !== last) li.before(daySeparator(li.dataset.day));
      last = li.dataset.day;
    }
  }

  function daySeparator(day) {
    const today = new Date();
    const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
    const sep = document.createElement("li");
    sep.className = "day";
    sep.textContent = day === today.toDateString() ? "Today"
      : day === yesterday.toDateString() ? "Yesterday"
      : new Date(day).toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
    return sep;
  }

  // --- scroll-back ---

  function updateOlderButton() {
    const list = $("messages");
    let item = list.querySelector("li.older");
    if (state.oldestId === 1) state.noOlder = true; // ids start at 1
    const wanted = state.oldestId > 1 && !state.noOlder;
    if (state.noOlder && !list.querySelector("li.start")) {
      const start = document.createElement("li");
      start.className = "start";
      start.textContent = "This is the start of the conversation.";
      list.prepend(start);
    }
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
    const button = $("messages").querySelector("li.older button");
    if (button) {
      button.textContent = "Loading…";
      button.disabled = true;
    }
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
      renderDays();
      list.scrollTop += list.scrollHeight - before; // keep what was in view in place
      if (state.oldestId <= 1) state.noOlder = true;
    } finally {
      state.loadingOlder = false;
      if (button) {
        button.textContent = "Load older messages";
        button.disabled = false;
      }
      updateOlderButton();
    }
  }

  // Older messages load when the reader scrolls up to the top; following
  // the end down, as the history arrives, starts near the top too.
  let lastScrollTop = 0;
  $("messages").addEventListener("scroll", () => {
    const top = $("messages").scrollTop;
    if (top < 40 && top < lastScrollTop) loadOlder();
    lastScrollTop = top;
    if (atBottom()) $("new-pill").hidden = true;
  });

  $("online-toggle").addEventListener("click", () => {
    const follow = atBottom();
    const open = $("online").classList.toggle("open");
    if (follow) scrollToEnd();
    $("online-toggle").setAttribute("aria-expanded", String(open));
    $("online-toggle").textContent = open ? "Hide" : "Show";
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
      if (state.admin && n !== state.me) actionMenu(li, "Ban", `Ban ${n}?`, () => ban(n)); // admins may ban from here
      return li;
    }));
    $("online-count").textContent = `(${names.length})`;
    $("show-online").textContent = `Who is online (${names.length})`;
  }

  // --- moderation (admins) ---

  function showAdminPanel() {
    $("admin-panel").hidden = !state.admin;
    if (state.admin) refreshBans();
  }

  async function ban(name) {
    const res = await postJSON(`api/user/${encodeURIComponent(name)}/ban`, {}).catch(() => null);
    $("ban-error").textContent = !res ? "The server is not answering."
      : res.status === 200 ? "" : res.status === 404 ? `There is no user ${name}.` : errorText(res);
    refreshBans();
  }

  async function refreshBans() {
    const res = await request("api/bans").catch(() => null);
    if (!res || res.status !== 200) return;
    $("ban-list").replaceChildren(...res.body.bans.map((name) => {
      const li = document.createElement("li");
      li.textContent = `${name} `;
      li.append(actionButton("Unban", "", async () => {
        await request(`api/user/${encodeURIComponent(name)}/ban`, { method: "DELETE" }).catch(() => null);
        refreshBans();
      }));
      return li;
    }));
    if (res.body.bans.length === 0) $("ban-list").textContent = "No one.";
  }

  $("ban-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("ban-name").value.trim();
    const form = $("ban-form");
    form.querySelector(".ask")?.remove();
    const ask = document.createElement("p");
    ask.className = "ask";
    ask.append(`Ban ${name}? `, actionButton("Ban", "danger", () => {
      ask.remove();
      $("ban-name").value = "";
      ban(name);
    }), " ", actionButton("Cancel", "", () => ask.remove()));
    form.append(ask);
    ask.querySelector("button.danger").focus();
  });

  // --- the header's menu (a phone shows only the name, the state and it) ---

  function closeMenu() {
    $("menu").classList.remove("open");
    $("menu-toggle").setAttribute("aria-expanded", "false");
  }

  $("menu-toggle").addEventListener("click", () => {
    const open = $("menu").classList.toggle("open");
    $("menu-toggle").setAttribute("aria-expanded", String(open));
  });

  $("show-online").addEventListener("click", () => {
    closeMenu();
    $("online-toggle").click();
  });

  // --- sending ---

  // inputChanged counts the box's characters and fits the box to its text,
  // which grows up to a few lines; Enter sends, Shift+Enter starts a line.
  function inputChanged() {
    const input = $("message-input");
    const n = [...input.value].length; // code points, as the server counts
    $("counter").textContent = `${n}/${MAX_CHARS}`;
    $("counter").classList.toggle("over", n > MAX_CHARS);
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight + 2, 160)}px`;
  }

  // keypress too: some keyboards (and test drivers) send the Enter's text
  // apart from its keydown, and it must not land in the emptied box.
  function enterSends(e) {
    if (e.key !== "Enter" || e.shiftKey || e.isComposing) return;
    e.preventDefault();
    if (e.type === "keydown") $("send-form").requestSubmit();
  }
  $("message-input").addEventListener("keydown", enterSends);
  $("message-input").addEventListener("keypress", enterSends);

  // Pressing Send must not take the focus from the box: on a phone that
  // would close the keyboard after every message.
  $("send-form").querySelector("button").addEventListener("pointerdown", (e) => e.preventDefault());

  $("message-input").addEventListener("input", () => {
    inputChanged();
    $("send-error").textContent = ""; // it was about the text before this change
    // At most every 2.5 s: the server passes one on every 2 s at most.
    const ws = state.ws;
    if ($("message-input").value && ws && ws.readyState === WebSocket.OPEN && Date.now() - state.typedAt > 2500) {
      state.typedAt = Date.now();
      ws.send(JSON.stringify({ typing: true }));
    }
  });

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
    state.typedAt = 0; // the next message's typing is news again
    const li = messageItem({ author: state.me, message: text }, true);
    const mark = document.createElement("span");
    mark.className = "state";
    mark.textContent = "sending…";
    li.append(mark);
    state.pending.push({ li, text });
    appendItem(li);
    scrollToEnd();
    input.value = "";
    inputChanged();
    input.focus();
  });

  // A hook for the browser tests, and for trying reconnection by hand:
  // drop the connection as a network failure would, and stay away holdMs.
  window.gochatDebug = {
    dropConnection(holdMs = 0) {
      state.holdUntil = Date.now() + holdMs;
      state.backoff = 0;
      if (state.ws) state.ws.close();
    },
    receive: handleFrame, // a frame as if the server sent it
  };

  // --- start: a reload keeps the session (the cookie is HttpOnly: ask) ---

  setStatus("Loading…");
  request("api/user/@me")
    .then((res) => (res.status === 200 ? enterChat(res.body.username, res.body.admin, res.body.generation) : showAuth()))
    .catch(() => showAuth("The server is not answering."));
})();
