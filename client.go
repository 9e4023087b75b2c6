// One connected WebSocket: its outgoing queue and on-demand writer, and the
// reader that the /ws handler runs for the life of the socket. It is its own
// file because it is the seam between the hub's bookkeeping and the bytes on
// the wire, where x/net/websocket needs working around (see rawConn).

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
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
	// maxQueueBytes bounds what waits for one client beyond what the kernel
	// buffers. A burst of thousands of messages fits; a client that stopped
	// reading while others talk reaches it and is dropped.
	maxQueueBytes = 4 << 20
	// writeTimeout is how long one write may block before the client counts
	// as stalled and is dropped.
	writeTimeout = 5 * time.Second
	// closeGrace is how long a closing socket waits for the peer's close
	// frame before the connection is cut.
	closeGrace = 2 * time.Second
	// socketSendBuffer caps the kernel's send buffer per socket, so that a
	// stalled reader shows up as a blocked write after a few hundred KiB
	// instead of several MiB.
	socketSendBuffer = 64 << 10
)

// client is one user's WebSocket. The hub goroutine owns active; the rest
// of the queue state is guarded by mu because the reader sends its own
// error acks and the store's writer sends storage errors.
type client struct {
	hub     *Hub
	user    string
	session string
	active  bool // receiving broadcasts; hub goroutine only

	conn *rawConn // nil until the upgrade completed

	mu        sync.Mutex
	queue     [][]byte // frames waiting for the writer
	queued    int      // bytes in queue
	writing   bool     // a writeLoop goroutine is running
	closeCode int      // non-zero once closing: the code to send
	closeSent bool
	finished  chan struct{} // closed when the writer is done for good
}

func newClient(hub *Hub, user, session string) *client {
	return &client{hub: hub, user: user, session: session, finished: make(chan struct{})}
}

// send queues frame. It never blocks; it reports false when the queue is
// full, and the caller drops the client. Frames for a closing client are
// discarded.
func (c *client) send(frame []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeCode != 0 {
		return true
	}
	if c.queued+len(frame) > maxQueueBytes {
		return false
	}
	c.queue = append(c.queue, frame)
	c.queued += len(frame)
	c.startWriterLocked()
	return true
}

// close sends a close frame with code after what is queued (a slow client's
// backlog is discarded instead) and then shuts the connection.
func (c *client) close(code int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeCode != 0 {
		return
	}
	c.closeCode = code
	if code == closePolicyViolation {
		clear(c.queue)
		c.queue, c.queued = nil, 0
	}
	c.startWriterLocked()
}

// attach gives c its connection once the upgrade is done and starts writing
// whatever was decided before that.
func (c *client) attach(conn *rawConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conn = conn
	if len(c.queue) > 0 || c.closeCode != 0 {
		c.startWriterLocked()
	}
}

// startWriterLocked starts a writer unless one runs. Writers exist only while
// there is something to write, so an idle client costs no goroutine.
func (c *client) startWriterLocked() {
	if c.writing || c.conn == nil {
		return
	}
	c.writing = true
	go c.writeLoop()
}

// writeLoop writes everything queued, each round in one system call, until
// the queue is empty (then it exits) or the close frame is out.
func (c *client) writeLoop() {
	var out net.Buffers // taken from the queue, not yet fully written
	for {
		c.mu.Lock()
		out = append(out, c.queue...)
		clear(c.queue)
		c.queue, c.queued = c.queue[:0], 0
		final := c.closeCode != 0 && !c.closeSent
		if final {
			c.closeSent = true
			out = append(out, closeFrame(c.closeCode))
		}
		if len(out) == 0 {
			c.writing, c.queue = false, nil
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()

		timeout := writeTimeout
		if final {
			// A dropped client may still be working through its backlog;
			// it gets a second period to reach the close frame.
			timeout = 2 * writeTimeout
		}
		err := c.conn.writeFrames(&out, timeout)
		switch {
		case err == nil && !final:
			continue
		case err == nil:
			c.conn.closeWrite()
		case isTimeout(err) && !final:
			// Stalled: drop it now, then give what was half written and the
			// close frame one more timeout to get through.
			c.hub.Leave(c)
			c.close(closePolicyViolation)
			continue
		default:
			c.conn.Close()
		}
		close(c.finished)
		return
	}
}

// readLoop reads frames until the socket closes. It runs on the handler
// goroutine, which x/net/websocket requires to live as long as the socket.
func (c *client) readLoop(ws *websocket.Conn, handle func(text []byte, binary bool)) {
	for {
		var f inFrame
		err := inCodec.Receive(ws, &f)
		if errors.Is(err, websocket.ErrFrameTooLarge) {
			c.hub.Leave(c)
			c.close(closeTooBig)
			continue // keep reading: the peer's close frame ends the loop
		}
		if err != nil {
			break
		}
		if c.isClosing() {
			continue
		}
		handle(f.data, f.binary)
	}
	// Unregister before the close frame answers the peer's, so a client
	// that reconnects the moment it sees it finds its slot free.
	c.hub.Leave(c)
	c.close(closeNormal)
	select {
	case <-c.finished:
	case <-time.After(writeTimeout + closeGrace):
	}
}

func (c *client) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeCode != 0
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

// Outgoing frames are framed here rather than by websocket.Conn.Write,
// which sends each frame with its own flush: a broadcast is framed once for
// all receivers, and a writer sends all its queued frames in one writev.

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

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// rawConn is the hijacked connection under a websocket.Conn. All writes,
// the library's (handshake, pong) and ours, go through it one at a time.
// Each read refreshes an idle deadline, so a peer that sends nothing, not
// even the pong to our periodic ping, is noticed and dropped.
type rawConn struct {
	net.Conn
	idle time.Duration

	wmu     sync.Mutex
	closeBy atomic.Int64 // unix nanos after which reads fail; 0 while open
}

func (c *rawConn) Read(p []byte) (int, error) {
	deadline := time.Now().Add(c.idle)
	if by := c.closeBy.Load(); by != 0 {
		deadline = time.Unix(0, by)
	}
	if err := c.Conn.SetReadDeadline(deadline); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

func (c *rawConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.Conn.SetWriteDeadline(time.Now().Add(writeTimeout)); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}

// writeFrames writes frames in one system call where the connection allows
// (writev on TCP), removing from *frames what was written.
func (c *rawConn) writeFrames(frames *net.Buffers, timeout time.Duration) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.Conn.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, ok := c.Conn.(*net.TCPConn); ok {
		_, err := frames.WriteTo(c.Conn)
		return err
	}
	// TLS would make each buffer its own record and write.
	joined := bytes.Join(*frames, nil)
	n, err := c.Conn.Write(joined)
	*frames = net.Buffers{joined[n:]}
	if n == len(joined) {
		*frames = nil
	}
	return err
}

// closeWrite ends our side after the close frame and bounds the wait for
// the peer's.
func (c *rawConn) closeWrite() {
	c.closeBy.Store(time.Now().Add(closeGrace).UnixNano())
	c.Conn.SetReadDeadline(time.Now().Add(closeGrace))
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// upgradeWriter lets websocket.Server hijack a rawConn instead of the bare
// connection, with small buffers: the reader's is refilled per frame, and
// the writer's only ever holds the handshake or a control frame.
type upgradeWriter struct {
	http.ResponseWriter
	idle time.Duration
	conn *rawConn
}

const readBufferSize = 1024

func (w *upgradeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if tcp, ok := nc.(*net.TCPConn); ok {
		tcp.SetWriteBuffer(socketSendBuffer)
	}
	w.conn = &rawConn{Conn: nc, idle: w.idle}
	var r io.Reader = w.conn
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(early)), w.conn)
	}
	return w.conn, bufio.NewReadWriter(bufio.NewReaderSize(r, readBufferSize), bufio.NewWriterSize(w.conn, 256)), nil
}
