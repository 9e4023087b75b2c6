// The WebSocket library's plumbing: the connection taken from net/http,
// the one lock every write takes, deadlines, server frames, the codec. Its
// own file so that client.go, protocol.go and hub.go read as the chat.

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

const (
	maxFrameBytes = 64 << 10        // a larger incoming frame closes the socket with 1009
	closeGrace    = 2 * time.Second // how long a closed socket waits for the peer's answer

	// Opcodes and close codes (RFC 6455, sections 5.2 and 7.4.1).
	opText               = 0x1
	opClose              = 0x8
	opPing               = 0x9
	closeNormal          = 1000
	closeGoingAway       = 1001
	closeProtocolError   = 1002
	closeInvalidData     = 1007
	closePolicyViolation = 1008
	closeTooBig          = 1009
	closeReplaced        = 4000 // ours: the user took over on another connection
)

// upgradeProblem says why the library would refuse r's handshake, or "".
func upgradeProblem(r *http.Request) string {
	switch {
	case r.Method != http.MethodGet: // the GET route also matches HEAD
		return "a WebSocket opens with GET"
	case r.ProtoMajor != 1 || !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") ||
		!strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") ||
		r.Header.Get("Sec-WebSocket-Key") == "" || r.Header.Get("Sec-WebSocket-Version") != "13":
		return "expected a WebSocket upgrade (HTTP/1.1, version 13)"
	}
	if _, err := url.ParseRequestURI("ws://" + r.Host + r.URL.RequestURI()); err != nil {
		return "bad Host header"
	}
	return ""
}

// hijack takes the connection from net/http, with the bytes it had read.
// A 512-byte writer holds any control frame whole: a pong is one write.
func hijack(w http.ResponseWriter, silence, stall time.Duration) (hijacked, error) {
	nc, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return hijacked{}, err
	}
	conn := &socketConn{Conn: nc, silence: silence, stall: stall}
	early, _ := brw.Reader.Peek(brw.Reader.Buffered())
	rw := bufio.NewReadWriter(bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn), 1024),
		bufio.NewWriterSize(conn, 512))
	return hijacked{conn, rw}, nil
}

// hijacked hands the taken connection to websocket.Server, which hijacks.
type hijacked struct {
	conn *socketConn
	rw   *bufio.ReadWriter
}

func (h hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.rw, nil }
func (h hijacked) Header() http.Header                          { return http.Header{} }
func (h hijacked) Write(p []byte) (int, error)                  { return 0, http.ErrHijacked }
func (h hijacked) WriteHeader(int)                              {}

// socketConn is the connection under a websocket.Conn. Every write, the
// library's pongs too, takes mu; every read and write has a deadline, so a
// peer that sends nothing, not even a pong, or takes nothing for stall, is
// given up on.
type socketConn struct {
	net.Conn
	silence, stall time.Duration
	probeBy        atomic.Int64 // unix nanos: a probed peer must send something by then; 0: no probe

	mu       sync.Mutex
	closed   bool      // our close frame is out: nothing may follow it
	deadline time.Time // the write deadline set last
}

func (c *socketConn) Read(p []byte) (int, error) {
	deadline := time.Now().Add(c.silence)
	if by := c.probeBy.Load(); by != 0 {
		deadline = time.Unix(0, min(by, deadline.UnixNano()))
	}
	c.Conn.SetReadDeadline(deadline)
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.probeBy.Store(0) // the peer is there
	}
	return n, err
}

// probe gives the peer timeout to send something (the pong to the caller's
// ping). A probe already running keeps its deadline.
func (c *socketConn) probe(timeout time.Duration) {
	by := time.Now().Add(timeout)
	if c.probeBy.CompareAndSwap(0, by.UnixNano()) {
		c.Conn.SetReadDeadline(by)
	}
}

// Write fails once about stall has passed with no byte of p taken, not
// when all of p takes longer: a phone on a slow link that reads steadily
// gets a long replay whole. It looks for progress every eighth to quarter
// of stall.
func (c *socketConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	written, progressed := 0, time.Now()
	for now := progressed; ; now = time.Now() {
		// Moving a deadline moves a runtime timer, which on every write
		// cost a large room 8 % of its CPU: it moves only once it is
		// within half its reach.
		if c.deadline.Sub(now) < c.stall/8 {
			c.deadline = now.Add(c.stall / 4)
			c.Conn.SetWriteDeadline(c.deadline)
		}
		n, err := c.Conn.Write(p[written:])
		if written += n; n > 0 {
			progressed = time.Now()
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(progressed) >= c.stall {
			return written, err
		}
	}
}

// finish follows the close frame: the peer has closeGrace to answer.
func (c *socketConn) finish() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	time.AfterFunc(closeGrace, func() { c.Conn.Close() })
}

// inFrame is one received data frame.
type inFrame struct {
	data   []byte
	opcode byte
}

// inCodec receives frames of any type, telling which it was.
var inCodec = websocket.Codec{
	Unmarshal: func(data []byte, opcode byte, v any) error {
		*v.(*inFrame) = inFrame{data, opcode}
		return nil
	},
}

// closeCodeFor returns the close code for a frame that breaks the
// protocol as far as the library lets us see, or 0: a reserved opcode, a
// continuation of nothing (others pass as their first fragment's type), a
// text frame that is not UTF-8.
func closeCodeFor(f inFrame) int {
	switch {
	case f.opcode != websocket.TextFrame && f.opcode != websocket.BinaryFrame:
		return closeProtocolError
	case f.opcode == websocket.TextFrame && !utf8.Valid(f.data):
		return closeInvalidData
	}
	return 0
}

// Server frames are framed here, not by the library, which writes each on
// its own: a broadcast is framed once, and a pump's queue is one write.

var pingFrame = wsFrame(opPing, nil)

func textFrame(payload []byte) []byte { return wsFrame(opText, payload) }

func closeFrame(code int) []byte {
	return wsFrame(opClose, binary.BigEndian.AppendUint16(nil, uint16(code)))
}

// wsFrame frames payload as one unmasked, final server frame.
func wsFrame(opcode byte, payload []byte) []byte {
	hdr := []byte{0x80 | opcode, byte(len(payload))}
	switch n := len(payload); {
	case n > 0xFFFF:
		hdr = binary.BigEndian.AppendUint64([]byte{0x80 | opcode, 127}, uint64(n))
	case n > 125:
		hdr = binary.BigEndian.AppendUint16([]byte{0x80 | opcode, 126}, uint16(n))
	}
	return append(hdr, payload...)
}
