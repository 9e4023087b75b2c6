// One connected WebSocket: its outgoing queue, its writes (non-blocking from
// the hub, or from a writer goroutine while it is behind) and its reader. It
// is its own file because it is the seam between the hub's bookkeeping and
// the bytes on the wire, where x/net/websocket needs working around (see
// rawConn and upgradeWriter).

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
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
	queue     [][]byte // frames waiting to be written
	queued    int      // bytes in queue
	writing   bool     // some goroutine owns the write side of conn
	closeCode int      // non-zero once closing: the code to send
	closeSent bool
	deaf      bool          // discards frames: the peer is gone or going
	finished  chan struct{} // closed when writing is over for good

	dirty bool // has frames the hub has not flushed yet; hub goroutine only
}

func newClient(hub *Hub, user, session string) *client {
	return &client{hub: hub, user: user, session: session, finished: make(chan struct{})}
}

// enqueue queues frame without writing it. It reports false when the queue
// is full, and the caller drops the client. Frames for a closing client are
// discarded.
func (c *client) enqueue(frame []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeCode != 0 || c.deaf {
		return true
	}
	// A queued frame costs its slot too: frames are shared, slots are not.
	cost := len(frame) + queueSlotBytes
	if c.queued+cost > maxQueueBytes {
		return false
	}
	c.queue = append(c.queue, frame)
	c.queued += cost
	return true
}

// queueSlotBytes is the size of one queue entry (a slice header).
const queueSlotBytes = 24

// stopListening makes c discard what is sent to it from now on: its peer is
// gone or going, and frames queued meanwhile (a busy hub may take a while to
// hear it left) would only pile up.
func (c *client) stopListening() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deaf = true
	clear(c.queue)
	c.queue, c.queued = nil, 0
}

// send queues frame and flushes, for goroutines other than the hub's.
func (c *client) send(frame []byte) {
	if !c.enqueue(frame) {
		c.close(closePolicyViolation)
		go c.hub.Leave(c)
		return
	}
	c.flush(nil)
}

// close sends a close frame with code after what is queued (a slow client's
// backlog is discarded instead) and then shuts the connection.
func (c *client) close(code int) {
	c.mu.Lock()
	if c.closeCode != 0 {
		c.mu.Unlock()
		return
	}
	c.closeCode = code
	if code == closePolicyViolation {
		clear(c.queue)
		c.queue, c.queued = nil, 0
	}
	c.mu.Unlock()
	c.flush(nil)
}

// silentFor reports how long c's peer has sent nothing; 0 before attach.
func (c *client) silentFor(now time.Time) time.Duration {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn == nil {
		return 0
	}
	return conn.silentFor(now)
}

// attach gives c its connection once the upgrade is done and writes
// whatever was decided before that.
func (c *client) attach(conn *rawConn) {
	c.mu.Lock()
	c.conn = conn
	c.mu.Unlock()
	c.flush(nil)
}

// takeLocked moves the queue, and the close frame when it is due, to out.
func (c *client) takeLocked(out net.Buffers) (net.Buffers, bool) {
	out = append(out, c.queue...)
	clear(c.queue)
	c.queue, c.queued = c.queue[:0], 0
	if cap(c.queue) > keptQueueCap {
		c.queue = nil // a burst's backlog array is not kept for an idle client
	}
	final := c.closeCode != 0 && !c.closeSent
	if final {
		c.closeSent = true
		out = append(out, closeFrame(c.closeCode))
	}
	return out, final
}

// keptQueueCap is the largest queue array an idle client keeps, so that the
// usual one or two frames per flush are queued without allocating.
const keptQueueCap = 4

// flush writes everything queued in one system call that does not block,
// on the calling goroutine. Whatever the socket cannot take now is handed
// to a writer goroutine, so a client costs a goroutine only while it is
// behind. Safe from any goroutine; a flush while another goroutine writes
// leaves the queue to that one.
func (c *client) flush(scratch net.Buffers) net.Buffers {
	c.mu.Lock()
	if c.writing || c.conn == nil {
		c.mu.Unlock()
		return scratch
	}
	c.writing = true
	for {
		out, final := c.takeLocked(scratch[:0])
		scratch = out[:0]
		if len(out) == 0 {
			c.writing = false
			c.mu.Unlock()
			return scratch
		}
		c.mu.Unlock()
		rest, err := c.conn.tryWrite(out)
		switch {
		case err == nil && final:
			c.finish(nil)
		case err == nil:
			clear(out)
			c.mu.Lock()
			continue
		case errors.Is(err, errWouldBlock):
			go c.writeLoop(slices.Clone(rest), final)
		default:
			c.finish(err)
		}
		clear(out)
		return scratch
	}
}

// writeLoop writes out, then whatever else gets queued, blocking with a
// deadline, until the queue is empty (then it exits) or the close frame is
// out. final says whether out already ends with the close frame.
func (c *client) writeLoop(out net.Buffers, final bool) {
	for {
		timeout := writeTimeout
		if final {
			// A dropped client may still be working through its backlog;
			// it gets a second period to reach the close frame.
			timeout = 2 * writeTimeout
		}
		err := c.conn.writeFrames(&out, timeout)
		switch {
		case err == nil && final:
			c.finish(nil)
			return
		case err == nil:
		case isTimeout(err) && !final:
			// Stalled: drop it now, then give what was half written and the
			// close frame one more timeout to get through.
			// (close only queues the close frame: this goroutine writes.)
			c.hub.Leave(c)
			c.close(closePolicyViolation)
		default:
			c.finish(err)
			return
		}
		c.mu.Lock()
		var closing bool
		out, closing = c.takeLocked(out)
		final = final || closing
		if len(out) == 0 {
			c.writing = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
	}
}

// finish ends writing for good: after the close frame went out, half-close
// and wait briefly for the peer's; after a failed write, cut the connection.
func (c *client) finish(err error) {
	if err != nil {
		c.stopListening()
		c.conn.shut()
	} else {
		c.conn.closeWrite()
	}
	close(c.finished)
}

// readLoop reads frames until the socket closes. It runs on the socket's own
// goroutine, started once the handshake is done (see upgrade).
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
	c.stopListening()
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
// Each read notes the time, so the hub can drop a peer that sends nothing,
// not even the pong to its periodic ping, without a timer per socket.
type rawConn struct {
	net.Conn
	raw      syscall.RawConn // nil where there is no socket to write to directly (TLS)
	lastRead atomic.Int64    // unix nanos of the last read that returned data

	wmu       sync.Mutex
	pending   []byte // tryWrite's data, result and system call, under wmu
	written   int
	writeErr  error
	writeOnce func(fd uintptr) bool
	corked    bool // holding writes back until uncork
	// oneFramePerWrite turns coalescing off, for comparing against it.
	oneFramePerWrite bool
	held             []byte // what was written while corked
}

// newRawConn wraps a hijacked connection; it starts corked.
func newRawConn(nc net.Conn, oneFramePerWrite bool) *rawConn {
	c := &rawConn{Conn: nc, corked: true, oneFramePerWrite: oneFramePerWrite}
	c.writeOnce = c.write
	c.lastRead.Store(time.Now().UnixNano())
	if tcp, ok := nc.(*net.TCPConn); ok {
		c.raw, _ = tcp.SyscallConn()
	}
	return c
}

// uncork sends what the handshake wrote. Until then the client has not seen
// its 101, so by the time it has, the hub counts it as online.
func (c *rawConn) uncork() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.corked = false
	held := c.held
	c.held = nil
	defer c.setWriteDeadline(writeTimeout)()
	_, err := c.Conn.Write(held)
	return err
}

// Close is what x/net/websocket calls when the handler returns, which here
// is right after the handshake: the socket lives on with its own reader, so
// the call is ignored. shut closes the connection for real.
func (c *rawConn) Close() error { return nil }

func (c *rawConn) shut() error { return c.Conn.Close() }

func (c *rawConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.lastRead.Store(time.Now().UnixNano())
	}
	return n, err
}

// silentFor reports how long the peer has sent nothing.
func (c *rawConn) silentFor(now time.Time) time.Duration {
	return now.Sub(time.Unix(0, c.lastRead.Load()))
}

func (c *rawConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.corked {
		c.held = append(c.held, p...)
		return len(p), nil
	}
	defer c.setWriteDeadline(writeTimeout)()
	return c.Conn.Write(p)
}

// setWriteDeadline bounds the blocking writes that follow and returns the
// function that lifts the bound again: a deadline left behind would fail
// tryWrite's later writes, which never block and need none.
func (c *rawConn) setWriteDeadline(timeout time.Duration) func() {
	c.Conn.SetWriteDeadline(time.Now().Add(timeout))
	return func() { c.Conn.SetWriteDeadline(time.Time{}) }
}

// errWouldBlock says the socket's buffer is full: what is left needs a
// goroutine that can wait.
var errWouldBlock = errors.New("write would block")

// joinBuffers holds the frames of one write on their way to the socket.
var joinBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 32<<10); return &b }}

// tryWrite writes frames with one write() that never waits for the socket,
// and returns what it could not write, with errWouldBlock, or nil.
func (c *rawConn) tryWrite(frames net.Buffers) (net.Buffers, error) {
	if c.raw == nil {
		return frames, errWouldBlock
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.oneFramePerWrite {
		for len(frames) > 0 {
			if rest, err := c.writeNow(frames[:1]); err != nil {
				return append(rest, frames[1:]...), err
			}
			frames = frames[1:]
		}
		return nil, nil
	}
	return c.writeNow(frames)
}

// writeNow is tryWrite for frames in one write(), under wmu.
func (c *rawConn) writeNow(frames net.Buffers) (net.Buffers, error) {
	data := frames[0]
	if len(frames) > 1 {
		bp := joinBuffers.Get().(*[]byte)
		defer joinBuffers.Put(bp)
		for _, f := range frames {
			*bp = append(*bp, f...)
		}
		data = *bp
		defer func() { *bp = (*bp)[:0] }()
	}
	c.pending = data
	err := c.raw.Write(c.writeOnce)
	n, werr := c.written, c.writeErr
	c.pending, c.writeErr = nil, nil
	if err == nil {
		err = werr
	}
	if errors.Is(err, syscall.EAGAIN) {
		return frames, errWouldBlock
	}
	if err != nil {
		return frames, err
	}
	if rest := advance(frames, n); len(rest) > 0 {
		return rest, errWouldBlock
	}
	return nil, nil
}

// write is tryWrite's system call. Its method value, made once per
// connection as writeOnce, lets a write allocate no closure.
func (c *rawConn) write(fd uintptr) bool {
	for {
		c.written, c.writeErr = syscall.Write(int(fd), c.pending)
		if c.writeErr != syscall.EINTR {
			return true // done, whatever happened: this write never waits
		}
	}
}

// advance drops the first n bytes of frames. The frames' bytes, shared
// with other clients, are resliced, never changed.
func advance(frames net.Buffers, n int) net.Buffers {
	for len(frames) > 0 && n >= len(frames[0]) {
		n -= len(frames[0])
		frames = frames[1:]
	}
	if len(frames) > 0 {
		frames[0] = frames[0][n:]
	}
	return frames
}

// writeFrames writes frames in one system call where the connection allows
// (writev on TCP), removing from *frames what was written.
func (c *rawConn) writeFrames(frames *net.Buffers, timeout time.Duration) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	defer c.setWriteDeadline(timeout)()
	if c.oneFramePerWrite {
		for len(*frames) > 0 {
			n, err := c.Conn.Write((*frames)[0])
			*frames = advance(*frames, n)
			if err != nil {
				return err
			}
		}
		return nil
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
	oneFramePerWrite bool
	conn             *rawConn
}

const readBufferSize = 512

func (w *upgradeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if tcp, ok := nc.(*net.TCPConn); ok {
		tcp.SetWriteBuffer(socketSendBuffer)
	}
	w.conn = newRawConn(nc, w.oneFramePerWrite)
	var r io.Reader = w.conn
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(early)), w.conn)
	}
	return w.conn, bufio.NewReadWriter(bufio.NewReaderSize(r, readBufferSize), bufio.NewWriterSize(w.conn, 256)), nil
}
