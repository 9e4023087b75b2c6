package main

import (
	"cmp"
	"errors"
	"math"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/websocket"
)

const (
	// maxQueueBytes bounds what waits for one client: a burst of thousands
	// of messages fits; a client that stopped reading while others talk
	// reaches it and is dropped.
	maxQueueBytes = 4 << 20
	probeTimeout  = 5 * time.Second // how long a probed peer has to answer a ping
)

// client is one user's WebSocket: a queue the hub fills and the write pump
// drains, so a slow peer only ever delays its own frames.
type client struct {
	user    string
	key     string // user in lower case: names are unique in any case
	session string

	// Owned by the hub goroutine.
	inRoom  bool      // its handshake succeeded and the room knows it
	typedAt time.Time // its last typing event that went out

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

// enqueue queues frame, or reports false when the queue is full.
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

// close makes the write pump send what is queued, then a close frame.
func (c *client) close(code int) { c.update(func() { c.code = code }) }

// discardQueue forgets what waits, for a client too slow to read it.
func (c *client) discardQueue() { c.update(func() { c.queue, c.queued = nil, 0 }) }

// startProbe makes the write pump ping now and give the peer probeTimeout
// to answer: a phone that lost its network holds its user's one slot, and
// the user coming back on another connection should wait seconds, not two
// ping intervals.
func (c *client) startProbe() { c.update(func() { c.probe = true }) }

// update changes c under its lock and wakes the write pump.
func (c *client) update(change func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	change()
	c.signal()
}

func (c *client) signal() {
	select {
	case c.wake <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// take empties the queue: its frames, the close code, whether to probe.
func (c *client) take() ([][]byte, int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	frames, probe := c.queue, c.probe
	c.queue, c.queued, c.probe = nil, 0, false
	return frames, c.code, probe
}

// writePump writes all that is queued in one write, pings every interval,
// and returns the close code it sent, after it or a failed write.
func (c *client) writePump(conn *socketConn, hub *Hub, ping time.Duration) int {
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
			conn.probe(probeTimeout) // the first probe's deadline holds: later 409s do not extend it
		}
		for _, f := range frames {
			buf = append(buf, f...)
		}
		if code != 0 {
			buf = append(buf, closeFrame(code)...)
		}
		n, err := conn.Write(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Stalled: the others hear it left now; it gets the rest and a
			// close frame if it starts reading within another timeout.
			hub.send(left{c, closePolicyViolation})
			hub.metrics.Add(`gochat_clients_dropped_total{reason="stalled"}`, 1)
			if code == 0 {
				code, buf = closePolicyViolation, append(buf, closeFrame(closePolicyViolation)...)
			}
			_, err = conn.Write(buf[n:])
		}
		switch {
		case err != nil:
			conn.Close()
			return code
		case code != 0:
			conn.finish()
			return code
		case cap(buf) > 1<<10:
			buf = nil // a burst's buffer (the history, say) is not kept by an idle client
		}
	}
}

// readPump hands each frame's meaning to the hub, returning a close code.
func (c *client) readPump(ws *websocket.Conn, hub *Hub) int {
	for {
		var f inFrame
		err := inCodec.Receive(ws, &f)
		switch {
		case errors.Is(err, websocket.ErrFrameTooLarge):
			return closeTooBig
		case errors.Is(err, os.ErrDeadlineExceeded):
			return closePolicyViolation // silent for two ping intervals, or a probe unanswered
		case err != nil:
			return closeNormal // the peer's close frame, or the connection ended
		case closeCodeFor(f) != 0:
			return closeCodeFor(f)
		}
		hub.send(eventFor(c, f))
	}
}

// handleWebSocket checks everything that can refuse /ws, the library's
// checks included, so that refusals have JSON bodies; then it reserves the
// user's slot and serves the socket.
func handleWebSocket(sessions *Sessions, hub *Hub, opens *rateLimiter, origins map[string]bool, ping, stall time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, sid, ok := authenticate(w, r, sessions)
		// Every open is a join and a leave for everyone: limit them per user.
		if !ok || !allowed(w, r, hub.log, "opens", opens, strings.ToLower(user)) {
			return
		}
		q, since, sinceOK := r.URL.Query(), int64(-1), true
		if q.Has("since") {
			since, sinceOK = parseUint(q.Get("since"))
		}
		if sinceOK && q.Has("generation") && q.Get("generation") != hub.store.generation {
			since = math.MaxInt64 // an id of another database (a restore): beyond the newest, a gap
		}
		c := newClient(user, sid)
		switch problem := upgradeProblem(r); {
		case !originAllowed(r, origins):
			writeError(w, http.StatusForbidden, "origin not allowed")
		case problem != "" && r.Method != http.MethodGet:
			w.Header().Set("Allow", "GET")
			writeError(w, http.StatusMethodNotAllowed, problem)
		case problem != "":
			writeError(w, http.StatusBadRequest, problem)
		case !sinceOK:
			writeError(w, http.StatusBadRequest, "since must be a non-negative integer")
		default:
			slot := reserve{c, q.Get("takeover") == "1", make(chan error, 1)}
			if err := hub.ask(slot, slot.result); err != nil {
				hub.log.Info("websocket refused", "user", user, "client", clientAddr(r), "err", err)
				status := map[error]int{errTaken: http.StatusConflict, errExpired: http.StatusUnauthorized}[err]
				writeError(w, cmp.Or(status, http.StatusServiceUnavailable), err.Error()) // full, or shutting down
				return
			}
			hj, err := hijack(w, 2*ping, stall)
			if err != nil {
				hub.send(left{c, closeNormal})
				hub.sockets.Done()
				writeError(w, http.StatusInternalServerError, "cannot take over the connection")
				return
			}
			// Logged on net/http's goroutine, which ends next: a log line grows
			// a stack by KiB that the socket's goroutine would keep.
			hub.log.Info("websocket open", "user", user, "client", clientAddr(r))
			go runSocket(hj, r, c, hub, ping, since)
		}
	})
}

// runSocket completes the handshake, enters the room and runs the pumps
// until the socket ends. Its own goroutine lets net/http's goroutine and
// buffers go, rather than wait on a connection no longer theirs.
func runSocket(hj hijacked, r *http.Request, c *client, hub *Hub, ping time.Duration, since int64) {
	defer hub.sockets.Done()
	sent := 0
	websocket.Server{
		// Past the library's checks, before the 101 is written: a client that
		// reads its 101 is in the room, and so sees every later join.
		// Subprotocols are not offered; dropping the client's list also keeps
		// the library from refusing a handshake that names several.
		Handshake: func(cfg *websocket.Config, _ *http.Request) error {
			cfg.Protocol = nil
			hub.metrics.countResponse(http.StatusSwitchingProtocols)
			hub.send(joined{c, since})
			return nil
		},
		Handler: func(ws *websocket.Conn) {
			ws.MaxPayloadBytes = maxFrameBytes
			pumped := make(chan struct{})
			go func() { sent = c.writePump(hj.conn, hub, ping); close(pumped) }()
			code := c.readPump(ws, hub)
			if code == closePolicyViolation {
				hub.metrics.Add(`gochat_clients_dropped_total{reason="silent"}`, 1)
			}
			// After its frames, so that others see its last message before
			// its leave; its close frame follows, so a client that reconnects
			// the moment it sees it finds its slot free.
			hub.send(left{c, code})
			<-pumped
		},
	}.ServeHTTP(hj, r)
	hub.send(left{c, closeNormal}) // for a failed handshake; else a no-op
	hub.log.Info("websocket closed", "user", c.user, "client", clientAddr(r), "code", sent)
}
