package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
)

// atEnd is true when the message list is scrolled to its end.
const atEnd = `(() => {
	const list = document.getElementById("messages");
	return list.scrollHeight - list.scrollTop - list.clientHeight < 2;
})()`

// sendMany submits n messages "prefix 0" … "prefix n-1" through the form at once.
func (b *browser) sendMany(prefix string, n int) {
	b.t.Helper()
	b.exec(fmt.Sprintf(`(() => {
		const input = document.getElementById("message-input");
		const form = document.getElementById("send-form");
		for (let i = 0; i < %d; i++) { input.value = %q + " " + i; form.requestSubmit(); }
	})()`, n, prefix))
}

// On a phone the list scrolls inside itself, the input and the status stay
// in view, the newest message is shown, and the online list is a toggle.
func TestPhoneLayout(t *testing.T) {
	s := startServer(t)
	writer := newBrowser(t, "writer")
	writer.register(s.url(), "writer")
	writer.sendMany("bulk", 60)
	phone := newPhone(t, "phone")
	phone.register(s.url(), "phone")
	phone.waitFor("history", hasMessage("bulk 59"))
	phone.waitFor("layout", `(() => {
		const list = document.getElementById("messages");
		const input = document.getElementById("message-input").getBoundingClientRect();
		const last = [...list.querySelectorAll("li")].pop().getBoundingClientRect();
		const box = list.getBoundingClientRect();
		return list.scrollHeight > list.clientHeight + 100 &&
			document.scrollingElement.scrollHeight <= innerHeight + 1 &&
			input.bottom <= innerHeight && input.top >= 0 &&
			last.bottom <= box.bottom + 1 && last.top >= box.top;
	})()`)
	writer.send("fresh news")
	phone.waitFor("newest in view", hasMessage("fresh news")+" && "+atEnd)
	// One bar (name, state, menu); the messages get the rest of the screen.
	phone.waitFor("compact header", `(() => {
		const bar = document.querySelector(".bar").getBoundingClientRect();
		const list = document.getElementById("messages").getBoundingClientRect();
		const send = document.getElementById("send-form").getBoundingClientRect();
		return bar.height <= 52 && document.getElementById("me").offsetWidth > 0 &&
			document.getElementById("status").offsetWidth > 0 && document.getElementById("menu-toggle").offsetWidth > 0 &&
			document.getElementById("logout").offsetWidth === 0 && list.height >= innerHeight - bar.height - send.height - 30;
	})()`)
	phone.do("open the menu", chromedp.Click(css("#menu-toggle")))
	phone.waitFor("menu", `document.getElementById("logout").offsetWidth > 0 && document.getElementById("show-online").textContent.includes("(2)")`)
	phone.do("show online", chromedp.Click(css("#show-online")))
	phone.waitFor("online list shown", `document.getElementById("online-list").offsetHeight > 0 && document.getElementById("online-list").textContent.includes("writer")`)
	takeScreenshot(t, phone, "screenshot-phone.png")
}

// Acks pair with sends in order, and a refused message's text comes back
// to the box to be edited and sent again.
func TestQuickSendsAreMarkedRightAndRefusedTextIsKept(t *testing.T) {
	s := startServer(t)
	alice := newBrowser(t, "alice")
	alice.register(s.url(), "alice")
	long := strings.Repeat("x", 301)
	alice.exec(fmt.Sprintf(`(() => {
		const input = document.getElementById("message-input");
		const form = document.getElementById("send-form");
		input.value = "valid one"; form.requestSubmit();
		input.value = %q; form.requestSubmit();
		input.value = "valid two"; form.requestSubmit();
	})()`, long))
	alice.waitFor("marks", `(() => {
		const states = [...document.querySelectorAll("#messages li.mine .state")].map(e => e.textContent);
		return states.join("|") === "✓ delivered|not sent|✓ delivered";
	})()`)
	if v := get(alice, "input", chromedp.Value(css("#message-input"))); v != long {
		t.Fatalf("input holds %q, want the refused text back", v)
	}
}

// Typing shows on the other's page, and her message clears it.
func TestTypingIndicator(t *testing.T) {
	_, alice, bob := aliceAndBob(t)
	alice.waitFor("bob online", `document.getElementById("online-list").textContent.includes("bob")`)
	alice.do("type", chromedp.SendKeys(css("#message-input"), "hello th"))
	bob.waitFor("alice typing", `document.getElementById("typing").textContent === "alice is typing…"`)
	if got := get(alice, "own typing", chromedp.Text(css("#typing"))); got != "" {
		t.Fatalf("alice sees %q about herself", got)
	}
	alice.do("send", chromedp.SendKeys(css("#message-input"), "ere"), chromedp.Click(css("#send-form button")))
	bob.waitFor("message", hasMessage("hello there"))
	bob.waitFor("typing cleared", `document.getElementById("typing").textContent === ""`)
}

// Scrolled up, a new message shows a pill that jumps to it; in a hidden tab
// the title counts what came, and a mention notifies when allowed.
func TestUnreadPillTitleAndMentionNotification(t *testing.T) {
	_, alice, bob := aliceAndBob(t)
	alice.sendMany("filler", 40)
	bob.waitFor("filler", hasMessage("filler 39"))
	bob.exec(`document.getElementById("messages").scrollTop = 0`)
	alice.send("news while scrolled up")
	bob.waitFor("pill", hasMessage("news while scrolled up")+` && !document.getElementById("new-pill").hidden`)
	bob.do("jump", chromedp.Click(css("#new-pill")))
	bob.waitFor("at the end", `document.getElementById("new-pill").hidden && `+atEnd)

	// The page as a hidden tab, with notifications allowed.
	bob.exec(`(() => {
		window.hiddenTab = true;
		Object.defineProperty(document, "hidden", { configurable: true, get: () => window.hiddenTab });
		window.notified = [];
		window.Notification = class { constructor(title, opts) { window.notified.push(title + ": " + opts.body); } };
		window.Notification.permission = "granted";
	})()`)
	alice.send("one")
	alice.send("hey @bob, look")
	bob.waitFor("title count", `document.title === "(2) gochat"`)
	bob.waitFor("notified", `window.notified.length === 1 && window.notified[0] === "alice mentioned you: hey @bob, look"`)
	bob.exec(`window.hiddenTab = false; document.dispatchEvent(new Event("visibilitychange"))`)
	bob.waitFor("title reset", `document.title === "gochat"`)
}

// Days are marked, and each time carries its full date.
func TestDaySeparatorsAndFullDates(t *testing.T) {
	s := startServer(t)
	reader := newBrowser(t, "reader")
	reader.register(s.url(), "reader")
	yesterday := time.Now().AddDate(0, 0, -1).UTC().Format(time.RFC3339)
	lastWeek := time.Now().AddDate(0, 0, -7).UTC().Format(time.RFC3339)
	reader.exec(fmt.Sprintf(`(() => {
		const r = window.gochatDebug.receive;
		r({message: "old", author: "x", id: 100001, time: %q, history: true});
		r({message: "older day", author: "x", id: 100002, time: %q, history: true});
		r({message: "also yesterday", author: "x", id: 100003, time: %q, history: true});
		r({message: "now", author: "x", id: 100004, time: new Date().toISOString()});
	})()`, lastWeek, yesterday, yesterday))
	days := get(reader, "days", chromedp.Evaluate[string](`[...document.querySelectorAll("#messages li.day")].map(e => e.textContent).join("|")`))
	parts := strings.Split(days, "|")
	if len(parts) != 3 || parts[1] != "Yesterday" || parts[2] != "Today" || !strings.Contains(parts[0], fmt.Sprint(time.Now().AddDate(0, 0, -7).Year())) {
		t.Fatalf("day separators %q", days)
	}
	full := get(reader, "full date", chromedp.Evaluate[string](`document.querySelector("#messages li[data-id='100004'] time").getAttribute("aria-label")`))
	if !strings.Contains(full, fmt.Sprint(time.Now().Year())) {
		t.Fatalf("time's full date %q", full)
	}
}

// Links become links, the reader's own @name is marked, and nothing else is
// ever markup.
func TestLinksAndMentions(t *testing.T) {
	_, alice, bob := aliceAndBob(t)
	text := `see https://example.com/a?b=1&c=2 and @bob, not @alice <b>bold</b> javascript:alert(1)`
	alice.send(text)
	bob.waitFor("message", hasMessage(text))
	bob.waitFor("markup", `(() => {
		const li = [...document.querySelectorAll("#messages li")].pop();
		const links = li.querySelectorAll("a");
		const marks = li.querySelectorAll("mark.mention");
		return links.length === 1 && links[0].href === "https://example.com/a?b=1&c=2" &&
			links[0].rel === "noopener noreferrer" && links[0].target === "_blank" &&
			marks.length === 1 && marks[0].textContent === "@bob" && li.querySelectorAll("b").length === 0;
	})()`)
}

// A lost connection is a banner that counts down and can be cut short; a
// second tab says the user is in elsewhere, instead of retrying forever,
// and takes over when asked after the first has gone.
func TestConnectionBannerAndSecondTab(t *testing.T) {
	s := startServer(t)
	alice := newBrowser(t, "alice")
	alice.register(s.url(), "alice")
	alice.exec(`window.gochatDebug.dropConnection(8000)`)
	alice.waitFor("banner", `!document.getElementById("banner").hidden && /Reconnecting in [5-8] s/.test(document.getElementById("banner-text").textContent)`)
	alice.waitFor("count down", `/Reconnecting in [1-4] s/.test(document.getElementById("banner-text").textContent)`)
	alice.do("retry now", chromedp.Click(css("#retry")))
	alice.waitFor("connected", `document.getElementById("status").textContent === "Connected." && document.getElementById("banner").hidden`)

	tabCtx, cancel := chromedp.NewContext(alice.ctx) // a second tab, same cookies
	defer cancel()
	tab := &browser{t: t, name: "alice's second tab", ctx: tabCtx}
	if err := chromedp.Do(tabCtx); err != nil { // the tab lives as long as tabCtx
		t.Fatal(err)
	}
	alice.send("from the first tab")
	tab.do("open", chromedp.Navigate(s.url()), chromedp.WaitVisible(css("#chat")))
	tab.waitFor("open elsewhere", `document.getElementById("banner-text").textContent === "gochat is open in another tab or device." && document.getElementById("retry").textContent === "Use it here"`)
	// Not connected, the second tab still shows the room, read-only.
	tab.waitFor("history while elsewhere", hasMessage("from the first tab"))
	tab.waitFor("online while elsewhere", `document.getElementById("online-list").textContent.includes("alice")`)
	tab.do("take over", chromedp.Click(css("#retry")))
	tab.waitFor("connected", `document.getElementById("status").textContent === "Connected."`)
	// The first tab was replaced: it says so and waits to be asked back.
	alice.waitFor("replaced", `document.getElementById("banner-text").textContent === "gochat is open in another tab or device." && document.getElementById("status").textContent === "Open elsewhere."`)
	tab.send("from the second tab")
	tab.waitFor("delivered", `[...document.querySelectorAll("#messages li.mine .state")].some(e => e.textContent.includes("delivered"))`)
	alice.do("take back", chromedp.Click(css("#retry")))
	alice.waitFor("connected again", `document.getElementById("status").textContent === "Connected."`)
	alice.waitFor("missed message", hasMessage("from the second tab"))
	tab.waitFor("second tab replaced", `document.getElementById("status").textContent === "Open elsewhere."`)
}

// The page keeps at most 500 lines, announces only new messages, marks the
// start of history, and tells a lost key's owner what to do.
func TestPageStaysSmallAndSaysWhatItIs(t *testing.T) {
	s := startServer(t)
	writer := newBrowser(t, "writer")
	reader := newBrowser(t, "reader")
	writer.register(s.url(), "writer")
	writer.send("the first message")
	writer.waitFor("acked", `document.querySelector("#messages li.mine .state").textContent.includes("delivered")`)
	reader.register(s.url(), "reader")
	reader.waitFor("start marked", `document.querySelector("#messages li.start")?.textContent === "This is the start of the conversation."`)
	writer.sendMany("flood", 600)
	reader.waitFor("flood", hasMessage("flood 599"))
	if n := get(reader, "lines", chromedp.Evaluate[int](`document.querySelectorAll("#messages li:not(.day):not(.older):not(.start)").length`)); n > 500 {
		t.Fatalf("%d lines kept", n)
	}
	// Scrolled to the top, the older page shows that it is loading.
	reader.exec(`(() => {
		const realFetch = window.fetch;
		window.fetch = (url, opts) => String(url).includes("api/messages")
			? new Promise((resolve) => setTimeout(() => resolve(realFetch(url, opts)), 2000))
			: realFetch(url, opts);
		document.getElementById("messages").scrollTop = 0;
	})()`)
	reader.waitFor("loading shown", `document.querySelector("#messages li.older button")?.textContent === "Loading…"`)
	live := get(reader, "live regions", chromedp.Evaluate[string](`[...document.querySelectorAll("[aria-live]")].map(e => e.id + ":" + e.textContent).join("|")`))
	if !strings.Contains(live, "announcer:writer: flood 599") || strings.Contains(live, "messages:") {
		t.Fatalf("live regions %q", live)
	}
	other := newBrowser(t, "other")
	other.do("open", chromedp.Navigate(s.url()), chromedp.WaitVisible(css("#auth")))
	if hint := get(other, "hint", chromedp.Text(css("#auth .hint"))); !strings.Contains(hint, "cannot be recovered") || !strings.Contains(hint, "register a new name") {
		t.Fatalf("login view says %q about lost keys", hint)
	}
}

// An admin's page has a delete button on messages and a ban button in the
// online list; a deleted message goes from every page, a banned user is
// sent back to the login view. Others never see the controls.
func TestModerationFromThePage(t *testing.T) {
	s := startServer(t, "-admins", "boss")
	boss := newBrowser(t, "boss")
	bob := newBrowser(t, "bob")
	boss.register(s.url(), "boss")
	carolKey := newBrowser(t, "carol").register(s.url(), "carol")
	bob.register(s.url(), "bob")
	bob.send("spam spam")
	boss.waitFor("spam", hasMessage("spam spam"))
	bob.waitFor("no controls for bob", `document.querySelectorAll("#messages li:not(.mine) button.more, #online-list button.more").length === 0 && document.getElementById("admin-panel").hidden`)
	// One menu per message, and a confirm before anything happens.
	boss.do("message menu", chromedp.Click(css("#messages li:not(.mine) button.more")))
	boss.do("delete", chromedp.Click(css("#messages li:not(.mine) .popover button")))
	boss.do("confirm", chromedp.Click(css("#messages li:not(.mine) .popover button.danger")))
	bob.waitFor("gone for bob", "!"+hasMessage("spam spam"))
	boss.waitFor("gone for boss", "!"+hasMessage("spam spam"))
	// Ban by name, online or not, with a confirm; the list shows it, Unban lifts it.
	boss.do("ban carol by name", chromedp.SendKeys(css("#ban-name"), "carol"), chromedp.Click(css("#ban-form button")))
	boss.waitFor("asks first", `document.querySelector("#ban-form .ask").textContent.includes("Ban carol?")`)
	boss.do("confirm", chromedp.Click(css("#ban-form .ask button.danger")))
	boss.waitFor("carol listed", `document.getElementById("ban-list").textContent.includes("carol")`)
	boss.do("unban", chromedp.Click(css("#ban-list button")))
	boss.waitFor("carol unbanned", `document.getElementById("ban-list").textContent === "No one."`)
	if r, err := http.Post(s.url()+"api/login", "application/json", strings.NewReader(fmt.Sprintf(`{"key":%q}`, carolKey))); err != nil || r.StatusCode != 200 {
		t.Fatalf("carol after unban: %v %v", r, err)
	}
	// Ban from the online list: the banned page says so.
	boss.do("user menu", chromedp.Click(css("#online-list button.more")))
	boss.do("ban", chromedp.Click(css("#online-list .popover button")))
	boss.do("confirm", chromedp.Click(css("#online-list .popover button.danger")))
	bob.waitFor("bob told", `!document.getElementById("auth").hidden && document.getElementById("status").textContent === "You have been banned from this chat."`)
	boss.waitFor("bob gone", `!document.getElementById("online-list").textContent.includes("bob")`)
	boss.waitFor("bob listed", `document.getElementById("ban-list").textContent.includes("bob")`)
}

// After registering, the key sits in a real sign-up form (username and new
// password), so that browsers offer to save it; it can be copied and
// downloaded, and the login form is one a saved key fills in.
func TestKeysThatBrowsersKeep(t *testing.T) {
	s := startServer(t)
	b := newBrowser(t, "keeper")
	b.do("register",
		chromedp.Navigate(s.url()),
		chromedp.WaitVisible(css("#register-name")),
		chromedp.SendKeys(css("#register-name"), "keeper"),
		chromedp.Click(css("#register-form button")),
		chromedp.WaitVisible(css("#new-key")),
	)
	b.waitFor("a sign-up form", `(() => {
		const f = document.getElementById("new-key"), user = document.getElementById("key-user"), key = document.getElementById("key-value");
		return f.tagName === "FORM" && user.autocomplete === "username" && user.value === "keeper" &&
			key.type === "password" && key.autocomplete === "new-password" && key.value.length >= 32 &&
			document.getElementById("key-shown").textContent === key.value &&
			document.getElementById("use-key").type === "submit";
	})()`)
	key := get(b, "key", chromedp.Value(css("#key-value")))
	// The page's own policy keeps fetch() away from blob: URLs: read the
	// file from the Blob as the page makes it.
	download := get(b, "download", chromedp.Evaluate[string](`new Promise((resolve) => {
		const create = URL.createObjectURL, click = HTMLAnchorElement.prototype.click;
		let name = "";
		URL.createObjectURL = (blob) => { URL.createObjectURL = create; blob.text().then((text) => resolve(name + "|" + text)); return create(blob); };
		HTMLAnchorElement.prototype.click = function () { HTMLAnchorElement.prototype.click = click; name = this.download; };
		document.getElementById("download-key").click();
	})`, chromedp.EvalAwaitPromise))
	if !strings.HasPrefix(download, "gochat-key-keeper.txt|") || !strings.Contains(download, key) {
		t.Fatalf("downloaded %q", download)
	}
	b.do("log in", chromedp.Click(css("#use-key")), chromedp.WaitVisible(css("#chat")))
	b.do("log out", chromedp.Click(css("#logout")), chromedp.WaitVisible(css("#auth")))
	b.waitFor("a login form a saved key fills in", `document.getElementById("login-name").autocomplete === "username" &&
		document.getElementById("login-key").autocomplete === "current-password" && document.getElementById("login-key").type === "password"`)
}

// Shift+Enter starts a new line, Enter sends, lines show as typed, and the
// focus stays in the box whether Enter or the button sent.
func TestMultiLineMessagesKeepTheFocus(t *testing.T) {
	_, alice, bob := aliceAndBob(t)
	alice.do("type two lines",
		chromedp.SendKeys(css("#message-input"), "line one"),
		chromedp.KeyEvent(kb.Enter, chromedp.KeyModifiers(chromedp.ModifierShift)),
		chromedp.SendKeys(css("#message-input"), "line two"+kb.Enter))
	bob.waitFor("two lines, as typed", hasMessage("line one\nline two")+` && [...document.querySelectorAll("#messages li .text")].some(e => e.textContent === "line one\nline two" && e.getClientRects().length >= 2)`)
	alice.waitFor("focus kept after Enter", `document.activeElement.id === "message-input" && document.getElementById("message-input").value === ""`)
	alice.do("type and click send", chromedp.SendKeys(css("#message-input"), "by the button"), chromedp.Click(css("#send-form button")))
	bob.waitFor("sent by the button", hasMessage("by the button"))
	alice.waitFor("focus kept after the button", `document.activeElement.id === "message-input"`)
	// A refusal's error goes once the text changes.
	alice.do("too long", chromedp.SetValue(css("#message-input"), strings.Repeat("x", 301)), chromedp.Click(css("#send-form button")))
	alice.waitFor("error", `document.getElementById("send-error").textContent !== ""`)
	alice.do("edit", chromedp.SendKeys(css("#message-input"), kb.Backspace))
	alice.waitFor("error cleared", `document.getElementById("send-error").textContent === ""`)
}

// Authors delete their own messages from a small menu, after a confirm;
// others' messages offer them nothing.
func TestDeleteOwnMessage(t *testing.T) {
	_, alice, bob := aliceAndBob(t)
	bob.send("bob's words")
	alice.send("oops, wrong room")
	bob.waitFor("both", hasMessage("oops, wrong room"))
	alice.waitFor("acked", `document.querySelector("#messages li.mine[data-id] button.more") !== null`)
	alice.waitFor("no menu on bob's", `[...document.querySelectorAll("#messages li:not(.mine)")].every(li => !li.querySelector("button.more"))`)
	alice.do("open menu", chromedp.Click(css("#messages li.mine button.more")))
	alice.do("delete", chromedp.Click(css("#messages li.mine .popover button")))
	alice.waitFor("asks first", `document.querySelector("#messages li.mine .popover").textContent.includes("Delete this message?")`)
	if !get(bob, "still there", chromedp.Evaluate[bool](hasMessage("oops, wrong room"))) {
		t.Fatal("deleted before the confirm")
	}
	alice.do("confirm", chromedp.Click(css("#messages li.mine .popover button.danger")))
	bob.waitFor("gone for bob", "!"+hasMessage("oops, wrong room"))
	alice.waitFor("gone for alice", "!"+hasMessage("oops, wrong room"))
}

// Links keep the sentence's punctuation out and take www. addresses; a
// mention stands out at 3:1 or more; one author's run shows the name once.
func TestLinksMentionsAndRuns(t *testing.T) {
	_, alice, bob := aliceAndBob(t)
	alice.send("read https://example.com/list?page=2, then www.example.org/a. And (https://en.wikipedia.org/wiki/Go_(language)) @bob")
	alice.send("and another")
	bob.waitFor("links", `(() => {
		const li = [...document.querySelectorAll("#messages li[data-author=alice]")].find(li => li.textContent.includes("read"));
		return li && [...li.querySelectorAll("a")].map(a => a.href).join(" ") ===
			"https://example.com/list?page=2 https://www.example.org/a https://en.wikipedia.org/wiki/Go_(language)";
	})()`)
	bob.waitFor("one name for the run", `(() => {
		const items = [...document.querySelectorAll("#messages li[data-author=alice]")];
		const shown = items.filter(li => li.querySelector(".author").getClientRects().length > 0 && li.querySelector(".author").offsetWidth > 1);
		return items.length === 2 && shown.length === 1;
	})()`)
	ratio := get(bob, "mention contrast", chromedp.Evaluate[float64](`(() => {
		const lum = (c) => {
			const [r, g, b] = c.match(/[\d.]+/g).slice(0, 3).map(Number).map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
			return 0.2126 * r + 0.7152 * g + 0.0722 * b;
		};
		const mark = document.querySelector("#messages mark.mention");
		const a = lum(getComputedStyle(mark).backgroundColor), b = lum(getComputedStyle(mark.closest("li")).backgroundColor);
		return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
	})()`))
	if ratio < 3 {
		t.Fatalf("mention highlight contrast %.2f:1, want at least 3:1", ratio)
	}
}

// A gap (after a restore, say) starts the page again from the newest
// history that follows it, rather than appending to what it had.
func TestGapStartsThePageAgain(t *testing.T) {
	s := startServer(t)
	alice := newBrowser(t, "alice")
	alice.register(s.url(), "alice")
	alice.send("from before")
	alice.waitFor("acked", `document.querySelector("#messages li.mine .state").textContent.includes("delivered")`)
	alice.exec(`window.gochatDebug.receive({event: "gap"}); window.gochatDebug.receive({id: 1, author: "bob", message: "restored", time: new Date().toISOString(), history: true})`)
	alice.waitFor("page started again", `!`+hasMessage("from before")+` && `+hasMessage("restored")+` && document.querySelector("#messages li.notice").textContent.includes("missed")`)
}
