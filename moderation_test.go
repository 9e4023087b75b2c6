package main

import (
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"
)

func TestAdminsDeleteMessages(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-admins", "Boss")
	boss := s.user(t, "boss") // -admins names are case-insensitive
	alice := s.user(t, "Alice")
	aliceWS := s.connect(t, alice)
	bossWS := s.connect(t, boss)
	aliceWS.nextWhere(isEvent("join", "boss"))
	keep := sendAndAck(t, aliceWS, "keep me")
	gone := sendAndAck(t, aliceWS, "delete me")
	after := sendAndAck(t, aliceWS, "after")
	path := fmt.Sprintf("/api/messages/%d", gone)

	s.request(t, "DELETE", path, "", alice).expect(t, 403)
	s.request(t, "DELETE", "/api/messages/999999", "", boss).expect(t, 404)
	s.request(t, "DELETE", "/api/messages/x", "", boss).expect(t, 404)
	if r := s.request(t, "DELETE", path, "", nil); r.status != 422 {
		t.Fatalf("no cookie: %d", r.status)
	}
	req, _ := http.NewRequest("DELETE", s.url+path, nil)
	req.AddCookie(boss)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 204 {
		t.Fatalf("delete: %v %v", resp, err)
	}
	resp.Body.Close()
	for _, ws := range []*wsConn{aliceWS, bossWS} {
		if f := ws.nextWhere(func(f map[string]any) bool { return f["event"] == "delete" }); idOf(f) != gone {
			t.Fatalf("delete event %v", f)
		}
	}
	r := s.request(t, "GET", "/api/messages", "", alice).expect(t, 200)
	if msgs := r.body["messages"].([]any); len(msgs) != 2 || idOf(msgs[0].(map[string]any)) != keep || idOf(msgs[1].(map[string]any)) != after {
		t.Fatalf("messages after delete: %s", r.raw)
	}
	// Neither history nor a replay brings it back, and the replay sees no gap.
	late := s.connect(t, s.user(t, "Late"))
	collectIDsSkipping(t, late, keep, after, gone)
	back := s.connect(t, s.user(t, "Back"), dialOpts{query: fmt.Sprintf("?since=%d", keep)})
	if f := back.next(); f["event"] == "gap" || idOf(f) != after {
		t.Fatalf("replay across a deleted message starts with %v", f)
	}
	s.request(t, "DELETE", path, "", boss).expect(t, 404)
	s.waitForLog(t, "message deleted", "admin=boss")

	// After a restart too: the deleted message's id is still known taken.
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "-db", s.dbPath)
	back = s.connect(t, alice, dialOpts{query: fmt.Sprintf("?since=%d", keep)})
	if f := back.next(); f["event"] == "gap" || idOf(f) != after {
		t.Fatalf("replay across a deleted message after a restart starts with %v", f)
	}
	r = s.request(t, "GET", "/api/messages", "", alice).expect(t, 200)
	if msgs := r.body["messages"].([]any); len(msgs) != 2 {
		t.Fatalf("messages after delete and restart: %s", r.raw)
	}
}

// collectIDsSkipping reads history frames from first to last, which must
// come in order without skip.
func collectIDsSkipping(t *testing.T, ws *wsConn, first, last, skip int64) {
	t.Helper()
	for want := first; want <= last; want++ {
		if want == skip {
			continue
		}
		if f := ws.nextWhere(isChat); idOf(f) != want {
			t.Fatalf("got message %d, want %d", idOf(f), want)
		}
	}
}

func TestAdminsBanUsers(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	s := startServer(t, "-db", db, "-admins", "Boss,Deputy")
	boss := s.user(t, "Boss")
	s.register(t, "Deputy")
	bobKey := s.register(t, "Bob")
	bob := s.login(t, bobKey)
	watcher := s.connect(t, s.user(t, "Watcher"))
	bobWS := s.connect(t, bob)
	watcher.nextWhere(isEvent("join", "Bob"))

	s.request(t, "POST", "/api/user/Boss/ban", "", bob).expect(t, 403)
	s.request(t, "POST", "/api/user/Deputy/ban", "", boss).expect(t, 403)
	s.request(t, "POST", "/api/user/Nobody/ban", "", boss).expect(t, 404)
	s.request(t, "POST", "/api/user/bob/ban", "", boss).expect(t, 200)
	if code := bobWS.expectClose(5 * time.Second); code != closePolicyViolation {
		t.Fatalf("banned user's socket closed with %d", code)
	}
	watcher.nextWhere(isEvent("leave", "Bob"))
	s.request(t, "GET", "/api/user/@me", "", bob).expect(t, 401)
	if r := s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, bobKey), nil).expect(t, 403); r.body["error"] != "banned" {
		t.Fatalf("banned login: %s", r.raw)
	}
	s.request(t, "POST", "/api/register", `{"username":"BOB"}`, nil).expect(t, 403)
	s.waitForLog(t, "msg=ban", "user=Bob", "admin=Boss")

	// Bans are stored: they survive a restart, until lifted.
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "-db", db, "-admins", "Boss")
	s.request(t, "POST", "/api/login", fmt.Sprintf(`{"key":%q}`, bobKey), nil).expect(t, 403)
	s.request(t, "DELETE", "/api/user/Bob/ban", "", boss).expect(t, 200)
	s.connect(t, s.login(t, bobKey)).close()
}
