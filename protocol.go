// The chat protocol: what a client's frame means and what the server sends
// back. It has its own file so that changing the protocol means reading one
// file; client.go moves the bytes and hub.go decides who gets them.

package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

const maxMessageRunes = 300

// Opcodes and close codes (RFC 6455, sections 5.2 and 7.4.1).
const (
	opText               = 0x1
	opClose              = 0x8
	opPing               = 0x9
	closeNormal          = 1000
	closeGoingAway       = 1001
	closeProtocolError   = 1002
	closeInvalidData     = 1007
	closePolicyViolation = 1008
	closeTooBig          = 1009
)

// chat is what a socket's reader needs to handle a frame, and the one
// goroutine (storeAndPublish) that stores messages and hands them to the hub.
type chat struct {
	hub      *Hub
	store    *Store
	sessions *Sessions
	limit    *rateLimiter
	now      func() time.Time
	metrics  *Metrics
	log      *slog.Logger
	incoming chan publication // checked frames and departures, in the order they came
}

// handle checks a frame and queues it, accepted or refused, for
// storeAndPublish. The reader does not wait for the commit, so a client
// may send many frames per disk flush; its acks still leave in frame
// order, because accepted and refused frames take the same queue.
func (ch *chat) handle(c *client, f inFrame) {
	text, refusal := chatText(f)
	if refusal == "" {
		if ok, _ := ch.limit.Allow(c.key); !ok {
			refusal = "rate_limited"
		}
	}
	tell(ch.hub, ch.incoming, publication{from: c, msg: Message{Author: c.user, Text: text}, refusal: refusal})
}

// storeAndPublish stores the accepted messages of all that waits in
// incoming, in one transaction (one disk flush for many messages in a busy
// room), then hands all of it to the hub in its order: ids ascend in
// broadcast order, and nothing is acked before it is on disk.
func (ch *chat) storeAndPublish() {
	for {
		var batch []publication
		select {
		case p := <-ch.incoming:
			batch = append(batch, p)
		case <-ch.hub.done:
			return
		}
		for len(batch) < cap(ch.incoming) && len(ch.incoming) > 0 { // all that waits
			batch = append(batch, <-ch.incoming)
		}
		var accepted []*Message
		now := ch.now()
		for i := range batch {
			if batch[i].accepted() {
				batch[i].msg.Time = now
				accepted = append(accepted, &batch[i].msg)
			}
		}
		err := ch.store.AddMessages(accepted)
		if err != nil {
			ch.log.Error("store messages", "count", len(accepted), "err", err)
		}
		for _, p := range batch {
			if p.accepted() && err != nil {
				p.refusal = "storage_error"
			}
			ch.hub.Publish(p)
			switch {
			case p.accepted():
				ch.metrics.Add("gochat_messages_accepted_total", 1)
			case p.refusal != "":
				ch.metrics.Add(fmt.Sprintf(`gochat_messages_refused_total{code="%s"}`, p.refusal), 1)
			}
		}
	}
}

// chatText checks an incoming frame. It returns the message text, or the
// code of the error ack to send instead.
func chatText(f inFrame) (text, refusal string) {
	if f.binary {
		return "", "invalid_message"
	}
	text, err := stringField(f.data, "message")
	if err != nil || text == "" {
		return "", "invalid_message"
	}
	if utf8.RuneCountInString(text) > maxMessageRunes {
		return "", "message_too_long"
	}
	return text, ""
}

// inFrame is one received data frame.
type inFrame struct {
	data   []byte
	binary bool
	opcode byte
}

// inCodec receives frames of any type, telling which it was.
var inCodec = websocket.Codec{
	Unmarshal: func(data []byte, opcode byte, v any) error {
		*v.(*inFrame) = inFrame{data, opcode != websocket.TextFrame, opcode}
		return nil
	},
}

// closeCodeFor says whether frame breaks the WebSocket protocol itself, as
// far as the library lets us see: a reserved opcode, a continuation with
// nothing to continue (the library passes others off as their first
// fragment's type), or a text frame that is not UTF-8. It returns the close
// code, or 0.
func closeCodeFor(f inFrame) int {
	switch {
	case f.opcode != websocket.TextFrame && f.opcode != websocket.BinaryFrame:
		return closeProtocolError
	case f.opcode == websocket.TextFrame && !utf8.Valid(f.data):
		return closeInvalidData
	}
	return 0
}

// Frames the server sends are framed here rather than by the library, which
// writes each frame on its own: a broadcast is framed once for all its
// receivers, and a write pump sends all its queued frames in one write.

type messageJSON struct {
	Message string `json:"message"`
	Author  string `json:"author"`
	ID      int64  `json:"id"`
	Time    string `json:"time"`
	History bool   `json:"history,omitempty"`
}

func toJSON(m Message, history bool) messageJSON {
	// RFC 3339 in UTC with a fixed millisecond width.
	t := m.Time.UTC().Format("2006-01-02T15:04:05.000Z07:00")
	return messageJSON{Message: m.Text, Author: m.Author, ID: m.ID, Time: t, History: history}
}

func messageFrame(m Message, history bool) []byte { return textFrame(mustJSON(toJSON(m, history))) }

func eventFrame(event, user string) []byte {
	return textFrame(mustJSON(map[string]string{"event": event, "username": user}))
}

func deleteFrame(id int64) []byte {
	return textFrame(mustJSON(map[string]any{"event": "delete", "id": id}))
}

func ackFrame(id int64) []byte {
	return textFrame(mustJSON(struct {
		Status bool  `json:"status"`
		ID     int64 `json:"id"`
	}{true, id}))
}

func errorAck(code string) []byte {
	return textFrame(mustJSON(map[string]any{"status": false, "code": code}))
}

var (
	gapFrame  = textFrame([]byte(`{"event":"gap"}`))
	pingFrame = wsFrame(opPing, nil)
)

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

// mustJSON encodes values whose types cannot fail to encode.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
