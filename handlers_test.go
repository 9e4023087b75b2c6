package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestRegisterReturnsKeyAndStoresOnlyItsHash(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	key := s.register(t, "Alice")
	if len(key) < 32 {
		t.Fatalf("key %q shorter than 32 characters", key)
	}
	if other := s.register(t, "Bob"); other == key {
		t.Fatal("two registrations got the same key")
	}
	db, err := sql.Open("sqlite", s.dbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var hits int
	if err := db.QueryRow(`SELECT COUNT(*) FROM users WHERE CAST(key_hash AS TEXT) LIKE ? OR username LIKE ?`,
		"%"+key+"%", "%"+key+"%").Scan(&hits); err != nil {
		t.Fatal(err)
	}
	if hits != 0 {
		t.Fatal("the key itself is stored in the database")
	}
}

func TestRegisterRejectsBadUsernames(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	for _, name := range []string{"", strings.Repeat("a", 33), "bob!", "bob\n", "bo b", " bob", "bö", "bob_1", "ｂｏｂ"} {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			s.request(t, "POST", "/api/register", fmt.Sprintf(`{"username":%q}`, name), nil).expect(t, 400)
		})
	}
	s.register(t, strings.Repeat("Z", 32))
	s.register(t, "7")
}

func TestRegisterNameTakenInAnyCase(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	s.register(t, "Bob")
	for _, name := range []string{"Bob", "bob", "BOB", "bOb"} {
		s.request(t, "POST", "/api/register", fmt.Sprintf(`{"username":%q}`, name), nil).expect(t, 409)
	}
}

func TestMalformedBodiesAre422(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	bodies := []string{
		``, `not json`, `[]`, `null`, `"bob"`, `{}`, `{"username":5}`, `{"username":null}`,
		`{"username":["a"]}`, `{"username":"a","extra":1}`, `{"username":"a"} {}`, `{"username":"a"}x`,
		`{"username":"a"`, `{"user":"a"}`,
	}
	for _, path := range []string{"/api/register", "/api/login"} {
		for _, body := range bodies {
			if path == "/api/login" {
				body = strings.ReplaceAll(body, "username", "key")
			}
			t.Run(path+" "+body, func(t *testing.T) {
				s.request(t, "POST", path, body, nil).expect(t, 422)
			})
		}
	}
}

// A page on another site can post a plain HTML form with
// enctype="text/plain" whose one field makes the body {"key":"x=","key":"K"}:
// it must not log the visitor in as the owner of K.
func TestLoginCSRFIsRefused(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	key := s.register(t, "Attacker")
	forged := fmt.Sprintf(`{"key":"x=","key":%q}`, key)
	s.request(t, "POST", "/api/login", forged, nil, "Content-Type", "text/plain").expect(t, 415)
	s.request(t, "POST", "/api/login", forged, nil).expect(t, 422)
	for _, ct := range []string{"", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"} {
		s.request(t, "POST", "/api/register", `{"username":"Victim"}`, nil, "Content-Type", ct).expect(t, 415)
	}
	s.request(t, "POST", "/api/register", `{"username":"Victim"}`, nil, "Content-Type", "application/json; charset=utf-8").expect(t, 201)
	s.request(t, "POST", "/api/register", `{"username":"Twice","username":"Twice"}`, nil).expect(t, 422)
}

func TestOversizedBodyIs413(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	big := fmt.Sprintf(`{"username":"%s"}`, strings.Repeat("a", 5000))
	s.request(t, "POST", "/api/register", big, nil).expect(t, 413)
	s.request(t, "POST", "/api/login", strings.ReplaceAll(big, "username", "key"), nil).expect(t, 413)
	// Whitespace counts too: the limit is on bytes, not on meaning.
	s.request(t, "POST", "/api/register", `{"username":"ok"}`+strings.Repeat(" ", 4100), nil).expect(t, 413)
}

func TestLoginSetsSessionCookie(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-session-ttl", "90s")
	key := s.register(t, "Carol")
	r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil).expect(t, 200)
	if r.body["username"] != "Carol" {
		t.Fatalf("login body %s", r.raw)
	}
	c := sessionCookieOf(t, r.header)
	if len(c.Value) != 32 || strings.Trim(c.Value, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") != "" {
		t.Fatalf("session id %q is not 32 characters [A-Za-z0-9]", c.Value)
	}
	if !c.HttpOnly || c.Path != "/" || c.SameSite != http.SameSiteLaxMode || c.MaxAge != 90 || c.Secure {
		t.Fatalf("cookie attributes wrong: %s", r.header.Get("Set-Cookie"))
	}
	if again := s.login(t, key); again.Value == c.Value {
		t.Fatal("a second login reused the session id")
	}
	s.request(t, "POST", "/api/login", `{"key":"wrong"}`, nil).expect(t, 401)
	s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key[:len(key)-1]), nil).expect(t, 401)
}

func TestSecureCookieBehindTLSProxy(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	key := s.register(t, "Dan")
	r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil, "X-Forwarded-Proto", "https").expect(t, 200)
	if !sessionCookieOf(t, r.header).Secure {
		t.Fatalf("cookie not Secure behind https proxy: %s", r.header.Get("Set-Cookie"))
	}
}

func TestAuthenticatedRoutesNeedASession(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	s.register(t, "Erin")
	bogus := &http.Cookie{Name: "session", Value: strings.Repeat("x", 32)}
	for _, path := range []string{"/api/online", "/api/user/@me", "/api/user/Erin", "/api/messages"} {
		s.request(t, "GET", path, "", nil).expect(t, 422)
		s.request(t, "GET", path, "", bogus).expect(t, 401)
	}
}

func TestUserLookups(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Frank")
	s.register(t, "GraceHopper")
	me := s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 200)
	if me.body["username"] != "Frank" || me.body["online"] != false {
		t.Fatalf("@me: %s", me.raw)
	}
	other := s.request(t, "GET", "/api/user/gracehopper", "", cookie).expect(t, 200)
	if other.body["username"] != "GraceHopper" || other.body["online"] != false {
		t.Fatalf("user lookup: %s", other.raw)
	}
	s.request(t, "GET", "/api/user/nobody", "", cookie).expect(t, 404)

	ws := s.connect(t, cookie)
	defer ws.close()
	me = s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 200)
	if me.body["online"] != true {
		t.Fatalf("@me while connected: %s", me.raw)
	}
	if r := s.request(t, "GET", "/api/user/FRANK", "", cookie).expect(t, 200); r.body["online"] != true || r.body["username"] != "Frank" {
		t.Fatalf("user lookup while connected: %s", r.raw)
	}
}

func TestOnlineListsOpenSockets(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	a := s.user(t, "Zed")
	b := s.user(t, "amy")
	online := func() string { return s.online(t, a) }
	if got := online(); got != "[]" {
		t.Fatalf("online before any socket: %s", got)
	}
	wa := s.connect(t, a)
	wb := s.connect(t, b)
	wa.nextWhere(isEvent("join", "amy"))
	if got := online(); got != "[Zed amy]" && got != "[amy Zed]" {
		t.Fatalf("online with two sockets: %s", got)
	}
	wb.close()
	wa.nextWhere(isEvent("leave", "amy"))
	if got := online(); got != "[Zed]" {
		t.Fatalf("online after amy left: %s", got)
	}
}

func TestLogout(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	for _, method := range []string{"GET", "POST"} {
		cookie := s.user(t, "Hal"+method)
		r := s.request(t, method, "/api/logout", "", cookie).expect(t, 200)
		if r.raw != "{}\n" {
			t.Fatalf("logout body %q", r.raw)
		}
		if expired := sessionCookieOf(t, r.header); expired.MaxAge >= 0 || !strings.Contains(r.header.Get("Set-Cookie"), "Max-Age=0") {
			t.Fatalf("logout does not expire the cookie: %s", r.header.Get("Set-Cookie"))
		}
		s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 401)
		s.request(t, method, "/api/logout", "", nil).expect(t, 200)
	}
}

// A link or an <img> on another site, or on another port of this host,
// sends the cookie with a GET: the browser says where it came from, and
// such a logout is refused. The page's own, and other programs', work.
func TestLogoutFromElsewhereIsRefused(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Visitor")
	ws := s.connect(t, cookie)
	for _, site := range []string{"cross-site", "same-site"} {
		if r := s.request(t, "GET", "/api/logout", "", cookie, "Sec-Fetch-Site", site).expect(t, 403); r.body["error"] == nil {
			t.Fatalf("no JSON error: %s", r.raw)
		}
	}
	s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 200)
	sendAndAck(t, ws, "still in the room")
	s.request(t, "GET", "/api/logout", "", cookie, "Sec-Fetch-Site", "same-origin").expect(t, 200)
	s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 401)
}

func TestLogoutClosesThatSessionsSocket(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	ivan := s.user(t, "Ivan")
	judy := s.user(t, "Judy")
	wi := s.connect(t, ivan)
	wj := s.connect(t, judy)
	wi.nextWhere(isEvent("join", "Judy"))
	s.request(t, "GET", "/api/logout", "", judy).expect(t, 200)
	if code := wj.expectClose(5 * time.Second); code != closeNormal {
		t.Fatalf("logged-out socket closed with %d, want %d", code, closeNormal)
	}
	wi.nextWhere(isEvent("leave", "Judy"))
	if got := s.online(t, ivan); got != "[Ivan]" {
		t.Fatalf("online after logout: %s", got)
	}
}

func TestWrongMethodIs405AndUnknownPathIs404(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	for _, c := range []struct{ method, path string }{
		{"GET", "/api/register"}, {"GET", "/api/login"}, {"DELETE", "/api/logout"},
		{"POST", "/api/online"}, {"PUT", "/api/user/@me"}, {"POST", "/api/user/bob"},
		{"POST", "/healthz"}, {"POST", "/ws"}, {"DELETE", "/api/messages"},
	} {
		s.request(t, c.method, c.path, "", nil).expect(t, 405)
	}
	s.request(t, "GET", "/api/nothing", "", nil).expect(t, 404)
}

func TestHealthz(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	if r := s.request(t, "GET", "/healthz", "", nil).expect(t, 200); r.body["status"] != "ok" {
		t.Fatalf("healthz: %s", r.raw)
	}
}

func TestHealthzIs503WhenTheDatabaseIsGone(t *testing.T) {
	t.Parallel()
	cfg, err := parseConfig([]string{"-db", t.TempDir() + "/chat.db"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store, err := OpenStore(cfg.DB, &Metrics{})
	if err != nil {
		t.Fatal(err)
	}
	store.Close()
	rec := httptest.NewRecorder()
	handleHealth(store, slog.New(slog.NewTextHandler(io.Discard, nil))).ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), `"error"`) {
		t.Fatalf("healthz on a closed database: %d %s", rec.Code, rec.Body.String())
	}
}

// /healthz must not answer 200 while every write fails (a full disk), or
// while the server writes to a database file that is no longer there.
func TestHealthzFailsWhenTheDatabaseCannotTakeWrites(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	s.request(t, "GET", "/healthz", "", nil).expect(t, 200)
	db, err := sql.Open("sqlite", s.dbPath+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TRIGGER full BEFORE UPDATE ON health BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END`); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		s.request(t, "GET", "/healthz", "", nil).expect(t, 503)
	}
	if _, err := db.Exec(`DROP TRIGGER full`); err != nil {
		t.Fatal(err)
	}
	s.request(t, "GET", "/healthz", "", nil).expect(t, 200)

	if err := os.Remove(s.dbPath); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		s.request(t, "GET", "/healthz", "", nil).expect(t, 503)
	}
	// Logged at error level once per outage, not once per check.
	if n := strings.Count(s.logs.String(), "level=ERROR msg=\"health check failed\""); n != 2 {
		t.Fatalf("%d error lines for two outages:\n%s", n, s.logs.String())
	}
}

func TestConcurrentRegistrationOfOneName(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	const n = 24
	statuses := make(chan int, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			name := "Race"
			if i%2 == 1 {
				name = "rACE"
			}
			statuses <- s.request(t, "POST", "/api/register", fmt.Sprintf(`{"username":%q}`, name), nil).status
		}()
	}
	close(start)
	wg.Wait()
	close(statuses)
	count := map[int]int{}
	for st := range statuses {
		count[st]++
	}
	if count[201] != 1 || count[409] != n-1 {
		t.Fatalf("statuses %v, want one 201 and %d 409", count, n-1)
	}
}

func TestSessionExpiresWhenIdle(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-session-ttl", "1h")
	idle := s.user(t, "Kim")
	busy := s.user(t, "Lee")
	// Activity slides the session: used every 30 minutes, it outlives the TTL.
	for range 6 {
		s.clock.Advance(30 * time.Minute)
		s.request(t, "GET", "/api/user/@me", "", busy).expect(t, 200)
	}
	s.request(t, "GET", "/api/user/@me", "", idle).expect(t, 401)
	s.request(t, "GET", "/api/online", "", idle).expect(t, 401)
	ws, r := s.dialWS(t, idle, dialOpts{})
	if ws != nil || r.status != 401 {
		t.Fatalf("websocket with an expired session: %d", r.status)
	}
}

func TestOpenSocketKeepsSessionAlive(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-session-ttl", "1h")
	cookie := s.user(t, "Mia")
	ws := s.connect(t, cookie)
	s.clock.Advance(3 * time.Hour)
	s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 200)
	// The server lets go of the session before it answers the close frame.
	ws.close()
	s.clock.Advance(61 * time.Minute)
	s.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 401)
}

// FuzzStringField checks the request-body parser: it never panics, and what
// it accepts is exactly one JSON object with one string field.
func FuzzStringField(f *testing.F) {
	for _, seed := range []string{
		`{"username":"bob"}`, `{"username":5}`, `{}`, `[]`, `null`, ` {"username":"a"} `,
		`{"username":"a"}{}`, `{"username":"a","username":"b"}`, `{"username":"\u0000"}`,
		`{"username":"a"`, "\xff\xfe", `{"username":"a","x":null}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		value, err := stringField(data, "username")
		if err != nil {
			return
		}
		var obj map[string]any
		if e := json.Unmarshal(data, &obj); e != nil {
			t.Fatalf("accepted %q, which is not a JSON object: %v", data, e)
		}
		if len(obj) != 1 || obj["username"] != value {
			t.Fatalf("accepted %q as %q", data, value)
		}
	})
}

// Each login is a session in memory and a row; one account's logins end its
// least recently used sessions beyond 20, but never one with an open socket.
func TestSessionsPerUserAreCapped(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	key := s.register(t, "Hoarder")
	first := s.login(t, key)
	ws := s.connect(t, first) // keeps its session however many come after
	var cookies []*http.Cookie
	for range 25 {
		s.clock.Advance(time.Second)
		cookies = append(cookies, s.login(t, key))
	}
	s.request(t, "GET", "/api/user/@me", "", first).expect(t, 200)
	for i, c := range cookies {
		want := 200
		if i < 6 { // 1 pinned + the newest 19 make 20
			want = 401
		}
		s.request(t, "GET", "/api/user/@me", "", c).expect(t, want)
	}
	ws.close()
	db, err := sql.Open("sqlite", s.dbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var rows int
	if err := db.QueryRow(`SELECT COUNT(*) FROM sessions WHERE username = 'Hoarder'`).Scan(&rows); err != nil || rows != 20 {
		t.Fatalf("%d session rows (%v), want 20", rows, err)
	}
}

// /metrics counts what the test did, in Prometheus's text format, and only
// for loopback and trusted proxies' own clients.
func TestMetricsCountTheTraffic(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	alice := s.connect(t, s.user(t, "Alice"))
	bob := s.connect(t, s.user(t, "Bob"))
	alice.nextWhere(isEvent("join", "Bob"))
	for i := range 3 {
		sendAndAck(t, alice, fmt.Sprint("m", i))
	}
	alice.sendMessage(strings.Repeat("x", 301))
	alice.sendText(`{"msg":"?"}`)
	for _, code := range []string{"message_too_long", "invalid_message"} {
		if f := alice.nextWhere(func(f map[string]any) bool { _, ok := f["status"]; return ok }); f["code"] != code {
			t.Fatalf("ack %v, want %s", f, code)
		}
	}
	for range 3 {
		bob.nextWhere(isChat)
	}
	resp, err := http.Get(s.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	got := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad line %q", line)
		}
		got[line[:i]] = v
	}
	for name, want := range map[string]float64{
		"gochat_websockets_open":                                 2,
		"gochat_registrations_total":                             2,
		"gochat_logins_total":                                    2,
		"gochat_messages_accepted_total":                         3,
		"gochat_deliveries_total":                                3,
		`gochat_messages_refused_total{code="message_too_long"}`: 1,
		`gochat_messages_refused_total{code="invalid_message"}`:  1,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v", name, got[name], want)
		}
	}
	if n := got["gochat_db_commit_seconds_count"]; n < 1 || n > 3 || got[`gochat_db_commit_seconds_bucket{le="+Inf"}`] != n {
		t.Errorf("commit histogram count %v", n)
	}
	if got[`gochat_http_responses_total{class="2xx"}`] < 4 {
		t.Errorf("2xx responses %v", got[`gochat_http_responses_total{class="2xx"}`])
	}
	// A client of the (trusted, loopback) proxy is someone on the internet.
	s.request(t, "GET", "/metrics", "", nil, "X-Forwarded-For", "203.0.113.5").expect(t, 404)
}

// Every response is counted: a handler's implicit 200 (a scrape of
// /metrics itself) and a WebSocket's 101 too.
func TestMetricsCountEveryResponse(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	s.metrics(t)
	s.connect(t, s.user(t, "Counted")) // 201, 200, 101
	m := s.metrics(t)
	for _, series := range []string{`gochat_http_responses_total{class="1xx"} 1` + "\n", `gochat_http_responses_total{class="2xx"} 3` + "\n"} {
		if !strings.Contains(m, series) {
			t.Errorf("want %q in:\n%s", series, m)
		}
	}
}

// /metrics explains every family (HELP, TYPE), has every series before
// its first event, the process's and Go's own figures, and the version.
func TestMetricsAreCompleteFromTheStart(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	m := s.metrics(t)
	for _, series := range []string{`gochat_messages_refused_total{code="rate_limited"} 0`, "gochat_logins_total 0",
		`gochat_clients_dropped_total{reason="silent"} 0`, `gochat_http_responses_total{class="5xx"} 0`,
		"gochat_db_commit_seconds_count 0", `gochat_build_info{version="`, "process_cpu_seconds_total ",
		"process_start_time_seconds ", "go_goroutines ", "go_memstats_heap_alloc_bytes ", "go_gc_cycles_total "} {
		if !strings.Contains(m, "\n"+series) {
			t.Errorf("no %s in:\n%s", series, m)
		}
	}
	explained := map[string]int{} // by family: 1 with HELP, 2 with TYPE too
	for _, line := range strings.Split(strings.TrimSpace(m), "\n") {
		if f, ok := strings.CutPrefix(line, "# HELP "); ok {
			explained[strings.Fields(f)[0]] = 1
		} else if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			explained[strings.Fields(f)[0]]++
		} else if family := strings.TrimSuffix(strings.FieldsFunc(line, func(r rune) bool { return r == '{' || r == ' ' })[0],
			"_bucket"); explained[family] != 2 && explained[strings.TrimSuffix(strings.TrimSuffix(family, "_sum"), "_count")] != 2 {
			t.Errorf("%q without HELP and TYPE before it", line)
		}
	}
	for _, live := range []string{"process_resident_memory_bytes", "process_open_fds"} { // from Linux's /proc
		if runtime.GOOS != "linux" {
			break
		}
		var v float64
		_, after, _ := strings.Cut(m, "\n"+live+" ")
		if fmt.Sscan(after, &v); v <= 0 {
			t.Errorf("%s is not positive in:\n%s", live, m)
		}
	}
}

// The log tells an operator what happened, by whom and from where, and
// never holds a key or a session id.
func TestLogsSayWhatHappened(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-admins", "Boss", "-auth-rate", "0.001", "-auth-burst", "6")
	key := s.register(t, "Eve")
	eve := s.login(t, key)
	boss := s.user(t, "Boss")
	s.request(t, "POST", "/api/login", `{"key":"wrong-key-1234"}`, nil).expect(t, 401)
	for i := 0; s.request(t, "POST", "/api/login", `{"key":"wrong-key-1234"}`, nil).status != 429; i++ {
		if i > 10 {
			t.Fatal("no 429 after the burst")
		}
	}
	ws := s.connect(t, eve)
	if second, r := s.dialWS(t, eve, dialOpts{}); second != nil || r.status != 409 {
		t.Fatalf("second socket: %d", r.status)
	}
	s.request(t, "POST", "/api/user/Eve/ban", "", boss).expect(t, 200)
	if code := ws.expectClose(5 * time.Second); code != closePolicyViolation {
		t.Fatalf("banned socket closed with %d", code)
	}
	s.request(t, "DELETE", "/api/user/Eve/ban", "", boss).expect(t, 200)
	s.waitForLog(t, "msg=registered", "user=Eve", "client=127.0.0.1")
	s.waitForLog(t, "level=WARN", `msg="login failed: unknown key"`, "client=127.0.0.1")
	s.waitForLog(t, "level=WARN", `msg="rate limited"`, "limit=logins", "client=127.0.0.1")
	s.waitForLog(t, `msg="websocket refused"`, "user=Eve", `err="user already has an open WebSocket"`)
	s.waitForLog(t, "msg=ban", "user=Eve", "banned=true", "admin=Boss")
	s.waitForLog(t, "msg=ban", "user=Eve", "banned=false")
	s.waitForLog(t, `msg="websocket closed"`, "user=Eve", "client=127.0.0.1", "code=1008")
	for _, secret := range []string{key, eve.Value, boss.Value, "wrong-key-1234"} {
		if strings.Contains(s.logs.String(), secret) {
			t.Fatalf("a secret in the log:\n%s", s.logs.String())
		}
	}
}
