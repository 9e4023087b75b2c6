// Package e2e drives the web client in headless Chromium (Debian's chromium
// package) against the real server binary. It is its own module so that
// the server's go.mod keeps only its two dependencies.
package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
)

const chromium = "/usr/bin/chromium"

var serverBinary string

func TestMain(m *testing.M) {
	if _, err := os.Stat(chromium); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: needs Debian's chromium at", chromium, "(apt-get install chromium)")
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "gochat-e2e")
	if err != nil {
		panic(err)
	}
	serverBinary = filepath.Join(dir, "gochat")
	build := exec.Command("go", "build", "-o", serverBinary, ".")
	build.Dir = ".."
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: build server:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// server is the real binary on a fixed loopback port, so that it can be
// restarted where the browsers expect it.
type server struct {
	t     *testing.T
	addr  string
	db    string
	extra []string // more flags
	cmd   *exec.Cmd
}

func startServer(t *testing.T, extra ...string) *server {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	s := &server{t: t, addr: addr, db: filepath.Join(t.TempDir(), "chat.db"), extra: extra}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *server) url() string { return "http://" + s.addr + "/" }

func (s *server) start() {
	s.cmd = exec.Command(serverBinary, append([]string{"-addr", s.addr, "-db", s.db, "-msg-rate", "0", "-auth-rate", "0", "-open-rate", "0"}, s.extra...)...)
	s.cmd.Stdout, s.cmd.Stderr = os.Stderr, os.Stderr
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("tcp", s.addr); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatal("server did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *server) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	s.cmd.Wait()
	s.cmd = nil
}

// browser is one headless Chromium with its own profile, so its own cookies.
type browser struct {
	t       *testing.T
	name    string
	ctx     context.Context
	dialogs atomic.Int32 // alert(), confirm()...: must stay 0
}

func newBrowser(t *testing.T, name string) *browser { return newBrowserSized(t, name, 1000, 700) }

// newPhone is a browser the size of a phone's screen.
func newPhone(t *testing.T, name string) *browser { return newBrowserSized(t, name, 375, 667) }

func newBrowserSized(t *testing.T, name string, width, height int) *browser {
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(width, height),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("ignore-certificate-errors", true), // the tests' own TLS certificates
		chromedp.Flag("disable-component-update", true),
	)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(alloc)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	b := &browser{t: t, name: name, ctx: ctx}
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	err := chromedp.Listen(ctx, func(ev any) {
		if _, ok := ev.(*page.EventJavascriptDialogOpening); ok {
			b.dialogs.Add(1)
			go chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{})
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// do performs steps, failing the test after 20 seconds.
func (b *browser) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.t.Fatalf("%s: %s: %v", b.name, what, err)
	}
}

// get runs one action that returns a value.
func get[T any](b *browser, what string, action chromedp.Action[T]) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, action)
	if err != nil {
		b.t.Fatalf("%s: %s: %v", b.name, what, err)
	}
	return v
}

// waitFor waits until the JavaScript expression is true.
func (b *browser) waitFor(what, expr string) {
	b.t.Helper()
	b.do("wait for "+what, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(15*time.Second)))
}

func (b *browser) exec(script string) {
	b.t.Helper()
	b.do("run "+script, chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := chromedp.Evaluate[any](script)(ctx, t)
		return err
	}))
}

func css(sel string) chromedp.CSS { return chromedp.CSS(sel) }

// hasMessage is an expression true when a message with exactly this text
// is on the page.
func hasMessage(text string) string {
	return fmt.Sprintf(`[...document.querySelectorAll("#messages li .text")].some(e => e.textContent === %q)`, text)
}

func countMessage(text string) string {
	return fmt.Sprintf(`[...document.querySelectorAll("#messages li .text")].filter(e => e.textContent === %q).length`, text)
}

// aliceAndBob starts a server with alice and bob signed up, each in a
// browser of their own.
func aliceAndBob(t *testing.T) (*server, *browser, *browser) {
	s := startServer(t)
	alice, bob := newBrowser(t, "alice"), newBrowser(t, "bob")
	alice.register(s.url(), "alice")
	bob.register(s.url(), "bob")
	return s, alice, bob
}

// register signs up through the page and returns the key it showed.
func (b *browser) register(url, name string) string {
	b.do("register",
		chromedp.Navigate(url),
		chromedp.WaitVisible(css("#register-name")),
		chromedp.SendKeys(css("#register-name"), name),
		chromedp.Click(css("#register-form button")),
		chromedp.WaitVisible(css("#new-key")),
	)
	key := get(b, "read key", chromedp.Value(css("#key-value")))
	warning := get(b, "read warning", chromedp.Text(css("#new-key .warning")))
	if len(key) < 32 || !strings.Contains(warning, "cannot be recovered") {
		b.t.Fatalf("%s: key %q shown with warning %q", b.name, key, warning)
	}
	b.do("log in with new key", chromedp.Click(css("#use-key")), chromedp.WaitVisible(css("#chat")))
	b.waitFor("connected", `document.getElementById("status").textContent === "Connected."`)
	return key
}

func (b *browser) send(text string) {
	b.t.Helper()
	b.do("send "+text, chromedp.SendKeys(css("#message-input"), text+kb.Enter))
}

func TestChatInTwoBrowsers(t *testing.T) {
	s := startServer(t)
	alice := newBrowser(t, "alice")
	bob := newBrowser(t, "bob")

	alice.register(s.url(), "alice")
	bobKey := bob.register(s.url(), "bob")
	alice.waitFor("bob's join", `[...document.querySelectorAll("#messages li.event")].some(e => e.textContent === "bob joined")`)
	alice.waitFor("bob online", `document.getElementById("online-list").textContent.includes("bob")`)
	bob.waitFor("both online", `document.getElementById("online-list").textContent === "alicebob"`)

	// Both ways, with delivery marks.
	alice.send("hello bob")
	bob.waitFor("alice's message", hasMessage("hello bob"))
	alice.waitFor("delivered mark", `document.querySelector("#messages li.mine .state").textContent.includes("delivered")`)
	bob.send("hi alice")
	alice.waitFor("bob's message", hasMessage("hi alice"))

	// The counter and a refused message.
	long := strings.Repeat("é", 301)
	alice.do("type 301 characters", chromedp.SetValue(css("#message-input"), long))
	alice.exec(`document.getElementById("message-input").dispatchEvent(new Event("input"))`)
	alice.waitFor("counter over", `document.getElementById("counter").textContent === "301/300" && document.getElementById("counter").classList.contains("over")`)
	alice.do("submit", chromedp.Click(css("#send-form button")))
	alice.waitFor("too-long error", `document.getElementById("send-error").textContent.includes("Too long")`)

	// Markup in a message is text.
	attack := `<img src=x onerror=alert(1)>`
	bob.send(attack)
	alice.waitFor("attack shown literally", hasMessage(attack))
	time.Sleep(300 * time.Millisecond)
	imgs := get(alice, "count images", chromedp.Evaluate[int](`document.querySelectorAll("#messages img").length`))
	if imgs != 0 || alice.dialogs.Load() != 0 || bob.dialogs.Load() != 0 {
		t.Fatalf("markup ran: %d img elements, %d+%d dialogs", imgs, alice.dialogs.Load(), bob.dialogs.Load())
	}

	takeScreenshot(t, alice, "screenshot.png")

	// A reload keeps the session and shows the history.
	alice.do("reload", chromedp.Reload(), chromedp.WaitVisible(css("#chat")))
	alice.waitFor("history after reload", hasMessage("hello bob")+" && "+hasMessage("hi alice"))
	if me := get(alice, "who am I", chromedp.Text(css("#me"))); me != "alice" {
		t.Fatalf("after reload signed in as %q", me)
	}

	// Logout shows leave to the other.
	bob.do("log out", chromedp.Click(css("#logout")), chromedp.WaitVisible(css("#auth")))
	alice.waitFor("bob's leave", `[...document.querySelectorAll("#messages li.event")].some(e => e.textContent === "bob left")`)
	alice.waitFor("bob offline", `!document.getElementById("online-list").textContent.includes("bob")`)

	// A message sent while the other was disconnected arrives after it
	// reconnects, once.
	bob.do("log in again", chromedp.SendKeys(css("#login-key"), bobKey), chromedp.Click(css("#login-form button")), chromedp.WaitVisible(css("#chat")))
	bob.waitFor("connected", `document.getElementById("status").textContent === "Connected."`)
	alice.exec(`window.gochatDebug.dropConnection(3000)`)
	alice.waitFor("connection lost shown", `document.getElementById("status").textContent.includes("Reconnecting in")`)
	bob.send("while you were away")
	alice.waitFor("missed message after reconnect", hasMessage("while you were away"))
	if n := get(alice, "count", chromedp.Evaluate[int](countMessage("while you were away"))); n != 1 {
		t.Fatalf("missed message shown %d times", n)
	}

	// A server restart is followed by an automatic reconnect.
	s.stop()
	alice.waitFor("reconnecting shown", `document.getElementById("status").textContent.includes("Reconnecting")`)
	s.start()
	alice.waitFor("reconnected", `document.getElementById("status").textContent === "Connected."`)
	bob.waitFor("bob reconnected", `document.getElementById("status").textContent === "Connected."`)
	bob.send("after the restart")
	alice.waitFor("message after restart", hasMessage("after the restart"))
}

func TestScrollBackLoadsOlderMessages(t *testing.T) {
	s := startServer(t)
	writer := newBrowser(t, "writer")
	reader := newBrowser(t, "reader")
	writer.register(s.url(), "writer")
	writer.exec(`(() => {
		const input = document.getElementById("message-input");
		const form = document.getElementById("send-form");
		for (let i = 0; i < 70; i++) { input.value = "bulk " + i; form.requestSubmit(); }
	})()`)
	writer.waitFor("all acked", `document.querySelectorAll("#messages li.mine .state").length === 70 && [...document.querySelectorAll("#messages li.mine .state")].every(e => e.textContent.includes("delivered"))`)

	reader.register(s.url(), "reader")
	reader.waitFor("last 50 as history", hasMessage("bulk 69")+" && "+hasMessage("bulk 20")+" && !"+hasMessage("bulk 19"))
	reader.exec(`document.getElementById("messages").scrollTop = 0`)
	reader.waitFor("older messages", hasMessage("bulk 0")+" && "+hasMessage("bulk 19"))
	order := get(reader, "order", chromedp.Evaluate[string](`[...document.querySelectorAll("#messages li .text")].map(e => e.textContent).slice(0, 3).join("|")`))
	if order != "bulk 0|bulk 1|bulk 2" {
		t.Fatalf("oldest messages in the wrong order: %q", order)
	}
}

func TestPageWorksBehindAPathPrefix(t *testing.T) {
	// The page uses only relative URLs: served at /chat/ by a proxy, it must
	// still find its script, its API and its WebSocket under /chat/.
	s := startServer(t)
	proxy := startPrefixProxy(t, "/chat/", s.addr)
	b := newBrowser(t, "prefixed")
	b.register("http://"+proxy+"/chat/", "prefixed")
	b.send("through the proxy")
	b.waitFor("ack through proxy", `document.querySelector("#messages li.mine .state").textContent.includes("delivered")`)
}

// takeScreenshot refreshes the README's picture, only when asked to
// (GOCHAT_SCREENSHOT=1), so that a test run leaves the tree as it was.
func takeScreenshot(t *testing.T, b *browser, name string) {
	if os.Getenv("GOCHAT_SCREENSHOT") != "1" {
		return
	}
	png := get(b, "screenshot", chromedp.CaptureScreenshot())
	if err := os.WriteFile(filepath.Join("..", "docs", name), png, 0o644); err != nil {
		t.Logf("screenshot not saved: %v", err)
	}
}

// A user connecting and leaving in a loop is one line on the others' pages,
// not one line per event.
func TestJoinLeaveBurstIsOneLine(t *testing.T) {
	s := startServer(t)
	alice := newBrowser(t, "alice")
	alice.register(s.url(), "alice")
	flapper := newBrowser(t, "flapper")
	flapper.do("open", chromedp.Navigate(s.url()), chromedp.WaitVisible(css("#auth")))
	flapper.exec(`(async () => {
		const post = (path, body) => fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)}).then(r => r.json());
		const {key} = await post("api/register", {username: "flapper"});
		await post("api/login", {key});
		for (let i = 0; i < 40; i++) {
			const ws = new WebSocket(location.href.replace(/^http/, "ws") + "ws");
			await new Promise(r => ws.onopen = r);
			ws.close();
			await new Promise(r => ws.onclose = r);
		}
		window.flapped = true;
	})()`)
	flapper.waitFor("40 opens and closes", `window.flapped === true`)
	alice.waitFor("one line for the burst", `(() => {
		const events = [...document.querySelectorAll("#messages li.event")];
		return events.length === 1 && events[0].textContent === "flapper left";
	})()`)
}
