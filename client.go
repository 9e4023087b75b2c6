package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/websocket"
)

const (
	maxFrameBytes = 64 << 10 // a larger incoming frame closes the socket with 1009
	// maxQueueBytes bounds what waits for one client: a burst of thousands
	// of messages fits; a client that stopped reading while others talk
	// reaches it and is dropped.
	maxQueueBytes = 4 << 20
	writeTimeout  = 5 * time.Second // a write blocked this long means a stalled client
	closeGrace    = 2 * time.Second // how long a closed socket waits for the peer's answer
	probeTimeout  = 5 * time.Second // how long a probed peer has to answer a ping
)

// client is one user's WebSocket: a queue the hub fills and the write pump
// drains. The hub never writes to the socket itself, so a slow peer can
// only ever delay its own frames.
type client struct {
	user    string
	key     string // user in lower case: names are unique in any case
	session string

	mu     sync.Mutex
	queue  [][]byte      // frames waiting for the write pump; shared, never changed
	queued int           // bytes in queue
	code   int           // once non-zero, the hub let go: send this close code last
	probe  bool          // someone else wants this user's slot: is the peer still there?
	wake   chan struct{} // tells the write pump there is something to do
}

func newClient(user, session string) *client {
	return &client{user: user, key: strings.ToLower(user), session: session, wake: make(chan struct{}, 1)}
}

// enqueue queues frame for the write pump. It reports false when the queue
// is full. Frames for a closing client are dropped.
func (c *client) enqueue(frame []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.code != 0 {
		return true
	}
	if c.queued+len(frame) > maxQueueBytes {
		return false
	}
	c.queue = append(c.queue, frame)
	c.queued += len(frame)
	c.signal()
	return true
}

// close makes the write pump send what is queued and then a close frame
// with code; a dropped client's backlog is discarded instead.
func (c *client) close(code int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.code = code
	if code == closePolicyViolation {
		c.queue, c.queued = nil, 0
	}
	c.signal()
}

func (c *client) signal() {
	select {
	case c.wake <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// startProbe makes the write pump ping now and give the peer probeTimeout
// to answer. A phone that lost its network holds its user's one slot until
// its silence is noticed; when the user comes back on another connection,
// that should take seconds, not two ping intervals.
func (c *client) startProbe() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.probe = true
	c.signal()
}

// take empties the queue, returning its frames, the close code and whether
// to probe.
func (c *client) take() ([][]byte, int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	frames, probe := c.queue, c.probe
	c.queue, c.queued, c.probe = nil, 0, false
	return frames, c.code, probe
}

// writePump writes everything queued in one write, pings every interval,
// and ends after the close frame or a failed write.
func (c *client) writePump(conn *socketConn, chat *chat, ping time.Duration) {
	ticker := time.NewTicker(ping)
	defer ticker.Stop()
	var buf []byte
	for {
		buf = buf[:0]
		select {
		case <-c.wake:
		case <-ticker.C:
			buf = append(buf, pingFrame...)
		}
		frames, code, probe := c.take()
		if probe {
			buf = append(buf, pingFrame...)
			conn.SetReadDeadline(time.Now().Add(probeTimeout)) // the pong moves it back
		}
		for _, f := range frames {
			buf = append(buf, f...)
		}
		if code != 0 {
			buf = append(buf, closeFrame(code)...)
		}
		n, err := conn.Write(buf)
		if isTimeout(err) {
			// Stalled: the others hear it left now; it gets the rest and a
			// close frame if it starts reading within another timeout.
			chat.hub.Unregister(c, closePolicyViolation)
			chat.metrics.Add(`gochat_clients_dropped_total{reason="stalled"}`, 1)
			if code == 0 {
				code, buf = closePolicyViolation, append(buf, closeFrame(closePolicyViolation)...)
			}
			_, err = conn.Write(buf[n:])
		}
		switch {
		case err != nil:
			conn.Close()
			return
		case code != 0:
			conn.finish()
			return
		case cap(buf) > 1<<10:
			buf = nil // a burst's buffer (the history, say) is not kept by an idle client
		}
	}
}

// readPump reads frames until the socket ends and handles each to the end
// before reading the next, so acks leave in the order frames came. It
// returns the code to close the socket with.
func (c *client) readPump(ws *websocket.Conn, handle func(*client, inFrame)) int {
	for {
		var f inFrame
		err := inCodec.Receive(ws, &f)
		switch {
		case errors.Is(err, websocket.ErrFrameTooLarge):
			return closeTooBig
		case isTimeout(err):
			return closePolicyViolation // silent for two ping intervals
		case err != nil:
			return closeNormal // the peer's close frame, or the connection ended
		case closeCodeFor(f) != 0:
			return closeCodeFor(f)
		}
		c.mu.Lock()
		closing := c.code != 0
		c.mu.Unlock()
		if !closing {
			handle(c, f)
		}
	}
}

// handleWebSocket checks, as plain HTTP with JSON errors, everything that
// can refuse /ws, then registers the client and serves its socket.
func handleWebSocket(sessions *Sessions, chat *chat, opens *rateLimiter, origins map[string]bool, ping time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, sid, ok := authenticate(w, r, sessions)
		// Every open is a join and a leave for everyone: limit them per user
		// and per client address.
		if !ok || !allowed(w, opens, "user "+strings.ToLower(user), "ip "+clientKey(r)) {
			return
		}
		since, badSince := int64(-1), false
		if q := r.URL.Query(); q.Has("since") {
			since, ok = parseUint(q.Get("since"))
			badSince = !ok
		}
		switch {
		case !originAllowed(r, origins):
			writeError(w, http.StatusForbidden, "origin not allowed")
		case !isWebSocketUpgrade(r):
			writeError(w, http.StatusBadRequest, "expected a WebSocket upgrade (HTTP/1.1, version 13)")
		case badSince:
			writeError(w, http.StatusBadRequest, "since must be a non-negative integer")
		default:
			c := newClient(user, sid)
			if _, ok := sessions.OpenSocket(sid); !ok {
				writeError(w, http.StatusUnauthorized, "unknown or expired session")
			} else if err := chat.hub.Register(c, since); err != nil {
				sessions.CloseSocket(sid)
				writeError(w, map[error]int{errTaken: http.StatusConflict, errFull: http.StatusServiceUnavailable}[err], err.Error())
			} else {
				serveSocket(w, r, c, chat, ping)
			}
		}
	})
}

// serveSocket takes the connection over from net/http for a registered
// client and serves the socket on a goroutine of its own. The handler
// returns at once, so that net/http's goroutine and buffers are freed
// instead of waiting, for the life of the socket, on a connection that is
// no longer theirs.
func serveSocket(w http.ResponseWriter, r *http.Request, c *client, chat *chat, ping time.Duration) {
	nc, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		chat.leave(c, closeNormal)
		chat.hub.sockets.Done()
		writeError(w, http.StatusInternalServerError, "cannot take over the connection")
		return
	}
	conn := &socketConn{Conn: nc, silence: 2 * ping}
	// Bytes the HTTP server had already read belong to the socket. A 512-byte
	// writer holds any control frame whole, so a pong is one write.
	early, _ := brw.Reader.Peek(brw.Reader.Buffered())
	rw := bufio.NewReadWriter(bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn), 1024),
		bufio.NewWriterSize(conn, 512))
	// Logged here, on net/http's goroutine, which ends next: formatting a
	// log line grows a goroutine's stack by some KiB, which the socket's
	// goroutine would then keep for the life of the socket.
	chat.log.Info("websocket open", "user", c.user, "client", clientKey(r))
	go runSocket(hijacked{conn, rw}, r, c, chat, ping)
}

// runSocket completes the handshake and runs the socket's pumps until it
// ends: the reader on this goroutine, the write pump on another.
func runSocket(hj hijacked, r *http.Request, c *client, chat *chat, ping time.Duration) {
	defer chat.hub.sockets.Done()
	served, code := false, closeNormal
	websocket.Server{
		// Subprotocols are not offered; dropping the client's list also keeps
		// the library from refusing a handshake that names several.
		Handshake: func(cfg *websocket.Config, _ *http.Request) error { cfg.Protocol = nil; return nil },
		Handler: func(ws *websocket.Conn) {
			served, ws.MaxPayloadBytes = true, maxFrameBytes
			pumped := make(chan struct{})
			go func() { c.writePump(hj.conn, chat, ping); close(pumped) }()
			code = c.readPump(ws, chat.handle)
			if code == closePolicyViolation {
				chat.metrics.Add(`gochat_clients_dropped_total{reason="silent"}`, 1)
			}
			chat.leave(c, code)
			<-pumped
		},
	}.ServeHTTP(hj, r)
	if !served {
		chat.leave(c, closeNormal)
	}
	chat.log.Info("websocket closed", "user", c.user, "client", clientKey(r), "code", code)
}

// leave frees c's session to expire and takes c out of the room after the
// frames it sent before, so that others see its last message before its
// leave. Its close frame follows; a client that reconnects the moment it
// sees it finds its slot free.
func (ch *chat) leave(c *client, code int) {
	ch.sessions.CloseSocket(c.session)
	tell(ch.hub, ch.incoming, publication{from: c, leave: code})
}

func isWebSocketUpgrade(r *http.Request) bool {
	return r.ProtoMajor == 1 && strings.EqualFold(r.Header.Get("Upgrade"), "websocket") &&
		strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") &&
		r.Header.Get("Sec-WebSocket-Key") != "" && r.Header.Get("Sec-WebSocket-Version") == "13"
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// socketConn is the connection under a websocket.Conn. Every write to it,
// the library's pongs and the write pump's frames, takes mu and has a
// deadline; every read has one too, so a peer that sends nothing, not even
// the pong to a ping, is given up on.
type socketConn struct {
	net.Conn
	silence time.Duration

	mu     sync.Mutex
	closed bool // our close frame is out: nothing may follow it
}

func (c *socketConn) Read(p []byte) (int, error) {
	c.Conn.SetReadDeadline(time.Now().Add(c.silence))
	return c.Conn.Read(p)
}

func (c *socketConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	c.Conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	return c.Conn.Write(p)
}

// finish follows the close frame: nothing more is written, and the peer
// has closeGrace to answer before the connection is cut.
func (c *socketConn) finish() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	time.AfterFunc(closeGrace, func() { c.Conn.Close() })
}

// hijacked is a connection already taken from net/http, handed to
// websocket.Server, which only ever asks to take it over.
type hijacked struct {
	conn *socketConn
	rw   *bufio.ReadWriter
}

func (h hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.rw, nil }
func (h hijacked) Header() http.Header                          { return http.Header{} }
func (h hijacked) Write(p []byte) (int, error)                  { return 0, http.ErrHijacked }
func (h hijacked) WriteHeader(int)                              {}
