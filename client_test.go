package main

import (
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzChatText checks the frame handler's parsing: it never panics, refuses
// with one of the documented codes, and accepts only a non-empty message of
// at most 300 code points in a one-field object.
func FuzzChatText(f *testing.F) {
	for _, seed := range []string{
		`{"message":"hi"}`, `{"message":""}`, `{"message":5}`, `{"message":"a","b":1}`,
		`not json`, `{"message":"\ud83d\ude00"}`, `{"message":"\ud800"}`, "{\"message\":\"\xff\"}",
	} {
		f.Add([]byte(seed), false)
	}
	f.Add([]byte(`{"message":"hi"}`), true)
	f.Fuzz(func(t *testing.T, data []byte, binary bool) {
		text, refusal := chatText(inFrame{data: data, binary: binary})
		if refusal != "" {
			if text != "" || (refusal != "invalid_message" && refusal != "message_too_long") {
				t.Fatalf("refusal %q with text %q", refusal, text)
			}
			return
		}
		if binary || text == "" || utf8.RuneCountInString(text) > maxMessageRunes {
			t.Fatalf("accepted %q (binary %v)", text, binary)
		}
		var obj map[string]any
		if err := json.Unmarshal(data, &obj); err != nil || len(obj) != 1 || obj["message"] != text {
			t.Fatalf("accepted %q from %q", text, data)
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
