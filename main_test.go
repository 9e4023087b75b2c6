package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestMain doubles as the server binary: with GOCHAT_TEST_SERVER set, the
// test executable runs the real command with the arguments in
// GOCHAT_TEST_ARGS, so tests can signal and kill -9 a real process.
func TestMain(m *testing.M) {
	if os.Getenv("GOCHAT_TEST_SERVER") == "1" {
		var args []string
		if err := json.Unmarshal([]byte(os.Getenv("GOCHAT_TEST_ARGS")), &args); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if n, err := strconv.ParseUint(os.Getenv("GOCHAT_TEST_FSIZE"), 10, 64); err == nil {
			syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: n, Max: n}) // a disk that fills up
		}
		os.Args = append([]string{"gochat"}, args...)
		main()
		os.Exit(0)
	}
	// Most tests spend their time waiting out the server's timeouts (a
	// 5 s probe, a stalled write), not using a core: run more of them at
	// once than the machine has cores, unless -parallel says otherwise.
	flag.Parse()
	parallelSet := false
	flag.Visit(func(f *flag.Flag) { parallelSet = parallelSet || f.Name == "test.parallel" })
	if !parallelSet {
		flag.Set("test.parallel", "8")
	}
	os.Exit(m.Run())
}

// testServer is the real server, in-process, on a loopback port.
type testServer struct {
	t      testing.TB
	addr   string
	url    string
	dbPath string
	clock  *testClock
	client *http.Client // nil: http.DefaultClient
	logs   syncBuffer   // what the server logged
	cancel context.CancelFunc
	done   chan error
}

// syncBuffer is a bytes.Buffer that the server and a test can share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// waitForLog waits until the server has logged a line containing all of parts.
func (s *testServer) waitForLog(t testing.TB, parts ...string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		for _, line := range strings.Split(s.logs.String(), "\n") {
			if containsAll(line, parts) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q in:\n%s", parts, s.logs.String())
		}
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

// testClock is the server's clock in tests, moved by hand, so that expiry
// and retention are tested without waiting for them.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// startServer starts the server with args on 127.0.0.1:0 and a database in
// a fresh temporary directory (unless args name one). Limits that tests
// would trip by accident are off unless args set them.
func startServer(t testing.TB, args ...string) *testServer {
	t.Helper()
	return startServerAt(t, &testClock{now: time.Now()}, args...)
}

// startServerAt is startServer with the server's clock at clock, and its
// cleanup and retention running every 20ms.
func startServerAt(t testing.TB, clock *testClock, args ...string) *testServer {
	t.Helper()
	defaults := []string{"-db", filepath.Join(t.TempDir(), "chat.db"), "-msg-rate", "0", "-auth-rate", "0", "-open-rate", "0", "-read-rate", "0"}
	cfg, err := parseConfig(append(defaults, args...), io.Discard)
	if err != nil {
		t.Fatalf("parse flags: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.now, cfg.cleanupEvery = clock.Now, 20*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	s := &testServer{t: t, addr: ln.Addr().String(), dbPath: cfg.DB, clock: clock, cancel: cancel, done: make(chan error, 1)}
	s.url = "http://" + s.addr
	var logOut io.Writer = &s.logs
	if os.Getenv("GOCHAT_TEST_LOG") != "" {
		logOut = io.MultiWriter(&s.logs, os.Stderr)
	}
	go func() { s.done <- serve(ctx, cfg, ln, slog.New(slog.NewTextHandler(logOut, nil))) }()
	t.Cleanup(func() { s.stop() })
	return s
}

// stop shuts the server down as a signal would and returns serve's result.
func (s *testServer) stop() error {
	s.cancel()
	select {
	case err := <-s.done:
		s.done <- err // let a later stop see it too
		return err
	case <-time.After(15 * time.Second):
		return errors.New("server did not stop within 15s")
	}
}

// response is a decoded HTTP answer.
type response struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

func (s *testServer) request(t testing.TB, method, path, body string, cookie *http.Cookie, headers ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, s.url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if cookie != nil {
		req.AddCookie(cookie)
	}
	if method == "POST" || method == "DELETE" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	client := s.client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	r := response{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	if method != http.MethodHead {
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: Content-Type %q, want application/json", method, path, ct)
		}
		if err := json.Unmarshal(raw, &r.body); err != nil {
			t.Errorf("%s %s: body %q is not a JSON object: %v", method, path, raw, err)
		}
	}
	return r
}

// expect fails the test unless r has the status and, for errors, a
// non-empty "error" string.
func (r response) expect(t testing.TB, status int) response {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.raw)
	}
	if status >= 400 {
		if msg, _ := r.body["error"].(string); msg == "" {
			t.Fatalf("error response without an error message: %s", r.raw)
		}
	}
	return r
}

func (s *testServer) register(t testing.TB, name string) string {
	t.Helper()
	r := s.request(t, "POST", "/api/register", fmt.Sprintf(`{"username":%q}`, name), nil).expect(t, 201)
	key, _ := r.body["key"].(string)
	return key
}

func (s *testServer) login(t testing.TB, key string) *http.Cookie {
	t.Helper()
	r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil).expect(t, 200)
	return sessionCookieOf(t, r.header)
}

// online returns the names GET /api/online lists, as fmt prints them: [A B].
func (s *testServer) online(t testing.TB, cookie *http.Cookie) string {
	t.Helper()
	return fmt.Sprint(s.request(t, "GET", "/api/online", "", cookie).expect(t, 200).body["online_clients"])
}

// user registers name and logs in, returning the session cookie.
func (s *testServer) user(t testing.TB, name string) *http.Cookie {
	t.Helper()
	return s.login(t, s.register(t, name))
}

func sessionCookieOf(t testing.TB, h http.Header) *http.Cookie {
	t.Helper()
	for _, c := range (&http.Response{Header: h}).Cookies() {
		if c.Name == "session" {
			return c
		}
	}
	t.Fatalf("no session cookie in %v", h["Set-Cookie"])
	return nil
}

// wsConn is a minimal WebSocket client over a real TCP connection. It is
// written out here, rather than taken from x/net, so that tests can see
// close codes and behave badly on purpose: stop reading, send oversized or
// binary frames, vanish without a close frame.
type wsConn struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
	mu sync.Mutex // one frame written at a time
}

// dialOpts adjusts a WebSocket handshake.
type dialOpts struct {
	query   string
	headers []string    // name, value pairs
	readBuf int         // SO_RCVBUF for the client socket, 0: default
	tls     *tls.Config // dial wss: instead of ws:
	from    string      // the client's local IP, 0: the default
}

// dialWS opens /ws. It returns the connection on 101, else the HTTP answer.
func (s *testServer) dialWS(t testing.TB, cookie *http.Cookie, opts dialOpts) (*wsConn, response) {
	t.Helper()
	var c net.Conn
	var err error
	if opts.tls != nil {
		c, err = tls.Dial("tcp", s.addr, opts.tls)
	} else {
		// A small receive buffer is set before connecting, so that the
		// window the peer is offered fits it: set after, the kernel drops
		// what does not fit and the sender backs off for seconds.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(opts.from)}, Control: func(_, _ string, rc syscall.RawConn) error {
			if opts.readBuf > 0 {
				rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, opts.readBuf) })
			}
			return nil
		}}
		c, err = d.Dial("tcp", s.addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, 16)
	rand.Read(nonce)
	var req bytes.Buffer
	fmt.Fprintf(&req, "GET /ws%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n", opts.query, s.addr)
	fmt.Fprintf(&req, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", base64.StdEncoding.EncodeToString(nonce))
	if cookie != nil {
		fmt.Fprintf(&req, "Cookie: %s=%s\r\n", cookie.Name, cookie.Value)
	}
	for i := 0; i+1 < len(opts.headers); i += 2 {
		fmt.Fprintf(&req, "%s: %s\r\n", opts.headers[i], opts.headers[i+1])
	}
	req.WriteString("\r\n")
	if _, err := c.Write(req.Bytes()); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("websocket handshake: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if resp.StatusCode == http.StatusSwitchingProtocols {
		ws := &wsConn{t: t, c: c, br: br}
		t.Cleanup(func() { c.Close() })
		return ws, response{status: 101, header: resp.Header}
	}
	defer c.Close()
	raw, _ := io.ReadAll(resp.Body)
	r := response{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	json.Unmarshal(raw, &r.body)
	return nil, r
}

// connect opens /ws and fails the test unless it gets 101.
func (s *testServer) connect(t testing.TB, cookie *http.Cookie, opts ...dialOpts) *wsConn {
	t.Helper()
	var o dialOpts
	if len(opts) > 0 {
		o = opts[0]
	}
	ws, r := s.dialWS(t, cookie, o)
	if ws == nil {
		t.Fatalf("websocket refused: %d %s", r.status, r.raw)
	}
	return ws
}

// writeFrame sends one masked frame, as a client must.
func (w *wsConn) writeFrame(opcode byte, payload []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err := w.c.Write(maskedFrame(opcode, payload))
	return err
}

// maskedFrame frames payload as a client must: final and masked.
func maskedFrame(opcode byte, payload []byte) []byte {
	hdr := []byte{0x80 | opcode}
	switch n := len(payload); {
	case n < 126:
		hdr = append(hdr, 0x80|byte(n))
	case n <= 0xFFFF:
		hdr = append(hdr, 0x80|126, byte(n>>8), byte(n))
	default:
		hdr = append(hdr, 0x80|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(n))
	}
	mask := make([]byte, 4)
	rand.Read(mask)
	masked := make([]byte, len(payload))
	for i := range payload {
		masked[i] = payload[i] ^ mask[i%4]
	}
	return append(append(hdr, mask...), masked...)
}

func (w *wsConn) sendText(s string) {
	w.t.Helper()
	if err := w.writeFrame(opText, []byte(s)); err != nil {
		w.t.Fatalf("send: %v", err)
	}
}

func (w *wsConn) sendMessage(text string) {
	w.t.Helper()
	w.sendText(string(mustJSON(map[string]string{"message": text})))
}

// readFrame returns the next frame's opcode and payload.
func (w *wsConn) readFrame(timeout time.Duration) (byte, []byte, error) {
	w.c.SetReadDeadline(time.Now().Add(timeout))
	var hdr [2]byte
	if _, err := io.ReadFull(w.br, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int64(hdr[1] & 0x7F)
	switch n {
	case 126:
		var ext [2]byte
		if _, err := io.ReadFull(w.br, ext[:]); err != nil {
			return 0, nil, err
		}
		n = int64(binary.BigEndian.Uint16(ext[:]))
	case 127:
		var ext [8]byte
		if _, err := io.ReadFull(w.br, ext[:]); err != nil {
			return 0, nil, err
		}
		n = int64(binary.BigEndian.Uint64(ext[:]))
	}
	if hdr[1]&0x80 != 0 {
		return 0, nil, errors.New("server sent a masked frame")
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(w.br, payload); err != nil {
		return 0, nil, err
	}
	return hdr[0] & 0x0F, payload, nil
}

// next returns the next data frame as JSON, answering pings on the way. A
// close frame fails the test.
func (w *wsConn) next() map[string]any {
	w.t.Helper()
	for {
		op, payload, err := w.readFrame(10 * time.Second)
		if err != nil {
			w.t.Fatalf("read frame: %v", err)
		}
		switch op {
		case opPing:
			w.writeFrame(0xA, payload)
			continue
		case opClose:
			w.t.Fatalf("unexpected close frame, code %d", closeCodeOf(payload))
		}
		var v map[string]any
		if err := json.Unmarshal(payload, &v); err != nil {
			w.t.Fatalf("frame %q is not a JSON object: %v", payload, err)
		}
		return v
	}
}

// nextWhere skips frames until one matches.
func (w *wsConn) nextWhere(match func(map[string]any) bool) map[string]any {
	w.t.Helper()
	for {
		if f := w.next(); match(f) {
			return f
		}
	}
}

// expectClose reads until the close frame, answers it and returns its code.
func (w *wsConn) expectClose(timeout time.Duration) int {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		op, payload, err := w.readFrame(time.Until(deadline))
		if err != nil {
			w.t.Fatalf("waiting for close frame: %v", err)
		}
		if op == opClose {
			w.writeFrame(opClose, payload)
			return closeCodeOf(payload)
		}
	}
}

// close sends a close frame and waits for the server's answer.
func (w *wsConn) close() {
	w.t.Helper()
	w.writeFrame(opClose, binary.BigEndian.AppendUint16(nil, closeNormal))
	if code := w.expectClose(5 * time.Second); code != closeNormal {
		w.t.Fatalf("close answered with %d, want %d", code, closeNormal)
	}
	w.c.Close()
}

func closeCodeOf(payload []byte) int {
	if len(payload) < 2 {
		return 1005
	}
	return int(binary.BigEndian.Uint16(payload))
}

func isEvent(event, user string) func(map[string]any) bool {
	return func(f map[string]any) bool { return f["event"] == event && f["username"] == user }
}

func isChat(f map[string]any) bool { _, ok := f["message"]; return ok }

// --- the server as a separate process ---

// process is the real command, run from the test binary (see TestMain).
type process struct {
	cmd  *exec.Cmd
	addr string
	url  string
	out  *bytes.Buffer
}

var listenLine = regexp.MustCompile(`addr=(127\.0\.0\.1:\d+)`)

func startProcess(t testing.TB, args ...string) *process {
	t.Helper()
	all, _ := json.Marshal(append([]string{"-addr", "127.0.0.1:0", "-msg-rate", "0", "-auth-rate", "0", "-open-rate", "0", "-read-rate", "0"}, args...))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "GOCHAT_TEST_SERVER=1", "GOCHAT_TEST_ARGS="+string(all))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, out: &bytes.Buffer{}}
	cmd.Stderr = p.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if m := listenLine.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case found <- m[1]:
				default:
				}
			}
		}
	}()
	select {
	case p.addr = <-found:
	case <-time.After(20 * time.Second):
		t.Fatalf("server process did not start: %s", p.out)
	}
	p.url = "http://" + p.addr
	return p
}

// asServer lets the HTTP and WebSocket helpers talk to the process.
func (p *process) asServer(t testing.TB) *testServer {
	return &testServer{t: t, addr: p.addr, url: p.url}
}

func (p *process) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// wait returns the exit code, failing the test after timeout.
func (p *process) wait(t testing.TB, timeout time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(timeout):
		t.Fatalf("process still running after %v", timeout)
		return -1
	}
}

// --- lifecycle ---

func TestRestartKeepsUsers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	db := filepath.Join(dir, "chat.db")
	s := startServer(t, "-db", db)
	key := s.register(t, "Persistent")
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "-db", db)
	r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil).expect(t, 200)
	if r.body["username"] != "Persistent" {
		t.Fatalf("login after restart: %s", r.raw)
	}
	s.request(t, "POST", "/api/register", `{"username":"persistent"}`, nil).expect(t, 409)
}

func TestSIGTERMClosesSocketsAndExitsZero(t *testing.T) {
	t.Parallel()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			p := startProcess(t, "-db", filepath.Join(t.TempDir(), "chat.db"))
			s := p.asServer(t)
			ws := s.connect(t, s.user(t, "Sig"))
			code := make(chan int, 1)
			go func() { code <- ws.expectClose(10 * time.Second) }()
			p.signal(t, sig)
			if c := <-code; c != closeGoingAway {
				t.Fatalf("close code %d, want %d", c, closeGoingAway)
			}
			if exit := p.wait(t, 10*time.Second); exit != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", exit, p.out)
			}
		})
	}
}

func TestRegisteredUsersSurviveKill9(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	p := startProcess(t, "-db", db)
	s := p.asServer(t)
	keys := map[string]string{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("durable%d", i)
			key := s.register(t, name)
			mu.Lock()
			keys[name] = key
			mu.Unlock()
		}()
	}
	wg.Wait()
	// SIGKILL straight after the last 201: no shutdown code runs.
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.wait(t, 10*time.Second)
	s2 := startServer(t, "-db", db)
	for name, key := range keys {
		r := s2.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil).expect(t, 200)
		if r.body["username"] != name {
			t.Fatalf("login %s after kill -9: %s", name, r.raw)
		}
	}
}

func TestBadFlagsAndFilesFailClearly(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var out bytes.Buffer
	if err := run(ctx, []string{"-session-ttl", "banana"}, &out); err == nil {
		t.Fatal("bad duration accepted")
	}
	if err := run(ctx, []string{"-tls-cert", "x.pem"}, &out); err == nil || !strings.Contains(err.Error(), "-tls-key") {
		t.Fatalf("cert without key: %v", err)
	}
	if err := run(ctx, []string{"-h"}, &out); err != nil || !containsAll(out.String(), []string{"-session-ttl", "gochat backup", "-version"}) {
		t.Fatalf("-h: err %v, usage %q", err, out.String())
	}
	out.Reset()
	if err := run(ctx, []string{"-version"}, &out); err != nil || !strings.HasPrefix(out.String(), "gochat ") {
		t.Fatalf("-version: err %v, %q", err, out.String())
	}
	missingDir := filepath.Join(t.TempDir(), "no", "such", "dir", "chat.db")
	if err := run(ctx, []string{"-addr", "127.0.0.1:0", "-db", missingDir}, io.Discard); err == nil || !strings.Contains(err.Error(), "open db") {
		t.Fatalf("database in a missing directory: %v", err)
	}
}

// jsonUnmarshalObject reports whether p decodes into v.
func jsonUnmarshalObject(p []byte, v any) bool { return json.Unmarshal(p, v) == nil }

// postJSON posts body and decodes the answer, returning transport errors
// instead of failing: for servers that are about to be killed.
func postJSON(url, body string) (response, error) {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, err
	}
	r := response{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	json.Unmarshal(raw, &r.body)
	return r, nil
}

func TestSessionsSurviveRestartButNotLogout(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	s := startServer(t, "-db", db)
	kept := s.user(t, "Kept")
	gone := s.user(t, "Gone")
	s.request(t, "GET", "/api/logout", "", gone).expect(t, 200)
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "-db", db)
	if r := s.request(t, "GET", "/api/user/@me", "", kept).expect(t, 200); r.body["username"] != "Kept" {
		t.Fatalf("session after restart: %s", r.raw)
	}
	s.request(t, "GET", "/api/user/@me", "", gone).expect(t, 401)
	ws := s.connect(t, kept)
	ws.close()
}

func TestSessionSurvivesKill9AndExpiresAcrossRestarts(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	p := startProcess(t, "-db", db, "-session-ttl", "2s")
	s := p.asServer(t)
	cookie := s.user(t, "Phoenix")
	p.cmd.Process.Kill()
	p.wait(t, 10*time.Second)
	s2 := startServer(t, "-db", db, "-session-ttl", "2s")
	s2.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 200)
	if err := s2.stop(); err != nil {
		t.Fatal(err)
	}
	s3 := startServerAt(t, &testClock{now: time.Now().Add(3 * time.Second)}, "-db", db, "-session-ttl", "2s")
	s3.request(t, "GET", "/api/user/@me", "", cookie).expect(t, 401)
}

// selfSignedCert writes a certificate and key for 127.0.0.1 and returns
// their paths and a client config that trusts the certificate.
func selfSignedCert(t *testing.T) (certFile, keyFile string, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "gochat test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, &tls.Config{RootCAs: pool}
}

func TestDirectTLS(t *testing.T) {
	t.Parallel()
	certFile, keyFile, clientTLS := selfSignedCert(t)
	s := startServer(t, "-tls-cert", certFile, "-tls-key", keyFile)
	s.url = "https://" + s.addr
	s.client = &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS}}

	key := s.register(t, "Secure")
	r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, key), nil).expect(t, 200)
	cookie := sessionCookieOf(t, r.header)
	if !cookie.Secure {
		t.Fatalf("cookie over TLS is not Secure: %s", r.header.Get("Set-Cookie"))
	}
	other := s.user(t, "AlsoSecure")
	a := s.connect(t, cookie, dialOpts{tls: clientTLS, headers: []string{"Origin", "https://" + s.addr}})
	b := s.connect(t, other, dialOpts{tls: clientTLS})
	a.nextWhere(isEvent("join", "AlsoSecure"))
	// A burst over TLS: many frames per write pump write.
	for i := range 200 {
		a.sendMessage(fmt.Sprintf("tls %d", i))
	}
	for i := range 200 {
		if f := b.nextWhere(isChat); f["message"] != fmt.Sprintf("tls %d", i) {
			t.Fatalf("message %d over wss: %v", i, f)
		}
	}
	b.close()
	a.nextWhere(isEvent("leave", "AlsoSecure"))
	// A plain-HTTP origin is a different origin.
	if ws, r := s.dialWS(t, cookie, dialOpts{tls: clientTLS, headers: []string{"Origin", "http://" + s.addr}}); ws != nil || r.status != 403 {
		t.Fatalf("http origin against an https server: %d", r.status)
	}
}

// net/http's own errors (a failed TLS handshake here; "too many open files"
// on accept in production) reach the log at warning level.
func TestServerErrorsAreLoggedAsWarnings(t *testing.T) {
	t.Parallel()
	certFile, keyFile, _ := selfSignedCert(t)
	s := startServer(t, "-tls-cert", certFile, "-tls-key", keyFile)
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")) // plain HTTP to a TLS port
	io.Copy(io.Discard, c)
	c.Close()
	s.waitForLog(t, "level=WARN", "TLS handshake error")
}

// -log-format json writes one JSON object a line, and every WebSocket open
// and close is a line with its user.
func TestJSONLogsWithSocketLines(t *testing.T) {
	t.Parallel()
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0", "-db", filepath.Join(t.TempDir(), "chat.db"),
			"-log-format", "json", "-auth-rate", "0", "-open-rate", "0", "-read-rate", "0"}, &out)
	}()
	var s *testServer
	lines := func() (records []map[string]any) {
		for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil {
				t.Fatalf("not a JSON line: %q", line)
			}
			records = append(records, rec)
		}
		return records
	}
	for deadline := time.Now().Add(10 * time.Second); s == nil; time.Sleep(5 * time.Millisecond) {
		if out.String() != "" && lines()[0]["msg"] == "gochat listening" {
			addr := lines()[0]["addr"].(string)
			s = &testServer{t: t, addr: addr, url: "http://" + addr}
		} else if time.Now().After(deadline) {
			t.Fatalf("no listening line: %s", out.String())
		}
	}
	s.connect(t, s.user(t, "Logged")).close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var open, closed bool
	for _, rec := range lines() {
		open = open || rec["msg"] == "websocket open" && rec["user"] == "Logged"
		closed = closed || rec["msg"] == "websocket closed" && rec["user"] == "Logged" && rec["code"] == float64(closeNormal)
	}
	if !open || !closed {
		t.Fatalf("open %v, closed %v in:\n%s", open, closed, out.String())
	}
}

// A certificate renewed on disk (by certbot, say) is served without a
// restart, and a bad one is logged and leaves the last good one served.
func TestRenewedCertificateIsServedWithoutRestart(t *testing.T) {
	t.Parallel()
	certFile, keyFile, _ := selfSignedCert(t)
	s := startServer(t, "-tls-cert", certFile, "-tls-key", keyFile)
	served := func() []byte {
		c, err := tls.Dial("tcp", s.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Raw
	}
	before := served()
	newCert, newKey, _ := selfSignedCert(t)
	for from, to := range map[string]string{newCert: certFile, newKey: keyFile} {
		data, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(to, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	want, _ := os.ReadFile(newCert)
	block, _ := pem.Decode(want)
	// Reloaded on a cleanup tick, every 20 ms here.
	for deadline := time.Now().Add(10 * time.Second); ; {
		after := served()
		if bytes.Equal(after, block.Bytes) {
			break
		}
		if !bytes.Equal(after, before) || time.Now().After(deadline) {
			t.Fatal("not serving the renewed certificate")
		}
	}
	// Written aside and renamed, so that the server sees one change, not
	// an empty file and then a bad one. (The renewal above may have been
	// seen half done, and logged: count from here.)
	const failed = "TLS certificate not reloaded"
	reported := strings.Count(s.logs.String(), failed)
	if err := os.WriteFile(certFile+".new", []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(certFile+".new", certFile); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); strings.Count(s.logs.String(), failed) == reported; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("a bad certificate file was not reported")
		}
	}
	if !bytes.Equal(served(), block.Bytes) {
		t.Fatal("a bad certificate file replaced the good one")
	}
	if n := strings.Count(s.logs.String(), failed) - reported; n != 1 {
		t.Fatalf("a bad file changed once was reported %d times", n)
	}
}
