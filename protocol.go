// The chat protocol: what a client's frame means for the room, and every
// frame the server sends, in one file. client.go moves the bytes, hub.go
// orders the events, wsconn.go is the WebSocket library's plumbing.
//
// Adding a frame type touches this file and the hub, nothing else:
//  1. an event type for it below, with its sender method;
//  2. a case in eventFor that recognises the frame and returns the event;
//  3. the frame the others get (a func next to eventFrame), if any;
//  4. a case in Hub.deliver (below) that says what the room does with it.
//
// Never hand an event to the hub by another path than the reader's
// hub.send: one path is what keeps every frame in the order it came.

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"
)

const (
	maxMessageRunes = 300
	typingEvery     = 2 * time.Second // at most one typing event per user this often
)

// Events born of a client's frame, in the order its reader read them.
type (
	// chatMessage is a message to store, broadcast and ack; msg once stored.
	chatMessage struct {
		from *client
		text string
		msg  Message
	}
	// refusal is a frame refused with an error ack's code.
	refusal struct {
		from *client
		code string
	}
	// typing tells the others that from is typing; nothing is acked.
	typing struct{ from *client }
)

// clientFrame is an event born of a client's frame.
type clientFrame interface{ sender() *client }

func (m *chatMessage) sender() *client { return m.from }
func (r refusal) sender() *client      { return r.from }
func (t typing) sender() *client       { return t.from }

// eventFor says what frame f from c means: exactly {"message": "<text>"}
// with 1 to 300 code points, or {"typing": true}; anything else is refused.
func eventFor(c *client, f inFrame) clientFrame {
	invalid := refusal{c, "invalid_message"}
	name, value, err := oneField(f.data)
	switch {
	case err != nil || f.opcode != opText:
		return invalid
	case name == "typing" && string(value) == "true":
		return typing{c}
	case name != "message":
		return invalid
	}
	text, ok := jsonString(value)
	switch {
	case !ok || text == "":
		return invalid
	case utf8.RuneCountInString(text) > maxMessageRunes:
		return refusal{c, "message_too_long"}
	}
	return &chatMessage{from: c, text: text}
}

// deliver refuses the messages over their sender's rate, stores the others
// in one transaction, then does what each frame means, in order.
func (h *Hub) deliver(frames []clientFrame) {
	var msgs []*Message
	now := h.now()
	for i, f := range frames {
		m, ok := f.(*chatMessage)
		if !ok {
			continue
		}
		if allowed, _ := h.limit.Allow(m.from.key); !allowed { // messages only: typing is not counted
			frames[i] = refusal{m.from, "rate_limited"}
			continue
		}
		m.msg = Message{Author: m.from.user, Text: m.text, Time: now}
		msgs = append(msgs, &m.msg)
	}
	err := h.store.AddMessages(msgs)
	if err != nil {
		h.log.Error("store messages", "count", len(msgs), "err", err)
	}
	for _, f := range frames {
		switch f := f.(type) {
		case *chatMessage:
			if err != nil {
				h.refuse(f.from, "storage_error")
			} else {
				h.publish(f.from, f.msg)
			}
		case refusal:
			h.refuse(f.from, f.code)
		case typing:
			if now.Sub(f.from.typedAt) >= typingEvery {
				f.from.typedAt = now
				h.broadcast(eventFrame("typing", f.from.user), f.from)
			}
		}
	}
	h.dropSlow()
}

// publish sends a stored message to the others and acks it to its sender.
func (h *Hub) publish(from *client, m Message) {
	h.lastID = m.ID
	h.metrics.Add("gochat_messages_accepted_total", 1)
	h.metrics.Add("gochat_deliveries_total", int64(len(h.clients)-1))
	h.broadcast(messageFrame(m, false), from)
	h.queue(from, ackFrame(m.ID))
}

func (h *Hub) refuse(c *client, code string) {
	h.metrics.Add(fmt.Sprintf(`gochat_messages_refused_total{code="%s"}`, code), 1)
	h.queue(c, errorAck(code))
}

// oneField parses data as exactly one JSON object of exactly one field and
// returns its name and raw value. Strict, for frames and bodies alike: an
// extra field is an error, not something to guess about.
func oneField(data []byte) (string, json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return "", nil, errors.New("not a JSON object")
	}
	var name string
	var value json.RawMessage
	for dec.More() {
		key, _ := dec.Token()
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return "", nil, errors.New("not a JSON object")
		}
		if value != nil {
			return "", nil, errors.New("want exactly one field")
		}
		name, _ = key.(string)
		value = raw
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') || value == nil {
		return "", nil, errors.New("want exactly one field")
	}
	if _, err := dec.Token(); err != io.EOF {
		return "", nil, errors.New("unexpected data after the JSON object")
	}
	return name, value, nil
}

// stringField parses data as exactly {"<name>": "<string>"}.
func stringField(data []byte, name string) (string, error) {
	key, value, err := oneField(data)
	if err != nil {
		return "", err
	}
	s, ok := jsonString(value)
	if key != name || !ok {
		return "", fmt.Errorf("want exactly the field %q, once, a string", name)
	}
	return s, nil
}

// jsonString decodes raw when it is a JSON string.
func jsonString(raw json.RawMessage) (string, bool) {
	var s string
	return s, raw[0] == '"' && json.Unmarshal(raw, &s) == nil
}

// The frames the server sends, each framed once however many receive it.

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

// eventFrame is {"event": "join"|"leave"|"typing", "username": user}.
func eventFrame(event, user string) []byte {
	return textFrame(mustJSON(map[string]string{"event": event, "username": user}))
}

func deleteFrame(id int64) []byte {
	return textFrame(mustJSON(map[string]any{"event": "delete", "id": id}))
}

func ackFrame(id int64) []byte { return textFrame(fmt.Appendf(nil, `{"status":true,"id":%d}`, id)) }

func errorAck(code string) []byte {
	return textFrame(mustJSON(map[string]any{"status": false, "code": code}))
}

// gapFrame tells a client that it missed messages, and the database's
// generation, for its next ?since=.
func gapFrame(generation string) []byte {
	return textFrame(mustJSON(map[string]string{"event": "gap", "generation": generation}))
}

// mustJSON encodes values whose types cannot fail to encode.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
