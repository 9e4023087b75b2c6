package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// Close codes sent to clients (RFC 6455, section 7.4.1).
const (
	closeNormal          = 1000
	closeGoingAway       = 1001
	closePolicyViolation = 1008
	closeTooBig          = 1009
)

const (
	maxFrameBytes   = 64 << 10 // a larger incoming frame closes the socket with 1009
	maxMessageRunes = 300
	// maxQueueBytes bounds what waits for one client: a burst of thousands
	// of messages fits; a client that stopped reading while others talk
	// reaches it and is dropped.
	maxQueueBytes = 4 << 20
	// writeTimeout is how long one write may block before the client
	// counts as stalled and is dropped.
	writeTimeout = 5 * time.Second
	// closeGrace is how long a closed socket waits for the peer's answer.
	closeGrace = 2 * time.Second
)

// client is one user's WebSocket: a queue the hub fills and the write pump
// drains. The hub never writes to the socket itself, so a slow peer can
// only ever delay its own frames.
type client struct {
	user    string
	session string

	mu     sync.Mutex
	queue  [][]byte      // frames waiting for the write pump; shared, never changed
	queued int           // bytes in queue
	code   int           // once non-zero, the hub let go: send this close code last
	wake   chan struct{} // tells the write pump there is something to do
}

func newClient(user, session string) *client {
	return &client{user: user, session: session, wake: make(chan struct{}, 1)}
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
	default: // the pump has a wake-up pending already
	}
}

// take empties the queue, returning its frames and the close code.
func (c *client) take() ([][]byte, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	frames := c.queue
	c.queue, c.queued = nil, 0
	return frames, c.code
}

func (c *client) closing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code != 0
}

// writePump writes everything queued in one write, pings every interval,
// and ends after the close frame or a failed write.
func (c *client) writePump(conn *socketConn, hub *Hub, ping time.Duration) {
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
		frames, code := c.take()
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
			hub.Unregister(c, closePolicyViolation)
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
		case cap(buf) > 64<<10:
			buf = nil // a burst's buffer is not kept by an idle client
		}
	}
}

// readPump reads frames until the socket ends and handles each to the end
// before reading the next, so acks leave in the order frames came. It
// returns the close code for the socket.
func (c *client) readPump(ws *websocket.Conn, handle func(c *client, data []byte, binary bool)) int {
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
		case !c.closing():
			handle(c, f.data, f.binary)
		}
	}
}

// serveSocket completes the WebSocket handshake for a registered client
// and runs its pumps until the socket ends.
func serveSocket(w http.ResponseWriter, r *http.Request, c *client, ch *chat, ping time.Duration) {
	defer ch.hub.sockets.Done()
	// Leave the room, and free the session to expire, before the close
	// frame answers the peer's: a client that reconnects the moment it sees
	// it finds its slot free.
	leave := sync.OnceFunc(func() { ch.sessions.CloseSocket(c.session); ch.hub.Unregister(c, closeNormal) })
	defer leave() // the handshake failed
	hj := &hijacker{ResponseWriter: w, silence: 2 * ping}
	websocket.Server{
		// Subprotocols are not offered; dropping the client's list also keeps
		// the library from refusing a handshake that names several.
		Handshake: func(cfg *websocket.Config, _ *http.Request) error { cfg.Protocol = nil; return nil },
		Handler: func(ws *websocket.Conn) {
			ws.MaxPayloadBytes = maxFrameBytes
			pumped := make(chan struct{})
			go func() { c.writePump(hj.conn, ch.hub, ping); close(pumped) }()
			code := c.readPump(ws, ch.handle)
			ch.hub.Unregister(c, code)
			leave()
			<-pumped
		},
	}.ServeHTTP(hj, r)
}

// chat is what a reader needs to handle a chat frame.
type chat struct {
	hub      *Hub
	store    *Store
	sessions *Sessions
	limit    *rateLimiter
	now      func() time.Time
	log      *slog.Logger
}

// handle refuses a frame with an error ack, or stores the message and hands
// it to the hub, which broadcasts and acks it.
func (ch *chat) handle(c *client, data []byte, binary bool) {
	text, refusal := chatText(data, binary)
	if refusal == nil {
		if ok, _ := ch.limit.Allow(strings.ToLower(c.user)); !ok {
			refusal = ackRateLimited
		}
	}
	if refusal != nil {
		ch.hub.Refuse(c, refusal)
		return
	}
	m := Message{Author: c.user, Text: text, Time: ch.now()}
	err := ch.store.AddMessage(context.Background(), m, func(m Message) { ch.hub.Publish(c, m) })
	if err != nil {
		ch.log.Error("store message", "user", c.user, "err", err)
		ch.hub.Refuse(c, ackStorageError)
	}
}

// chatText checks an incoming frame. It returns the message text, or the
// error ack to send instead.
func chatText(data []byte, binary bool) (string, []byte) {
	if binary {
		return "", ackInvalid
	}
	text, err := stringField(data, "message")
	if err != nil || text == "" {
		return "", ackInvalid
	}
	if utf8.RuneCountInString(text) > maxMessageRunes {
		return "", ackTooLong
	}
	return text, nil
}

// inFrame is one received data frame.
type inFrame struct {
	data   []byte
	binary bool
}

// inCodec receives frames of either type, telling which it was.
var inCodec = websocket.Codec{
	Unmarshal: func(data []byte, payloadType byte, v any) error {
		f := v.(*inFrame)
		f.data, f.binary = data, payloadType != websocket.TextFrame
		return nil
	},
}

// Outgoing frames are framed here rather than by websocket.Conn.Write, which
// sends each frame with its own write: a broadcast is framed once for all
// receivers, and the write pump sends all its queued frames in one write.

const (
	opText  = 0x1
	opClose = 0x8
	opPing  = 0x9
)

// wsFrame frames payload as one unmasked, final server frame.
func wsFrame(opcode byte, payload []byte) []byte {
	n := len(payload)
	var hdr []byte
	switch {
	case n < 126:
		hdr = []byte{0x80 | opcode, byte(n)}
	case n <= 0xFFFF:
		hdr = []byte{0x80 | opcode, 126, byte(n >> 8), byte(n)}
	default:
		hdr = binary.BigEndian.AppendUint64([]byte{0x80 | opcode, 127}, uint64(n))
	}
	return append(hdr, payload...)
}

func textFrame(payload []byte) []byte { return wsFrame(opText, payload) }

func closeFrame(code int) []byte {
	return wsFrame(opClose, binary.BigEndian.AppendUint16(nil, uint16(code)))
}

var pingFrame = wsFrame(opPing, nil)

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

// finish ends our side after the close frame and gives the peer closeGrace
// to answer before the connection is cut.
func (c *socketConn) finish() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	time.AfterFunc(closeGrace, func() { c.Conn.Close() })
}

// hijacker hands websocket.Server a socketConn instead of the bare
// connection, so that the library's writes and reads go through it too.
type hijacker struct {
	http.ResponseWriter
	silence time.Duration
	conn    *socketConn
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if tcp, ok := nc.(*net.TCPConn); ok {
		// A small kernel buffer makes a peer that stopped reading show up
		// as a stalled write after a few hundred KiB, not many MiB.
		tcp.SetWriteBuffer(64 << 10)
	}
	h.conn = &socketConn{Conn: nc, silence: h.silence}
	// Bytes the HTTP server had already read belong to the socket.
	early, _ := brw.Reader.Peek(brw.Reader.Buffered())
	r := io.MultiReader(bytes.NewReader(bytes.Clone(early)), h.conn)
	// A 512-byte writer holds any control frame whole, so a pong is one write.
	return h.conn, bufio.NewReadWriter(bufio.NewReaderSize(r, 1024), bufio.NewWriterSize(h.conn, 512)), nil
}
