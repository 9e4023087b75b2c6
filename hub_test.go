package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

func TestWebSocketRefusalsBeforeUpgrade(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-allowed-origins", "https://chat.example.org")
	cookie := s.user(t, "Nora")
	bogus := *cookie
	bogus.Value = strings.Repeat("q", 32)
	cases := []struct {
		name   string
		cookie *http.Cookie
		opts   dialOpts
		want   int
	}{
		{"no cookie", nil, dialOpts{}, 422},
		{"unknown session", &bogus, dialOpts{}, 401},
		{"foreign origin", cookie, dialOpts{headers: []string{"Origin", "https://evil.example"}}, 403},
		{"same host other scheme", cookie, dialOpts{headers: []string{"Origin", "https://" + s.addr}}, 403},
		{"null origin", cookie, dialOpts{headers: []string{"Origin", "null"}}, 403},
		{"since not a number", cookie, dialOpts{query: "?since=abc"}, 400},
		{"since negative", cookie, dialOpts{query: "?since=-1"}, 400},
		{"since with sign", cookie, dialOpts{query: "?since=+1"}, 400},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ws, r := s.dialWS(t, c.cookie, c.opts)
			if ws != nil {
				t.Fatal("upgraded, want refusal")
			}
			r.expect(t, c.want)
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
		})
	}
	// Not an upgrade at all.
	s.request(t, "GET", "/ws", "", cookie).expect(t, 400)

	for _, origin := range []string{"http://" + s.addr, "HTTP://" + strings.ToUpper(s.addr), "https://chat.example.org"} {
		ws := s.connect(t, cookie, dialOpts{headers: []string{"Origin", origin}})
		ws.close()
	}
	// Behind a proxy the origin is the one the browser saw.
	ws := s.connect(t, cookie, dialOpts{headers: []string{
		"Origin", "https://chat.internal", "X-Forwarded-Host", "chat.internal", "X-Forwarded-Proto", "https"}})
	ws.close()

	first := s.connect(t, cookie)
	if ws, r := s.dialWS(t, cookie, dialOpts{}); ws != nil || r.status != 409 {
		t.Fatalf("second socket of one user: %d, want 409", r.status)
	}
	first.close()
}

func TestOnlyOneOfSimultaneousConnectsSucceeds(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Oscar")
	const n = 8
	var wg sync.WaitGroup
	results := make(chan int, n)
	start := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ws, r := s.dialWS(t, cookie, dialOpts{})
			if ws != nil {
				results <- 101
				return
			}
			results <- r.status
		}()
	}
	close(start)
	wg.Wait()
	close(results)
	count := map[int]int{}
	for st := range results {
		count[st]++
	}
	if count[101] != 1 || count[409] != n-1 {
		t.Fatalf("statuses %v, want one 101 and %d 409", count, n-1)
	}
}

func TestChatDeliversToOthersAndAcksTheSender(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	alice := s.connect(t, s.user(t, "Alice"))
	bob := s.connect(t, s.user(t, "Bob"))
	if f := alice.next(); f["event"] != "join" || f["username"] != "Bob" {
		t.Fatalf("alice got %v, want Bob's join", f)
	}
	alice.sendMessage("hello <b>bob</b> 👋")
	ack := alice.next()
	if ack["status"] != true || ack["id"] == nil {
		t.Fatalf("ack %v", ack)
	}
	got := bob.next()
	if got["message"] != "hello <b>bob</b> 👋" || got["author"] != "Alice" || got["id"] != ack["id"] || got["history"] != nil {
		t.Fatalf("bob got %v", got)
	}
	if _, err := time.Parse(time.RFC3339, got["time"].(string)); err != nil {
		t.Fatalf("time %v is not RFC 3339: %v", got["time"], err)
	}
	if !strings.HasSuffix(got["time"].(string), "Z") {
		t.Fatalf("time %v is not UTC", got["time"])
	}
	bob.sendMessage("hi")
	if f := bob.next(); f["status"] != true {
		t.Fatalf("bob's ack %v", f)
	}
	// Alice's next frame is Bob's message: her own never came back.
	if f := alice.next(); f["message"] != "hi" || f["author"] != "Bob" {
		t.Fatalf("alice got %v", f)
	}
	bob.close()
	if f := alice.next(); f["event"] != "leave" || f["username"] != "Bob" {
		t.Fatalf("alice got %v, want Bob's leave", f)
	}
}

func TestRefusedMessagesGetErrorAcksAndAreNotBroadcast(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	sender := s.connect(t, s.user(t, "Pat"))
	watcher := s.connect(t, s.user(t, "Quinn"))
	sender.nextWhere(isEvent("join", "Quinn"))
	cases := []struct {
		frame string
		code  string
	}{
		{`not json`, "invalid_message"},
		{`[]`, "invalid_message"},
		{`"text"`, "invalid_message"},
		{`null`, "invalid_message"},
		{`{}`, "invalid_message"},
		{`{"message":""}`, "invalid_message"},
		{`{"message":5}`, "invalid_message"},
		{`{"message":null}`, "invalid_message"},
		{`{"message":"a","extra":true}`, "invalid_message"},
		{`{"text":"a"}`, "invalid_message"},
		{`{"message":"a"} {"message":"b"}`, "invalid_message"},
		{fmt.Sprintf(`{"message":%q}`, strings.Repeat("é", 301)), "message_too_long"},
		{fmt.Sprintf(`{"message":%q}`, strings.Repeat("x", 301)), "message_too_long"},
	}
	for _, c := range cases {
		sender.sendText(c.frame)
		if f := sender.next(); f["status"] != false || f["code"] != c.code {
			t.Fatalf("frame %.40q: ack %v, want code %s", c.frame, f, c.code)
		}
	}
	if err := sender.writeFrame(0x2, []byte(`{"message":"binary"}`)); err != nil {
		t.Fatal(err)
	}
	if f := sender.next(); f["status"] != false || f["code"] != "invalid_message" {
		t.Fatalf("binary frame: ack %v", f)
	}
	// 300 code points are fine however many bytes they take.
	emoji := strings.Repeat("😀", 300)
	sender.sendMessage(emoji)
	if f := sender.next(); f["status"] != true {
		t.Fatalf("300 emoji: ack %v", f)
	}
	if f := watcher.next(); f["message"] != emoji {
		t.Fatalf("watcher's first message is %.60v, want the emoji: refused messages leaked", f)
	}
}

func TestEveryReceiverSeesTheSameOrder(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	const senders, each = 3, 200
	var senderConns []*wsConn
	var receivers []*wsConn
	for i := range senders {
		senderConns = append(senderConns, s.connect(t, s.user(t, fmt.Sprintf("sender%d", i))))
	}
	for i := range 2 {
		receivers = append(receivers, s.connect(t, s.user(t, fmt.Sprintf("receiver%d", i))))
	}
	// Each receiver must see the other's join first so it is in the room.
	receivers[0].nextWhere(isEvent("join", "receiver1"))
	var wg sync.WaitGroup
	for i, ws := range senderConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range each {
				if err := ws.writeFrame(opText, mustJSON(map[string]string{"message": fmt.Sprintf("%d-%d", i, j)})); err != nil {
					t.Error(err)
					return
				}
			}
		}()
		// Drain acks and others' messages so senders never stall.
		go func() {
			for {
				if _, _, err := ws.readFrame(30 * time.Second); err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	var orders [2][]string
	for r, ws := range receivers {
		for len(orders[r]) < senders*each {
			f := ws.next()
			if isChat(f) {
				orders[r] = append(orders[r], f["message"].(string))
			}
		}
	}
	for k := range orders[0] {
		if orders[0][k] != orders[1][k] {
			t.Fatalf("receivers differ at %d: %s vs %s", k, orders[0][k], orders[1][k])
		}
	}
	// Each sender's own messages keep their order.
	next := make([]int, senders)
	for _, m := range orders[0] {
		var i, j int
		fmt.Sscanf(m, "%d-%d", &i, &j)
		if j != next[i] {
			t.Fatalf("sender %d: got message %d, want %d", i, j, next[i])
		}
		next[i]++
	}
}

func TestBurstReachesEveryReadingClient(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	const n = 2000 // about 700 KB: more than the socket buffers hold
	sender := s.connect(t, s.user(t, "Burst"))
	var readers []*wsConn
	for i := range 3 {
		readers = append(readers, s.connect(t, s.user(t, fmt.Sprintf("reader%d", i))))
	}
	sender.nextWhere(isEvent("join", "reader2"))
	text := strings.Repeat("m", 300)
	go func() {
		for range n {
			if err := sender.writeFrame(opText, mustJSON(map[string]string{"message": text})); err != nil {
				return
			}
		}
	}()
	acks := make(chan int, 1)
	go func() {
		count := 0
		for count < n {
			op, p, err := sender.readFrame(30 * time.Second)
			if err != nil {
				break
			}
			if op == opText && strings.Contains(string(p), `"status":true`) {
				count++
			}
		}
		acks <- count
	}()
	var wg sync.WaitGroup
	for _, r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, lastID := 0, 0.0
			for got < n {
				op, p, err := r.readFrame(30 * time.Second)
				if err != nil {
					t.Errorf("reader stopped after %d of %d messages: %v", got, n, err)
					return
				}
				if op != opText || !strings.Contains(string(p), `"message"`) {
					continue
				}
				f := map[string]any{}
				if err := json.Unmarshal(p, &f); err != nil || f["message"] != text {
					t.Errorf("bad frame %q", p)
					return
				}
				if id := f["id"].(float64); id <= lastID {
					t.Errorf("id %v after %v", id, lastID)
				} else {
					lastID = id
				}
				got++
			}
		}()
	}
	wg.Wait()
	if got := <-acks; got != n {
		t.Fatalf("sender got %d acks, want %d", got, n)
	}
}

func TestStalledReaderDoesNotDelayOthersAndIsDropped(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	stalled := s.connect(t, s.user(t, "Stalled"), dialOpts{readBuf: 4096})
	reader := s.connect(t, s.user(t, "Reader"))
	sender := s.connect(t, s.user(t, "Sender"))
	reader.nextWhere(isEvent("join", "Sender"))
	go func() {
		for {
			if _, _, err := sender.readFrame(time.Minute); err != nil {
				return
			}
		}
	}()
	text := strings.Repeat("s", 300)
	const n = 800 // about 250 KB: far more than the socket buffers hold
	go func() {
		for range n {
			if sender.writeFrame(opText, mustJSON(map[string]string{"message": text})) != nil {
				return
			}
		}
	}()
	left := make(chan struct{})
	all := make(chan int, 1)
	go func() {
		got, sawLeave := 0, false
		for got < n || !sawLeave {
			op, p, err := reader.readFrame(30 * time.Second)
			if err != nil {
				break
			}
			switch {
			case op == opText && strings.Contains(string(p), `"message"`):
				got++
			case op == opText && strings.Contains(string(p), `"leave"`) && strings.Contains(string(p), `"Stalled"`):
				sawLeave = true
				close(left)
			}
		}
		all <- got
	}()
	// Once the server gives up on its write (whenever the machine gets
	// there), the stalled client reads at last: it finds the messages that
	// fitted in the buffers, then the close frame.
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(s.metrics(t), `gochat_clients_dropped_total{reason="stalled"} 1`); {
		if time.Now().After(deadline) {
			t.Fatal("the stalled client was never dropped as stalled")
		}
	}
	if code := stalled.expectClose(20 * time.Second); code != closePolicyViolation {
		t.Fatalf("stalled client closed with %d, want %d", code, closePolicyViolation)
	}
	select {
	case <-left:
	case <-time.After(30 * time.Second):
		t.Fatal("no leave event for the stalled client")
	}
	if got := <-all; got != n {
		t.Fatalf("reader got %d of %d messages", got, n)
	}
	if got := s.online(t, s.user(t, "Observer")); got != "[Reader Sender]" {
		t.Fatalf("online after the drop: %s", got)
	}
}

// pacedReader is a slow link: at most chunk bytes every pause.
type pacedReader struct {
	r     io.Reader
	chunk int
	pause time.Duration
}

func (p *pacedReader) Read(b []byte) (int, error) {
	time.Sleep(p.pause) // the link's pace, not a wait for an event
	return p.r.Read(b[:min(len(b), p.chunk)])
}

// A phone on a slow link that reads steadily needs far longer than
// -write-timeout for a long replay: it gets all of it and stays in the room,
// as the stall timeout counts time without progress.
func TestSlowButSteadyReaderGetsItsWholeReplay(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-write-timeout", "500ms", "-replay-max", "1000")
	writer := s.connect(t, s.user(t, "Writer"))
	const n = 1000
	var burst []byte
	for i := range n { // about 1 MB: 300 three-byte characters each
		burst = append(burst, maskedFrame(opText, mustJSON(map[string]string{"message": fmt.Sprint(i, strings.Repeat("€", 290))}))...)
	}
	writer.c.Write(burst)
	writer.countAcks(n)
	phone := s.connect(t, s.user(t, "Phone"), dialOpts{readBuf: 4096, query: "?since=0"})
	phone.br = bufio.NewReaderSize(&pacedReader{phone.br, 4 << 10, 10 * time.Millisecond}, 4<<10) // ~400 KB/s: 2.5 s
	for i := range n {
		if f := phone.next(); f["history"] != true || !strings.HasPrefix(f["message"].(string), fmt.Sprint(i, "€")) {
			t.Fatalf("replay frame %d: %.40v", i, f)
		}
	}
	sendAndAck(t, writer, "live")
	if f := phone.nextWhere(isChat); f["message"] != "live" {
		t.Fatalf("after the replay: %v", f)
	}
	if m := s.metrics(t); !strings.Contains(m, `gochat_clients_dropped_total{reason="stalled"} 0`) {
		t.Fatal("the steady reader was dropped as stalled")
	}
}

// metrics returns the text of /metrics.
func (s *testServer) metrics(t *testing.T) string {
	resp, err := cmp.Or(s.client, http.DefaultClient).Get(s.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func TestCloseThenReconnectAtOnce(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Rita")
	for range 30 {
		ws := s.connect(t, cookie)
		ws.close()
	}
}

func TestOversizedFrameClosesWith1009(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Sam")
	big := s.connect(t, cookie)
	other := s.connect(t, s.user(t, "Tess"))
	// Exactly 64 KiB is allowed (and refused as a message, being too long).
	big.sendText(fmt.Sprintf(`{"message":%q}`, strings.Repeat("a", maxFrameBytes-14)))
	if f := big.nextWhere(func(f map[string]any) bool { _, ok := f["status"]; return ok }); f["code"] != "message_too_long" {
		t.Fatalf("64 KiB frame: %v", f)
	}
	go big.writeFrame(opText, []byte(strings.Repeat("a", maxFrameBytes+1)))
	if code := big.expectClose(10 * time.Second); code != closeTooBig {
		t.Fatalf("close code %d, want %d", code, closeTooBig)
	}
	other.nextWhere(isEvent("leave", "Sam"))
	s.request(t, "GET", "/healthz", "", nil).expect(t, 200)
	again := s.connect(t, cookie)
	again.sendMessage("still here")
	if f := other.nextWhere(isChat); f["message"] != "still here" {
		t.Fatalf("after reconnect: %v", f)
	}
}

func TestShutdownClosesSocketsWithGoingAway(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	a := s.connect(t, s.user(t, "Uma"))
	b := s.connect(t, s.user(t, "Vic"))
	a.nextWhere(isEvent("join", "Vic"))
	type ending struct {
		sawLeave bool
		code     int
	}
	endings := make(chan ending, 2)
	for ws, other := range map[*wsConn]string{a: "Vic", b: "Uma"} {
		go func() {
			var e ending
			for {
				op, p, err := ws.readFrame(10 * time.Second)
				if err != nil {
					endings <- e
					return
				}
				if op == opText && strings.Contains(string(p), `"leave"`) && strings.Contains(string(p), other) {
					e.sawLeave = true
				}
				if op == opClose {
					e.code = closeCodeOf(p)
					ws.writeFrame(opClose, p)
					endings <- e
					return
				}
			}
		}()
	}
	if err := s.stop(); err != nil {
		t.Fatalf("serve returned %v", err)
	}
	for range 2 {
		if e := <-endings; e.code != closeGoingAway || !e.sawLeave {
			t.Fatalf("close code %d (want %d), saw the other's leave first: %v", e.code, closeGoingAway, e.sawLeave)
		}
	}
	if _, err := net.DialTimeout("tcp", s.addr, time.Second); err == nil {
		t.Fatal("still accepting connections after shutdown")
	}
}

func TestPingsAreSentAndSilentPeersDropped(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-ping-interval", "500ms")
	// Users first: the watcher answers pings only while it reads.
	watcherCookie, silentCookie := s.user(t, "Watcher"), s.user(t, "Silent")
	watcher, silent := s.connect(t, watcherCookie), s.connect(t, silentCookie)
	watcher.nextWhere(isEvent("join", "Silent"))
	op, _, err := silent.readFrame(5 * time.Second)
	if err != nil || op != opPing {
		t.Fatalf("first frame op %d err %v, want a ping", op, err)
	}
	// Silent never answers: it is announced as gone within two intervals
	// or so, while the watcher, answering pings in next(), stays.
	start := time.Now()
	watcher.nextWhere(isEvent("leave", "Silent"))
	if waited := time.Since(start); waited > 5*time.Second {
		t.Fatalf("silent peer noticed after %v", waited)
	}
	watcher.sendMessage("still connected")
	if f := watcher.nextWhere(func(f map[string]any) bool { _, ok := f["status"]; return ok }); f["status"] != true {
		t.Fatalf("watcher after the drop: %v", f)
	}
}

func TestLibraryClientInteroperates(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Lib")
	peer := s.connect(t, s.user(t, "Peer"))
	cfg, err := websocket.NewConfig("ws://"+s.addr+"/ws", "http://"+s.addr)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Header.Set("Cookie", cookie.Name+"="+cookie.Value)
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	peer.nextWhere(isEvent("join", "Lib"))
	if err := websocket.JSON.Send(ws, map[string]string{"message": "via x/net"}); err != nil {
		t.Fatal(err)
	}
	var ack map[string]any
	ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := websocket.JSON.Receive(ws, &ack); err != nil || ack["status"] != true {
		t.Fatalf("ack %v, err %v", ack, err)
	}
	if f := peer.nextWhere(isChat); f["message"] != "via x/net" || f["author"] != "Lib" {
		t.Fatalf("peer got %v", f)
	}
}

// countFrames reads server frames from r and calls done after every
// perRound frames whose payload is longer than size bytes, until r fails.
func countFrames(r io.Reader, size, perRound int, done func()) {
	br := bufio.NewReader(r)
	n := 0
	for {
		hdr := make([]byte, 2)
		if _, err := io.ReadFull(br, hdr); err != nil {
			return
		}
		length := int(hdr[1] & 0x7F)
		if length == 126 {
			io.ReadFull(br, hdr)
			length = int(binary.BigEndian.Uint16(hdr))
		}
		if _, err := br.Discard(length); err != nil {
			return
		}
		if length > size {
			if n++; n%perRound == 0 {
				done()
			}
		}
	}
}

// BenchmarkBroadcast is the delivery path from the hub on: the hub stores
// each round's messages in one commit and queues each for 200 clients,
// whose write pumps write to real loopback sockets whose peers count what
// arrives. With several messages in flight, as when the room is busy, they
// share a commit and a pump sends them in one write. Compare ns/delivery
// across the sub-benchmarks of one run.
func BenchmarkBroadcast(b *testing.B) {
	text := strings.Repeat("x", 300)
	for _, perRound := range []int{1, 16} {
		b.Run(fmt.Sprintf("%dmsgs-in-flight", perRound), func(b *testing.B) {
			const clients = 200
			ctx := context.Background()
			cfg, err := parseConfig([]string{"-db", filepath.Join(b.TempDir(), "chat.db"), "-history", "0", "-msg-rate", "0"}, io.Discard)
			if err != nil {
				b.Fatal(err)
			}
			store, err := OpenStore(cfg.DB, &Metrics{})
			if err != nil {
				b.Fatal(err)
			}
			defer store.Close()
			sessions, err := NewSessions(ctx, cfg.SessionTTL, cfg.now, store)
			if err != nil {
				b.Fatal(err)
			}
			h, err := NewHub(ctx, cfg, store, sessions, &Metrics{}, slog.New(slog.DiscardHandler))
			if err != nil {
				b.Fatal(err)
			}
			defer h.Shutdown(ctx, closeGoingAway)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			join := func(name string) (*client, net.Conn) {
				sid, err := sessions.Create(ctx, name)
				peer, err2 := net.Dial("tcp", ln.Addr().String())
				nc, err3 := ln.Accept()
				c := newClient(name, sid)
				r := reserve{c, false, make(chan error, 1)}
				if err := errors.Join(err, err2, err3, h.ask(r, r.result)); err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { nc.Close(); peer.Close() })
				h.send(joined{c, -1})
				go func() { // as runSocket does, so that Shutdown does not wait for it forever
					defer h.sockets.Done()
					c.writePump(&socketConn{Conn: nc, silence: time.Hour, stall: time.Hour}, h, time.Hour)
				}()
				return c, peer
			}
			var round sync.WaitGroup
			for i := range clients {
				_, peer := join(fmt.Sprintf("user%d", i))
				go countFrames(peer, len(text), perRound, round.Done)
			}
			sender, peer := join("sender")
			go io.Copy(io.Discard, peer)
			b.ReportAllocs()
			b.ResetTimer()
			for range (b.N + perRound - 1) / perRound {
				round.Add(clients)
				for range perRound {
					h.send(&chatMessage{from: sender, text: text})
				}
				round.Wait()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/clients, "ns/delivery")
		})
	}
}

func TestGoroutinesReturnToIdleAfterClientsLeave(t *testing.T) {
	s := startServer(t)
	cookies := make([]*http.Cookie, 40)
	for i := range cookies {
		cookies[i] = s.user(t, fmt.Sprintf("flat%d", i))
	}
	http.DefaultClient.CloseIdleConnections()
	idle := runtime.NumGoroutine()
	var conns []*wsConn
	for _, c := range cookies {
		conns = append(conns, s.connect(t, c))
	}
	for i, ws := range conns[:10] {
		sendAndAck(t, ws, fmt.Sprintf("hello %d", i))
	}
	for _, ws := range conns {
		ws.close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > idle {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before the clients came:\n%s", runtime.NumGoroutine(), idle, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestAcksLeaveInFrameOrder(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	ws := s.connect(t, s.user(t, "Orderly"))
	tooLong := fmt.Sprintf(`{"message":%q}`, strings.Repeat("x", maxMessageRunes+1))
	frames := []struct {
		op      byte
		payload string
		ack     string
	}{
		{opText, `{"message":"first"}`, "true"},
		{opText, tooLong, "message_too_long"},
		{0x2, `{"message":"binary"}`, "invalid_message"},
		{opText, `{"message":"last"}`, "true"},
	}
	// Then a longer burst, which the store goroutine commits in batches
	// while the reader is still reading it.
	for i := range 60 {
		frames = append(frames, frames[i%2*3], frames[1])
	}
	var burst bytes.Buffer
	for _, f := range frames {
		burst.Write(maskedFrame(f.op, []byte(f.payload)))
	}
	if _, err := ws.c.Write(burst.Bytes()); err != nil { // one write: all arrive together
		t.Fatal(err)
	}
	lastID := 0.0
	for i, f := range frames {
		ack := ws.next()
		got := fmt.Sprint(ack["status"])
		if ack["status"] == false {
			got = fmt.Sprint(ack["code"])
		}
		if got != f.ack {
			t.Fatalf("ack %d is %v, want %s", i, ack, f.ack)
		}
		if id, _ := ack["id"].(float64); got == "true" && id <= lastID {
			t.Fatalf("ack %d has id %v after id %v", i, id, lastID)
		} else if got == "true" {
			lastID = id
		}
	}
}

// A client that sends a message and closes at once has stored its message
// while its close was read: the others see the message before the leave.
func TestLastMessageComesBeforeTheLeave(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	reader := s.connect(t, s.user(t, "Stayer"))
	goer := s.connect(t, s.user(t, "Goer"))
	reader.nextWhere(isEvent("join", "Goer"))
	var burst bytes.Buffer
	burst.Write(maskedFrame(opText, []byte(`{"message":"bye"}`)))
	burst.Write(maskedFrame(opClose, binary.BigEndian.AppendUint16(nil, closeNormal)))
	if _, err := goer.c.Write(burst.Bytes()); err != nil { // one write: the close is read at once
		t.Fatal(err)
	}
	if f := reader.next(); f["message"] != "bye" {
		t.Fatalf("got %v before the message, want the message and then the leave", f)
	}
	reader.nextWhere(isEvent("leave", "Goer"))
}

func TestPingFloodingNonReaderDelaysNoOne(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	flooder := s.connect(t, s.user(t, "Flooder"))
	reader := s.connect(t, s.user(t, "Reader"))
	sender := s.connect(t, s.user(t, "Sender"))
	reader.nextWhere(isEvent("join", "Sender"))
	visitors := make([]*http.Cookie, 20) // logged in first: a login waits for the disk
	for i := range visitors {
		visitors[i] = s.user(t, fmt.Sprint("Visitor", i))
	}
	// The flooder never reads and pings as fast as it can: the server's
	// pongs to it soon block on a full socket.
	go func() {
		ping := maskedFrame(opPing, bytes.Repeat([]byte("p"), 125))
		for {
			if _, err := flooder.c.Write(ping); err != nil {
				return
			}
		}
	}()
	// Meanwhile everyone else is served at once: each message arrives, and
	// /api/online answers, long before the stalled flooder is
	// dropped after the write timeout (5 s).
	var delays []time.Duration
	for i := range 20 {
		start := time.Now()
		sender.sendMessage(fmt.Sprint("m", i))
		if f := reader.next(); f["message"] != fmt.Sprint("m", i) {
			t.Fatalf("reader got %v before message %d: the flooder was dropped already, or the hub stalled", f, i)
		}
		delays = append(delays, time.Since(start))
		s.request(t, "GET", "/api/online", "", visitors[i]).expect(t, 200)
	}
	slices.Sort(delays)
	t.Logf("delivery while the flooder stalls: p50 %v, p90 %v", delays[10], delays[18])
	reader.nextWhere(isEvent("leave", "Flooder"))
}

// What the server can see of a broken WebSocket stream closes the socket
// with the code RFC 6455 gives it; the user can come straight back.
func TestProtocolErrorsCloseTheSocket(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Sloppy")
	watcher := s.connect(t, s.user(t, "Watcher"))
	for _, c := range []struct {
		name    string
		opcode  byte
		payload []byte
		code    int
	}{
		{"invalid UTF-8 in a text frame", opText, []byte("{\"message\":\"\xff\xfe\"}"), closeInvalidData},
		{"reserved data opcode", 0x3, []byte(`{"message":"x"}`), closeProtocolError},
		{"reserved control opcode", 0xB, nil, closeProtocolError},
		{"continuation of nothing", 0x0, []byte(`{"message":"x"}`), closeProtocolError},
	} {
		ws := s.connect(t, cookie)
		watcher.nextWhere(isEvent("join", "Sloppy"))
		ws.writeFrame(c.opcode, c.payload)
		if code := ws.expectClose(5 * time.Second); code != c.code {
			t.Fatalf("%s: close code %d, want %d", c.name, code, c.code)
		}
		watcher.nextWhere(isEvent("leave", "Sloppy"))
	}
	sendAndAck(t, s.connect(t, cookie), "still welcome")
}

// A phone that loses its network holds the user's one socket without a
// word. When the user comes back on another connection, the 409 probes the
// old socket, and a peer that does not answer is gone within seconds, not
// two ping intervals (a minute here).
func TestConflictProbesAVanishedSocket(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Commuter")
	watcher := s.connect(t, s.user(t, "Watcher"))
	s.connect(t, cookie) // then never reads or answers again
	watcher.nextWhere(isEvent("join", "Commuter"))
	if ws, r := s.dialWS(t, cookie, dialOpts{}); ws != nil || r.status != 409 {
		t.Fatalf("second socket: %d, want 409", r.status)
	}
	watcher.nextWhere(isEvent("leave", "Commuter"))
	sendAndAck(t, s.connect(t, cookie), "back")
}

// sendBurst writes n chat frames in one write, so that the hub takes many
// of them in one step.
func (w *wsConn) sendBurst(prefix string, n int) {
	var burst []byte
	for i := range n {
		burst = append(burst, maskedFrame(opText, mustJSON(map[string]string{"message": fmt.Sprint(prefix, i)}))...)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.c.Write(burst)
}

// crowd fills the room with n users who never read, so that each message
// takes the hub longer and a race has more room to show.
func (s *testServer) crowd(t *testing.T, n int) {
	for i := range n {
		s.connect(t, s.user(t, fmt.Sprint("crowd", i)))
	}
}

// countAcks reads frames until it has seen n acks, and returns their ids.
func (w *wsConn) countAcks(n int) []int64 {
	var ids []int64
	for len(ids) < n {
		if f := w.next(); f["status"] == true {
			ids = append(ids, idOf(f))
		}
	}
	return ids
}

// A moderator deleting each message the moment it can read it: no
// message reaches anyone after its delete event, and none is replayed.
func TestDeletedMessagesAreNeverDeliveredAfterTheirDeleteNorReplayed(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-admins", "Boss", "-replay-max", "5000")
	s.crowd(t, 30)
	boss := s.user(t, "Boss")
	watcher := s.connect(t, boss)
	sender := s.connect(t, s.user(t, "Sender"))
	watcher.nextWhere(isEvent("join", "Sender"))

	deleted := map[int64]bool{}
	stop := make(chan struct{})
	moderated := make(chan struct{})
	go func() {
		defer close(moderated)
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := http.NewRequest("GET", s.url+"/api/messages?limit=1", nil)
			r.AddCookie(boss)
			resp, err := http.DefaultClient.Do(r)
			if err != nil {
				return // the test failed and stopped the server
			}
			var page struct{ Messages []struct{ ID int64 } }
			json.NewDecoder(resp.Body).Decode(&page)
			resp.Body.Close()
			if len(page.Messages) == 1 && !deleted[page.Messages[0].ID] {
				deleted[page.Messages[0].ID] = true
				r, _ = http.NewRequest("DELETE", fmt.Sprint(s.url, "/api/messages/", page.Messages[0].ID), nil)
				r.Header.Set("Content-Type", "application/json")
				r.AddCookie(boss)
				if resp, err := http.DefaultClient.Do(r); err == nil {
					resp.Body.Close()
				}
			}
		}
	}()
	const rounds, perRound = 8, 300
	go func() {
		for i := range rounds {
			sender.sendBurst(fmt.Sprint("r", i, "-"), perRound)
		}
	}()
	gone := map[int64]bool{}
	for got := 0; got < rounds*perRound; {
		f := watcher.next()
		switch {
		case f["event"] == "delete":
			gone[idOf(f)] = true
		case isChat(f) && gone[idOf(f)]:
			t.Fatalf("message %d delivered after its delete event", idOf(f))
		case isChat(f):
			got++
		}
	}
	close(stop)
	<-moderated
	sender.countAcks(rounds * perRound)
	if len(deleted) == 0 {
		t.Fatal("the moderator deleted nothing")
	}
	replay := s.connect(t, s.user(t, "Replayed"), dialOpts{query: "?since=0"})
	sendAndAck(t, sender, "the end")
	for f := replay.next(); f["message"] != "the end"; f = replay.next() {
		if isChat(f) && deleted[idOf(f)] {
			t.Fatalf("deleted message %d replayed", idOf(f))
		}
	}
}

// Retention cutting the room to its newest messages while a storm goes on:
// a replay never holds an id retention deleted, so what follows the gap
// has no hole.
func TestRetentionDuringAStormNeverReplaysWhatItDeleted(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history-max", "50", "-replay-max", "5000")
	s.crowd(t, 10)
	cookie := s.user(t, "Replayer")
	stop := make(chan struct{})
	var senders sync.WaitGroup
	for i := range 2 {
		sender := s.connect(t, s.user(t, fmt.Sprint("Stormy", i)))
		senders.Add(1)
		go func() {
			defer senders.Done()
			for round := 0; ; round++ {
				select {
				case <-stop:
					return
				default:
				}
				sender.sendBurst(fmt.Sprint("r", round, "-"), 200)
				sender.countAcks(200)
			}
		}()
	}
	defer func() { close(stop); senders.Wait() }()
	for range 6 {
		// Each round replaces the last one's socket: no close handshake to
		// wait out behind thousands of queued frames.
		ws := s.connect(t, cookie, dialOpts{query: "?since=0&takeover=1"})
		next := int64(0)
		for seen := 0; seen < 100; {
			f := ws.next()
			if !isChat(f) {
				continue
			}
			if id := idOf(f); next != 0 && id != next {
				t.Fatalf("replay went from %d to %d: retention's ids came back", next-1, id)
			}
			next, seen = idOf(f)+1, seen+1
		}
		ws.c.Close()
	}
}

// Refused upgrades are refused before anything happens: a JSON error, and
// no join or leave for anyone.
func TestRefusedUpgradeIsNeverHeardOf(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	watcher := s.connect(t, s.user(t, "Watcher"))
	cookie := s.user(t, "Refused")
	r := s.request(t, "HEAD", "/ws", "", cookie, "Upgrade", "websocket", "Connection", "Upgrade",
		"Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version", "13")
	if r.status != 405 || r.header.Get("Content-Type") != "application/json" || r.header.Get("Allow") != "GET" {
		t.Fatalf("HEAD /ws: %d %v", r.status, r.header)
	}
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: [\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: session=%s\r\n\r\n", cookie.Value)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	var body map[string]string
	if json.NewDecoder(resp.Body).Decode(&body); resp.StatusCode != 400 || body["error"] == "" {
		t.Fatalf("Host: [ got %d %v", resp.StatusCode, body)
	}
	other := s.connect(t, s.user(t, "Other"))
	if f := watcher.nextWhere(func(f map[string]any) bool { return f["event"] != nil }); !isEvent("join", "Other")(f) {
		t.Fatalf("the room heard %v of a refused upgrade", f)
	}
	other.close()
	s.connect(t, cookie).close() // its slot is free
}

// A user retrying every fraction of a second while their old socket is
// silent gets in once the first 409's probe runs out; later 409s do not
// push it back.
func TestRetriedConflictsDoNotExtendTheProbe(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Retrier")
	s.connect(t, cookie) // then never reads or answers again
	deadline := time.Now().Add(3 * probeTimeout)
	for {
		ws, r := s.dialWS(t, cookie, dialOpts{})
		if ws != nil {
			ws.close()
			return
		}
		if r.status != 409 || time.Now().After(deadline) {
			t.Fatalf("retry: %d, still refused after %v", r.status, 3*probeTimeout)
		}
		time.Sleep(probeTimeout / 10) // the retry rhythm, not a wait for the server
	}
}

// {"typing": true} reaches the others as a typing event, at most once per
// user per typingEvery, is never stored or acked, and does not count
// against the message rate limit; acks keep frame order around it.
func TestTypingReachesTheOthersAtMostEveryTwoSeconds(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-msg-rate", "0.001", "-msg-burst", "2")
	typist := s.connect(t, s.user(t, "Typist"))
	watcher := s.connect(t, s.user(t, "Watcher"))
	typist.nextWhere(isEvent("join", "Watcher"))
	typist.sendText(`{"typing":true}`)
	typist.sendText(`{"typing":true}`) // within typingEvery: dropped
	typist.sendMessage("one")
	typist.sendText(`{"typing":false}`)
	typist.sendText(`{"typing":true,"x":1}`)
	typist.sendMessage("two")
	for _, want := range []string{"true", "invalid_message", "invalid_message", "true"} {
		f := typist.next()
		if got := fmt.Sprint(f["status"]); f["code"] != nil {
			got = f["code"].(string)
			if got != want {
				t.Fatalf("ack %v, want %s", f, want)
			}
		} else if got != want {
			t.Fatalf("ack %v, want %s", f, want)
		}
	}
	if f := watcher.next(); !isEvent("typing", "Typist")(f) {
		t.Fatalf("watcher got %v, want typing", f)
	}
	if f := watcher.next(); f["message"] != "one" {
		t.Fatalf("watcher got %v, want the first message (one typing event only)", f)
	}
	watcher.nextWhere(func(f map[string]any) bool { return f["message"] == "two" })
	s.clock.Advance(typingEvery)
	typist.sendText(`{"typing":true}`)
	if f := watcher.next(); !isEvent("typing", "Typist")(f) {
		t.Fatalf("watcher got %v after typingEvery, want typing", f)
	}
	watcher.sendText(`{"typing":true}`)
	if f := typist.next(); !isEvent("typing", "Watcher")(f) {
		t.Fatalf("typist got %v, want typing", f)
	}
}

// ?takeover=1 closes the user's other socket with 4000 and takes its slot
// in the same step: of racing takeovers exactly one socket is left, and a
// plain connect still gets 409.
func TestTakeoverReplacesTheOtherSocket(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Roamer")
	watcher := s.connect(t, s.user(t, "Watcher"))
	laptop := s.connect(t, cookie)
	watcher.nextWhere(isEvent("join", "Roamer"))
	if ws, r := s.dialWS(t, cookie, dialOpts{}); ws != nil || r.status != 409 {
		t.Fatalf("plain second socket: %d, want 409", r.status)
	}
	phones := make(chan *wsConn, 4)
	for range cap(phones) {
		go func() {
			ws, _ := s.dialWS(t, cookie, dialOpts{query: "?takeover=1"})
			phones <- ws
		}()
	}
	if code := laptop.expectClose(10 * time.Second); code != closeReplaced {
		t.Fatalf("replaced socket closed with %d, want %d", code, closeReplaced)
	}
	var open []*wsConn
	for range cap(phones) {
		if ws := <-phones; ws != nil {
			open = append(open, ws)
		}
	}
	// Each takeover replaced the one before: only the last is still open.
	alive := 0
	for _, ws := range open {
		ws.writeFrame(opText, []byte(`{"message":"still here?"}`))
		for {
			op, p, err := ws.readFrame(10 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if op == opClose {
				if code := closeCodeOf(p); code != closeReplaced {
					t.Fatalf("a takeover's socket closed with %d", code)
				}
				break
			}
			if op == opText && strings.Contains(string(p), `"status":true`) {
				alive++
				break
			}
		}
	}
	if alive != 1 {
		t.Fatalf("%d sockets of one user alive after %d racing takeovers", alive, len(open))
	}
	if got := s.online(t, cookie); got != "[Roamer Watcher]" {
		t.Fatalf("online: %s", got)
	}
}

// A takeover whose session ended before the hub took it up (its own
// logout, a ban) closes nothing: the other device keeps its socket.
func TestTakeoverOfAnEndedSessionClosesNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store, err := OpenStore(filepath.Join(t.TempDir(), "chat.db"), &Metrics{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	sessions, err := NewSessions(ctx, time.Hour, time.Now, store)
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := parseConfig(nil, io.Discard)
	hub, err := NewHub(ctx, cfg, store, sessions, &Metrics{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	gone, cancel := context.WithCancel(ctx)
	cancel()
	defer hub.Shutdown(gone, closeGoingAway) // no socket to wait for
	laptopSession, _ := sessions.Create(ctx, "Roamer")
	phoneSession, _ := sessions.Create(ctx, "Roamer")
	laptop := newClient("Roamer", laptopSession)
	reserveSlot := func(c *client, takeover bool) error {
		slot := reserve{c, takeover, make(chan error, 1)}
		return hub.ask(slot, slot.result)
	}
	if err := reserveSlot(laptop, false); err != nil {
		t.Fatal(err)
	}
	sessions.Delete(ctx, phoneSession) // the phone logged out while its takeover waited
	if err := reserveSlot(newClient("Roamer", phoneSession), true); err != errExpired {
		t.Fatalf("takeover of an ended session: %v, want %v", err, errExpired)
	}
	if _, code, _ := laptop.take(); code != 0 {
		t.Fatalf("the laptop's socket was closed with %d", code)
	}
}

// A since beyond the newest stored id comes from before a restore: the
// client gets a gap and the newest history, not silence.
func TestSinceBeyondTheNewestIsAGap(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Restorer")
	writer := s.connect(t, s.user(t, "Writer"))
	last := sendAndAck(t, writer, "the newest")
	ws := s.connect(t, cookie, dialOpts{query: fmt.Sprintf("?since=%d", last+100)})
	if f := ws.next(); f["event"] != "gap" {
		t.Fatalf("first frame %v, want a gap", f)
	}
	if f := ws.next(); f["message"] != "the newest" || f["history"] != true {
		t.Fatalf("after the gap %v, want the newest history", f)
	}
}
