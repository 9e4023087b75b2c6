package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
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

	carol := s.user(t, "Carol")
	s.request(t, "DELETE", path, "", carol).expect(t, 403) // not hers, not an admin
	s.request(t, "DELETE", "/api/messages/999999", "", boss).expect(t, 404)
	s.request(t, "DELETE", "/api/messages/x", "", boss).expect(t, 404)
	if r := s.request(t, "DELETE", path, "", nil); r.status != 422 {
		t.Fatalf("no cookie: %d", r.status)
	}
	req, _ := http.NewRequest("DELETE", s.url+path, nil)
	req.Header.Set("Content-Type", "application/json")
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
	s.waitForLog(t, "message deleted", "by=boss")

	// Authors delete their own messages, the same way.
	mine := sendAndAck(t, aliceWS, "mine, and then not")
	s.request(t, "DELETE", fmt.Sprint("/api/messages/", mine), "", carol).expect(t, 403)
	req, _ = http.NewRequest("DELETE", fmt.Sprint(s.url, "/api/messages/", mine), nil)
	req.Header.Set("Content-Type", "application/json")
	req.AddCookie(alice)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 204 {
		t.Fatalf("delete own: %v %v", resp, err)
	}
	if f := bossWS.nextWhere(func(f map[string]any) bool { return f["event"] == "delete" }); idOf(f) != mine {
		t.Fatalf("delete event %v", f)
	}

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
	bobWS.nextWhere(isEvent("banned", "Bob")) // told why, before the close
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
	if r := s.request(t, "GET", "/api/bans", "", boss).expect(t, 200); fmt.Sprint(r.body["bans"]) != "[Bob]" {
		t.Fatalf("bans: %s", r.raw)
	}
	s.request(t, "GET", "/api/bans", "", s.user(t, "Curious")).expect(t, 403)
	s.request(t, "DELETE", "/api/user/Bob/ban", "", boss).expect(t, 200)
	s.connect(t, s.login(t, bobKey)).close()
	if r := s.request(t, "GET", "/api/bans", "", boss).expect(t, 200); fmt.Sprint(r.body["bans"]) != "[]" {
		t.Fatalf("bans after unban: %s", r.raw)
	}
}

// Logins and socket opens racing a ban: after the ban's 200, no session of
// the user works, however the race went, and none comes back after a
// restart. Several rounds, since each round is one roll of the dice.
func TestBanWinsOverRacingLoginsAndSockets(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	s := startServer(t, "-db", db, "-admins", "Boss")
	boss := s.user(t, "Boss")
	var cookies []*http.Cookie
	for round := range 5 {
		name := fmt.Sprintf("Racer%d", round)
		key := s.register(t, name)
		early := s.login(t, key)
		var mu sync.Mutex
		var wg sync.WaitGroup
		for range 12 {
			wg.Add(2)
			go func() {
				defer wg.Done()
				r, err := postJSON(s.url+"/api/login", fmt.Sprintf(`{"key":%q}`, key))
				if err == nil && r.status == 200 {
					mu.Lock()
					cookies = append(cookies, sessionCookieOf(t, r.header))
					mu.Unlock()
				}
			}()
			go func() {
				defer wg.Done()
				if ws, _ := s.dialWS(t, early, dialOpts{}); ws != nil {
					// Any socket that opened must be closed by the ban.
					if code := ws.expectClose(10 * time.Second); code != closePolicyViolation && code != closeNormal {
						t.Errorf("socket of a banned user closed with %d", code)
					}
				}
			}()
		}
		s.request(t, "POST", "/api/user/"+name+"/ban", "", boss).expect(t, 200)
		wg.Wait()
		cookies = append(cookies, early)
		checkLockedOut(t, s, cookies)
		if online := s.request(t, "GET", "/api/online", "", boss).body["online_clients"]; slices.Contains(online.([]any), any(name)) {
			t.Fatalf("%s still online after the ban: %v", name, online)
		}
	}
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	checkLockedOut(t, startServer(t, "-db", db), cookies)
}

// checkLockedOut fails unless every session in cookies is refused.
func checkLockedOut(t *testing.T, s *testServer, cookies []*http.Cookie) {
	t.Helper()
	for _, c := range cookies {
		if r := s.request(t, "GET", "/api/user/@me", "", c); r.status != 401 {
			t.Fatalf("a banned user's session answers %d: %s", r.status, r.raw)
		}
		if ws, r := s.dialWS(t, c, dialOpts{}); ws != nil || r.status != 401 {
			t.Fatalf("a banned user's session opens /ws: %d", r.status)
		}
	}
}

// A kick (a ban, a logout) while the victim's burst is in flight: each of
// its messages is either stored, acked and seen by others before its
// leave, or not stored at all; nothing of it comes after the leave.
func TestNothingOfAKickedClientComesAfterItsLeave(t *testing.T) {
	t.Parallel()
	for _, kick := range []string{"ban", "logout"} {
		t.Run(kick, func(t *testing.T) {
			t.Parallel()
			s := startServer(t, "-admins", "Boss")
			boss := s.user(t, "Boss")
			victim := s.user(t, "Victim")
			watcher := s.connect(t, s.user(t, "Watcher"))
			marker := s.connect(t, s.user(t, "Marker"))
			ws := s.connect(t, victim)
			watcher.nextWhere(isEvent("join", "Victim"))
			var burst []byte
			for i := range 500 {
				burst = append(burst, maskedFrame(opText, mustJSON(map[string]string{"message": fmt.Sprint("m", i)}))...)
			}
			ws.c.Write(burst)
			if kick == "ban" {
				s.request(t, "POST", "/api/user/Victim/ban", "", boss).expect(t, 200)
			} else {
				s.request(t, "POST", "/api/logout", "", victim).expect(t, 200)
			}
			sendAndAck(t, marker, "after the kick")

			seen := map[int64]bool{}
			for left := false; ; {
				f := watcher.next()
				switch {
				case isEvent("leave", "Victim")(f):
					left = true
				case f["author"] == "Victim" && left:
					t.Fatalf("message %v after the leave", f["id"])
				case f["author"] == "Victim":
					seen[idOf(f)] = true
				}
				if f["message"] == "after the kick" {
					if !left {
						t.Fatal("no leave before the marker")
					}
					break
				}
			}
			acked := map[int64]bool{}
			for {
				op, payload, err := ws.readFrame(10 * time.Second)
				if err != nil || op == opClose {
					break
				}
				var ack map[string]any
				if json.Unmarshal(payload, &ack) == nil && ack["status"] == true {
					acked[idOf(ack)] = true
				}
			}
			stored := map[int64]bool{}
			for _, m := range s.allMessages(t, boss) {
				if m["author"] == "Victim" {
					stored[idOf(m)] = true
				}
			}
			t.Logf("%d of 500 stored before the kick", len(stored))
			if !maps.Equal(seen, stored) || !maps.Equal(acked, stored) {
				t.Fatalf("stored %d, seen before the leave %d, acked %d", len(stored), len(seen), len(acked))
			}
		})
	}
}

// allMessages pages through /api/messages, newest first.
func (s *testServer) allMessages(t *testing.T, cookie *http.Cookie) []map[string]any {
	var all []map[string]any
	for before := ""; ; {
		page := s.request(t, "GET", "/api/messages?limit=100"+before, "", cookie).expect(t, 200).body["messages"].([]any)
		if len(page) == 0 {
			return all
		}
		for i := len(page) - 1; i >= 0; i-- {
			all = append(all, page[i].(map[string]any))
		}
		before = fmt.Sprint("&before=", idOf(all[len(all)-1]))
	}
}

// An -admins name nobody has registered yet cannot be taken from outside:
// only a request from the server itself registers it.
func TestAdminNamesCannotBeSquatted(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-admins", "Boss")
	outside := []string{"X-Forwarded-For", "203.0.113.7"} // relayed by the trusted local proxy
	s.request(t, "POST", "/api/register", `{"username":"boss"}`, nil, outside...).expect(t, 403)
	s.request(t, "POST", "/api/register", `{"username":"Visitor"}`, nil, outside...).expect(t, 201)
	key := s.request(t, "POST", "/api/register", `{"username":"Boss"}`, nil).expect(t, 201).body["key"]
	if r := s.request(t, "GET", "/api/user/@me", "", s.login(t, fmt.Sprint(key))).expect(t, 200); r.body["admin"] != true {
		t.Fatalf("the operator's admin: %s", r.raw)
	}
}
