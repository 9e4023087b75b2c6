package main

import (
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzChatText checks the frame handler's parsing: it never panics, refuses
// with one of the documented codes, and accepts only a non-empty message of
// at most 300 code points, or typing: true, in a one-field object.
func FuzzChatText(f *testing.F) {
	for _, seed := range []string{
		`{"message":"hi"}`, `{"message":""}`, `{"message":5}`, `{"message":"a","b":1}`, `{"typing":true}`,
		`{"typing":false}`, `not json`, `{"message":"\ud83d\ude00"}`, `{"message":"\ud800"}`, "{\"message\":\"\xff\"}",
	} {
		f.Add([]byte(seed), false)
	}
	f.Add([]byte(`{"message":"hi"}`), true)
	f.Fuzz(func(t *testing.T, data []byte, binary bool) {
		var obj map[string]any
		wellFormed := !binary && json.Unmarshal(data, &obj) == nil && len(obj) == 1
		switch e := eventFor(newClient("fuzz", ""), inFrame{data: data, opcode: map[bool]byte{false: opText, true: 0x2}[binary]}).(type) {
		case refusal:
			if e.code != "invalid_message" && e.code != "message_too_long" {
				t.Fatalf("refusal %q for %q", e.code, data)
			}
		case typing:
			if !wellFormed || obj["typing"] != true {
				t.Fatalf("typing from %q", data)
			}
		case *chatMessage:
			if !wellFormed || e.text == "" || utf8.RuneCountInString(e.text) > maxMessageRunes || obj["message"] != e.text {
				t.Fatalf("accepted %q from %q (binary %v)", e.text, data, binary)
			}
		default:
			t.Fatalf("event %T from %q", e, data)
		}
	})
}

// FuzzWebSocketFrames sends arbitrary bytes down a real socket after the
// handshake. Whatever they are, the server must stay up and clean up: the
// same user can connect again at once and chat.
func FuzzWebSocketFrames(f *testing.F) {
	masked := func(b ...byte) []byte { return append([]byte{}, b...) }
	f.Add(masked(0x81, 0x80|5, 0, 0, 0, 0, 'h', 'e', 'l', 'l', 'o'))
	f.Add(masked(0x81, 0x85, 1, 2, 3, 4, 'h', 'e', 'l', 'l', 'o'))
	f.Add(masked(0x82, 0x80, 0, 0, 0, 0))
	f.Add(masked(0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8))
	f.Add(masked(0x89, 0x80, 0, 0, 0, 0))
	f.Add(masked(0x01, 0x81, 0, 0, 0, 0, '{', 0x80, 0x81, 0, 0, 0, 0, '}'))
	f.Add(masked(0x81, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF))
	f.Add(masked(0x81, 0x05, 'h', 'e', 'l', 'l', 'o'))
	f.Add(masked(0x8F, 0x80, 0, 0, 0, 0))
	s := startServer(f)
	cookie := s.user(f, "Fuzzer")
	watcher := s.connect(f, s.user(f, "Watcher"))
	go func() { // keep the watcher's buffers drained
		for {
			op, p, err := watcher.readFrame(time.Hour)
			if err != nil {
				return
			}
			if op == opPing {
				watcher.writeFrame(0xA, p)
			}
		}
	}()
	f.Fuzz(func(t *testing.T, data []byte) {
		ws := s.connect(t, cookie)
		ws.c.Write(data)
		ws.c.Close()
		deadline := time.Now().Add(5 * time.Second)
		for {
			again, r := s.dialWS(t, cookie, dialOpts{})
			if again != nil {
				sendAndAck(t, again, "still fine")
				again.close()
				return
			}
			if r.status != 409 || time.Now().After(deadline) {
				t.Fatalf("after %x the user cannot reconnect: %d %s", data, r.status, r.raw)
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}
