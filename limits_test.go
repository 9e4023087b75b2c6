package main

import (
	"bufio"
	"database/sql"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestMessageRateLimit(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-msg-rate", "5", "-msg-burst", "10")
	sender := s.connect(t, s.user(t, "Chatty"))
	watcher := s.connect(t, s.user(t, "Watcher"))
	sender.nextWhere(isEvent("join", "Watcher"))
	for range 15 {
		sender.sendMessage("spam")
	}
	// The server's clock stands still: the burst of 10 goes through, the
	// rest is refused, and the acks come in the order the frames did.
	accepted := 10
	for i := range 15 {
		f := sender.next()
		if i < accepted && f["status"] != true || i >= accepted && f["code"] != "rate_limited" {
			t.Fatalf("ack %d: %v", i, f)
		}
	}
	s.clock.Advance(500 * time.Millisecond) // two tokens
	if id := sendAndAck(t, sender, "after a pause"); id == 0 {
		t.Fatal("no id")
	}
	got := 0
	for {
		f := watcher.nextWhere(isChat)
		got++
		if f["message"] == "after a pause" {
			break
		}
	}
	if got != accepted+1 {
		t.Fatalf("watcher got %d messages, want %d: rate-limited ones were broadcast", got, accepted+1)
	}
}

func TestAuthRateLimitPerClientIP(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-auth-rate", "0.5", "-auth-burst", "3")
	s.register(t, "one")
	s.register(t, "two")
	key := s.register(t, "three")
	for _, path := range []string{"/api/register", "/api/login"} {
		r := s.request(t, "POST", path, map[string]string{"/api/register": `{"username":"four"}`, "/api/login": `{"key":"nope"}`}[path], nil).expect(t, 429)
		if secs, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || secs < 1 || secs > 2 {
			t.Fatalf("Retry-After %q", r.header.Get("Retry-After"))
		}
	}
	// A right key is counted against its user, not the address.
	s.login(t, key)
	// Behind the trusted (loopback) proxy each forwarded client has its own
	// bucket, keyed by the last hop only: a client cannot pick its own.
	for range 3 {
		s.request(t, "POST", "/api/login", `{"key":"nope"}`, nil, "X-Forwarded-For", "198.51.100.1, 203.0.113.7").expect(t, 401)
	}
	s.request(t, "POST", "/api/login", `{"key":"nope"}`, nil, "X-Forwarded-For", "203.0.113.7").expect(t, 429)
}

func TestForwardedForIgnoredFromUntrustedPeers(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-auth-rate", "0.5", "-auth-burst", "1", "-trusted-proxies", "192.0.2.1")
	s.register(t, "first")
	s.request(t, "POST", "/api/register", `{"username":"second"}`, nil, "X-Forwarded-For", "203.0.113.9").expect(t, 429)
}

func TestFailedLoginsLookAlike(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	key := s.register(t, "Secretive")
	near := key[:len(key)-1] + "x"
	if near == key {
		near = key[:len(key)-1] + "y"
	}
	a := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, near), nil).expect(t, 401)
	b := s.request(t, "POST", "/api/login", `{"key":"completely-wrong"}`, nil).expect(t, 401)
	if a.raw != b.raw {
		t.Fatalf("failed logins differ: %q vs %q", a.raw, b.raw)
	}
}

// get sends GET path on c and reads the answer.
func get(t *testing.T, c net.Conn, path string) (*http.Response, error) {
	t.Helper()
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err == nil {
		resp.Body.Close()
	}
	return resp, err
}

func dial(t *testing.T, s *testServer, from string) net.Conn {
	t.Helper()
	c, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}).Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestOneAddressCannotTakeEveryConnection(t *testing.T) {
	t.Parallel()
	// No trusted proxy: loopback is a client like any other.
	s := startServer(t, "-max-conns-per-ip", "3", "-trusted-proxies", "192.0.2.1")
	for range 3 {
		dial(t, s, "127.0.0.1")
	}
	if resp, err := get(t, dial(t, s, "127.0.0.1"), "/healthz"); err == nil {
		t.Fatalf("a fourth connection from one address was served: %s", resp.Status)
	}
	// Another address still gets its requests and its socket.
	other := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IP{127, 0, 0, 2}}}
	s.client = &http.Client{Transport: &http.Transport{DialContext: other.DialContext}}
	s.request(t, "GET", "/healthz", "", nil).expect(t, 200)
	if ws, r := s.dialWS(t, s.user(t, "Other"), dialOpts{from: "127.0.0.2"}); ws == nil {
		t.Fatalf("socket refused: %d %s", r.status, r.raw)
	}
	if m := s.metrics(t); !strings.Contains(m, "gochat_connections_refused_total 1\n") {
		t.Fatalf("refusal not counted:\n%s", m)
	}
}

func TestIdleConnectionsCloseNearTheCap(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-max-conns", "1") // 1025 connections, 768 of them near the cap
	idle := dial(t, s, "127.0.0.1")
	if _, err := get(t, idle, "/healthz"); err != nil {
		t.Fatal(err)
	}
	// At the 768th connection the idle one is closed, and answers say
	// Connection: close.
	var last net.Conn
	for range 767 {
		last = dial(t, s, "127.0.0.1")
	}
	idle.SetReadDeadline(time.Now().Add(30 * time.Second)) // the idle timeout is 60 s
	if _, err := idle.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("idle connection near the cap: %v, want EOF", err)
	}
	if resp, err := get(t, last, "/healthz"); err != nil || !resp.Close {
		t.Fatalf("answer near the cap keeps the connection: %v", err)
	}
	s.waitForLog(t, "keep-alives off")
}

func TestMaxConnsRefusesBeforeUpgrade(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-max-conns", "2")
	a := s.connect(t, s.user(t, "A"))
	s.connect(t, s.user(t, "B"))
	cookie := s.user(t, "C")
	ws, r := s.dialWS(t, cookie, dialOpts{})
	if ws != nil {
		t.Fatal("third socket accepted with -max-conns 2")
	}
	r.expect(t, 503)
	a.close()
	s.connect(t, cookie)
}

func TestVanishedClientsAreAnnounced(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-ping-interval", "1s")
	// Users first: the watcher answers pings only while it reads.
	cookies := []*http.Cookie{s.user(t, "Watcher"), s.user(t, "Reset"), s.user(t, "Silent")}
	watcher, reset, silent := s.connect(t, cookies[0]), s.connect(t, cookies[1]), s.connect(t, cookies[2])
	watcher.nextWhere(isEvent("join", "Silent"))

	// A TCP reset: the server hears of it at once.
	reset.c.(*net.TCPConn).SetLinger(0)
	reset.c.Close()
	watcher.nextWhere(isEvent("leave", "Reset"))

	// A half-open peer that never answers: the missing pongs give it away.
	_ = silent
	watcher.nextWhere(isEvent("leave", "Silent"))
	if got := s.online(t, s.user(t, "Observer")); got != "[Watcher]" {
		t.Fatalf("online keeps ghosts: %s", got)
	}
}

func TestSlowlorisDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	const slow = 200
	var conns []net.Conn
	for range slow {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			header := "POST /api/register HTTP/1.1\r\nHost: x\r\nX-Padding: " + strings.Repeat("a", 1000)
			for i := range len(header) {
				select {
				case <-stop:
					return
				case <-time.After(50 * time.Millisecond):
				}
				if _, err := c.Write([]byte{header[i]}); err != nil {
					return // the server gave up on us: as it should
				}
			}
		}()
	}
	// Everyone else goes about their business meanwhile.
	a := s.connect(t, s.user(t, "Patient"))
	b := s.connect(t, s.user(t, "Busy"))
	a.nextWhere(isEvent("join", "Busy"))
	b.sendMessage("the server is responsive")
	if f := a.nextWhere(isChat); f["message"] != "the server is responsive" {
		t.Fatalf("got %v", f)
	}
	// And the slow connections are cut by the header timeout (with a 4xx
	// answer at most).
	c := conns[0]
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	got, err := io.ReadAll(c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("slow header connection still open after 15s")
	}
	if len(got) > 0 && !strings.HasPrefix(string(got), "HTTP/1.1 4") {
		t.Fatalf("slow header connection got %q instead of being closed", got)
	}
	close(stop)
	wg.Wait()
}

func TestRegistrationStormThroughKill9(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	created := map[string]string{}
	var mu sync.Mutex
	for round := range 3 {
		p := startProcess(t, "-db", db)
		s := p.asServer(t)
		enough := make(chan struct{}) // closed once this round has 50 more
		want := len(created) + 50
		var wg sync.WaitGroup
		for w := range 200 { // hundreds of registrations in flight at once
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					name := fmt.Sprintf("storm%dw%di%d", round, w, i)
					resp, err := postJSON(s.url+"/api/register", fmt.Sprintf(`{"username":%q}`, name))
					if err != nil {
						return // the server died mid-request: no 201, no promise
					}
					if resp.status != 201 {
						t.Errorf("register: %d %s", resp.status, resp.raw)
						return
					}
					mu.Lock()
					if created[name] = resp.body["key"].(string); len(created) == want {
						close(enough)
					}
					mu.Unlock()
				}
			}()
		}
		select { // kill it mid-storm, however fast this machine is
		case <-enough:
		case <-time.After(time.Minute):
			t.Fatalf("round %d: no 50 registrations in a minute", round)
		}
		p.cmd.Process.Kill()
		wg.Wait()
		p.wait(t, 10*time.Second)
	}
	t.Logf("%d registrations got 201 across three kills", len(created))
	checkIntegrity(t, db)
	s := startServer(t, "-db", db)
	for name, key := range created {
		r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil)
		if r.status != 200 || r.body["username"] != name {
			t.Fatalf("%s got 201 but cannot log in after kill -9: %d %s", name, r.status, r.raw)
		}
	}
}

func checkIntegrity(t *testing.T, path string) {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var result string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&result); err != nil || result != "ok" {
		t.Fatalf("integrity_check: %q, %v", result, err)
	}
}

// runToExit runs the command with args and returns its exit code and output.
func runToExit(t *testing.T, args ...string) (int, string) {
	t.Helper()
	return runToExitEnv(t, nil, args...)
}

// runToExitEnv is runToExit with env added to the command's environment.
func runToExitEnv(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, "GOCHAT_TEST_SERVER=1", "GOCHAT_TEST_ARGS="+string(mustJSON(args)))...)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("server started on a bad database instead of exiting")
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	return code, string(out)
}

func TestCorruptDatabaseFailsClearly(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	if err := os.WriteFile(db, []byte(strings.Repeat("this is not a database\n", 500)), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := runToExit(t, "-addr", "127.0.0.1:0", "-db", db)
	if code == 0 || strings.Contains(out, "panic") || !strings.Contains(out, "not a database") {
		t.Fatalf("exit %d, output:\n%s", code, out)
	}
}

func TestReadOnlyDatabaseFailsClearly(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	s := startServer(t, "-db", db)
	s.register(t, "Existing")
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	makeReadOnly(t, db)
	code, out := runToExit(t, "-addr", "127.0.0.1:0", "-db", db)
	if code == 0 || strings.Contains(out, "panic") || !strings.Contains(out, "open db") {
		t.Fatalf("exit %d, output:\n%s", code, out)
	}
}

// makeReadOnly makes path unwritable even for root, who ignores modes.
func makeReadOnly(t *testing.T, path string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if err := os.Chmod(path, 0o400); err != nil {
			t.Fatal(err)
		}
		return
	}
	if out, err := exec.Command("chattr", "+i", path).CombinedOutput(); err != nil {
		t.Skipf("cannot make the file immutable as root: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", path).Run() })
}

// X-Forwarded-Proto and X-Forwarded-Host count only from a trusted proxy:
// from anyone else they could pass a foreign origin off as the server's own.
func TestProxyHeadersBelievedOnlyFromTrustedProxies(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-trusted-proxies", "10.0.0.0/8")
	cookie := s.user(t, "Direct")
	forged := []string{"Origin", "https://evil.example", "X-Forwarded-Host", "evil.example", "X-Forwarded-Proto", "https"}
	if ws, r := s.dialWS(t, cookie, dialOpts{headers: forged}); ws != nil || r.status != 403 {
		t.Fatalf("foreign origin with forged proxy headers: %d, want 403", r.status)
	}
	key := s.register(t, "Plain")
	r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil, "X-Forwarded-Proto", "https").expect(t, 200)
	if sessionCookieOf(t, r.header).Secure {
		t.Fatal("cookie marked Secure on a forged X-Forwarded-Proto")
	}
	if got, want := s.pageCSP(t, "evil.example"), s.pageCSP(t, ""); got != want {
		t.Fatalf("CSP follows a forged X-Forwarded-Host:\n%s\nwant\n%s", got, want)
	}
}

// pageCSP is the Content-Security-Policy of the page fetched with
// X-Forwarded-Host (none when "").
func (s *testServer) pageCSP(t *testing.T, forwardedHost string) string {
	t.Helper()
	req, _ := http.NewRequest("GET", s.url+"/", nil)
	if forwardedHost != "" {
		req.Header.Set("X-Forwarded-Host", forwardedHost)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.Header.Get("Content-Security-Policy")
}

// Even a trusted proxy's X-Forwarded-Host must be a host: a ";" in it would
// add directives to the Content-Security-Policy.
func TestMalformedForwardedHostIsIgnored(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	if csp := s.pageCSP(t, "chat.example; script-src *"); strings.Contains(csp, "*") || !strings.Contains(csp, "ws://"+s.addr) {
		t.Fatalf("CSP %q", csp)
	}
}

// An IPv6 home line picks any address of its /56, in any of its 256 /64s:
// the limits count the /56.
func TestLimitsKeyIPv6ByItsSlash56(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-auth-rate", "0.5", "-auth-burst", "3")
	for _, hop := range []string{"2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:1:ff::1"} {
		s.request(t, "POST", "/api/login", `{"key":"nope"}`, nil, "X-Forwarded-For", hop).expect(t, 401)
	}
	s.request(t, "POST", "/api/login", `{"key":"nope"}`, nil, "X-Forwarded-For", "2001:db8:1:2:ffff::9").expect(t, 429)
	s.request(t, "POST", "/api/login", `{"key":"nope"}`, nil, "X-Forwarded-For", "2001:db8:1:100::1").expect(t, 401)
	if a, b := addrKey(netip.MustParseAddr("2001:db8:1:2::1")), addrKey(netip.MustParseAddr("2001:db8:1:fe::7")); a != b {
		t.Fatalf("connections are capped by %s and %s, not by their /56", a, b)
	}
}

func TestRateLimiterStaysBounded(t *testing.T) {
	t.Parallel()
	l := newRateLimiter(1, 1, time.Now)
	for i := range maxBuckets + 1000 {
		l.Allow(strconv.Itoa(i))
	}
	if n := len(l.buckets); n > maxBuckets {
		t.Fatalf("%d buckets, bound %d", n, maxBuckets)
	}
}

// Every WebSocket open is a join and a leave for everyone in the room:
// opens are limited per user, before the upgrade.
func TestWebSocketOpensAreLimited(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-open-rate", "1", "-open-burst", "2")
	flapper := s.user(t, "Flapper")
	for range 2 {
		s.connect(t, flapper).close()
	}
	ws, r := s.dialWS(t, flapper, dialOpts{})
	if ws != nil || r.status != 429 || r.header.Get("Retry-After") != "1" {
		t.Fatalf("third open in a burst of 2: %d, Retry-After %q", r.status, r.header.Get("Retry-After"))
	}
	s.clock.Advance(time.Second)
	s.connect(t, flapper).close()
}

// Behind one address (a NAT, a university), one user hammering opens and
// wrong keys as fast as they can keeps no one else there out.
func TestOneUserCannotLockOutTheirAddress(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-open-rate", "1", "-open-burst", "10", "-auth-rate", "1", "-auth-burst", "10")
	neighbour := s.register(t, "Neighbour")
	hammer := s.user(t, "Hammer")
	for i := range 100 {
		if ws, _ := s.dialWS(t, hammer, dialOpts{}); ws != nil {
			ws.close()
		}
		want := map[bool]int{true: 401, false: 429}[i < 8] // two tokens went on the registrations
		s.request(t, "POST", "/api/login", `{"key":"guess"}`, nil).expect(t, want)
	}
	s.connect(t, s.login(t, neighbour)).close()
}

// History pages are read outside the hub, but not without limit: each
// user has a bucket of them.
func TestHistoryReadsAreLimitedPerUser(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-read-rate", "1", "-read-burst", "3")
	reader, other := s.user(t, "Reader"), s.user(t, "Other")
	for range 3 {
		s.request(t, "GET", "/api/messages", "", reader).expect(t, 200)
	}
	if r := s.request(t, "GET", "/api/messages", "", reader).expect(t, 429); r.header.Get("Retry-After") != "1" {
		t.Fatalf("Retry-After %q", r.header.Get("Retry-After"))
	}
	s.request(t, "GET", "/api/messages", "", other).expect(t, 200)
	s.clock.Advance(time.Second)
	s.request(t, "GET", "/api/messages", "", reader).expect(t, 200)
}

// Every POST and DELETE must say it is JSON, with a body or not: no plain
// form, from any site or port, changes anything on a visitor's behalf.
func TestStateChangesRequireJSON(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-admins", "Boss")
	boss := s.user(t, "Boss")
	bob := s.user(t, "Bob")
	id := sendAndAck(t, s.connect(t, bob), "keep me")
	form := []string{"Content-Type", "application/x-www-form-urlencoded"}
	s.request(t, "POST", "/api/user/Bob/ban", "", boss, form...).expect(t, 415)
	s.request(t, "DELETE", fmt.Sprint("/api/messages/", id), "", boss, form...).expect(t, 415)
	s.request(t, "POST", "/api/logout", "", bob, "Content-Type", "").expect(t, 415)
	s.request(t, "GET", "/api/user/@me", "", bob).expect(t, 200) // still logged in, not banned
	if r := s.request(t, "GET", "/api/messages", "", bob).expect(t, 200); !strings.Contains(r.raw, "keep me") {
		t.Fatalf("message gone: %s", r.raw)
	}
	s.request(t, "POST", "/api/nowhere", "", bob, form...).expect(t, 404) // unknown paths stay 404
}

// A trusted proxy's last X-Forwarded-For hop may carry a port; a hop that
// cannot be read is nobody's address: never loopback for /metrics.
func TestForwardedForWithPorts(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-auth-rate", "0.001", "-auth-burst", "1")
	for _, hop := range []string{"203.0.113.9:41234", "[2001:db8::1]:443", "garbage", "127.0.0.1:9, nonsense"} {
		s.request(t, "GET", "/metrics", "", nil, "X-Forwarded-For", hop).expect(t, 404)
	}
	req, _ := http.NewRequest("GET", s.url+"/metrics", nil)
	req.Header.Set("X-Forwarded-For", "127.0.0.1:5555")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("metrics for a loopback hop with a port: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	// Each address with a port is its own client for the limits.
	for _, hop := range []string{"198.51.100.1:1000", "198.51.100.2:1000"} {
		s.request(t, "POST", "/api/login", `{"key":"x"}`, nil, "X-Forwarded-For", hop).expect(t, 401)
	}
	s.request(t, "POST", "/api/login", `{"key":"x"}`, nil, "X-Forwarded-For", "198.51.100.1:2000").expect(t, 429)
}
