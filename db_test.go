package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// sendAndAck sends text and returns the id in its ack, skipping other frames.
func sendAndAck(t testing.TB, ws *wsConn, text string) int64 {
	t.Helper()
	ws.sendMessage(text)
	ack := ws.nextWhere(func(f map[string]any) bool { _, ok := f["status"]; return ok })
	if ack["status"] != true {
		t.Fatalf("message %q refused: %v", text, ack)
	}
	return int64(ack["id"].(float64))
}

func idOf(f map[string]any) int64 { return int64(f["id"].(float64)) }

func TestHistoryOnConnect(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history", "3")
	writer := s.connect(t, s.user(t, "Writer"))
	var ids []int64
	for i := range 5 {
		ids = append(ids, sendAndAck(t, writer, fmt.Sprintf("m%d", i)))
	}
	late := s.connect(t, s.user(t, "Late"))
	for i, want := range ids[2:] {
		f := late.next()
		if f["history"] != true || idOf(f) != want || f["message"] != fmt.Sprintf("m%d", i+2) || f["author"] != "Writer" {
			t.Fatalf("history frame %d: %v, want id %d", i, f, want)
		}
	}
	writer.sendMessage("live")
	if f := late.next(); f["message"] != "live" || f["history"] != nil {
		t.Fatalf("after history: %v", f)
	}
}

func TestHistoryOffSendsNothing(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history", "0")
	writer := s.connect(t, s.user(t, "Writer"))
	sendAndAck(t, writer, "before")
	late := s.connect(t, s.user(t, "Late"))
	writer.sendMessage("after")
	if f := late.next(); f["message"] != "after" {
		t.Fatalf("first frame with history off: %v", f)
	}
}

// collectIDs reads message frames until it has seen want, checking that ids
// only ever go up by one: nothing missing, nothing repeated.
func collectIDs(t *testing.T, ws *wsConn, from, want int64) {
	t.Helper()
	next := from
	for next <= want {
		f := ws.next()
		if !isChat(f) {
			continue
		}
		if got := idOf(f); got != next {
			t.Fatalf("got message %d, want %d (history=%v)", got, next, f["history"])
		}
		next++
	}
}

// chatters send messages from their own users until finish, each waiting
// for its ack before the next, and track the highest acked id.
type chatters struct {
	last atomic.Int64
	wg   sync.WaitGroup
	stop chan struct{}
}

func chatter(t *testing.T, s *testServer, users int) *chatters {
	ch := &chatters{stop: make(chan struct{})}
	for i := range users {
		ws := s.connect(t, s.user(t, fmt.Sprintf("chatter%d", i)))
		ch.wg.Add(1)
		go func() {
			defer ch.wg.Done()
			for n := 0; ; n++ {
				select {
				case <-ch.stop:
					return
				default:
				}
				ws.sendMessage(fmt.Sprintf("c%d-%d", i, n))
				for {
					op, p, err := ws.readFrame(10 * time.Second)
					if err != nil {
						t.Errorf("chatter: %v", err)
						return
					}
					if op == opPing {
						ws.writeFrame(0xA, p)
					}
					var f map[string]any
					if jsonUnmarshalObject(p, &f) && f["status"] == true {
						for id := idOf(f); ; {
							old := ch.last.Load()
							if id <= old || ch.last.CompareAndSwap(old, id) {
								break
							}
						}
						break
					}
				}
			}
		}()
	}
	return ch
}

// waitPast waits until a message with an id above id has been acked.
func (ch *chatters) waitPast(t *testing.T, id int64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ch.last.Load() <= id; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("chatters stuck at id %d", ch.last.Load())
		}
	}
}

// finish stops the chatters and returns the highest acked id.
func (ch *chatters) finish() int64 {
	close(ch.stop)
	ch.wg.Wait()
	return ch.last.Load()
}

func TestHistoryAndLiveStreamJoinWithoutGapWhileOthersSend(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history", "20")
	ch := chatter(t, s, 3)
	ch.waitPast(t, 10)
	late := s.connect(t, s.user(t, "Late"))
	first := late.next()
	if first["history"] != true {
		t.Fatalf("first frame %v is not history", first)
	}
	ch.waitPast(t, idOf(first)+20)
	collectIDs(t, late, idOf(first)+1, ch.finish())
}

func TestReconnectWithSinceReplaysWhatWasMissed(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Roamer")
	roamer := s.connect(t, cookie)
	ch := chatter(t, s, 2)
	var lastSeen int64
	for lastSeen < 10 {
		if f := roamer.next(); isChat(f) {
			lastSeen = idOf(f)
		}
	}
	// The connection drops without a close frame; the others keep talking.
	roamer.c.Close()
	ch.waitPast(t, lastSeen+10)
	back := s.connect(t, cookie, dialOpts{query: fmt.Sprintf("?since=%d", lastSeen)})
	ch.waitPast(t, ch.last.Load()+10)
	collectIDs(t, back, lastSeen+1, ch.finish())
}

func TestSinceZeroReplaysFromTheStart(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history", "1")
	w := s.connect(t, s.user(t, "W"))
	for i := range 4 {
		sendAndAck(t, w, fmt.Sprint(i))
	}
	r := s.connect(t, s.user(t, "R"), dialOpts{query: "?since=0"})
	collectIDs(t, r, 1, 4)
}

func TestGapWhenMoreWereMissedThanReplayMax(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-replay-max", "5")
	w := s.connect(t, s.user(t, "W"))
	var last int64
	for i := range 12 {
		last = sendAndAck(t, w, fmt.Sprint(i))
	}
	r := s.connect(t, s.user(t, "R"), dialOpts{query: "?since=2"})
	if f := r.next(); f["event"] != "gap" {
		t.Fatalf("first frame %v, want gap", f)
	}
	collectIDs(t, r, last-4, last)

	// Missing no more than replay-max: no gap.
	r.close()
	r2 := s.connect(t, s.user(t, "R2"), dialOpts{query: fmt.Sprintf("?since=%d", last-5)})
	if f := r2.next(); f["event"] == "gap" || idOf(f) != last-4 {
		t.Fatalf("first frame %v, want message %d", f, last-4)
	}
}

func TestAckedMessageSurvivesKill9(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	p := startProcess(t, "-db", db)
	s := p.asServer(t)
	ws := s.connect(t, s.user(t, "Durable"))
	id := sendAndAck(t, ws, "written in stone")
	p.cmd.Process.Kill()
	p.wait(t, 10*time.Second)

	s2 := startServer(t, "-db", db)
	cookie := s2.login(t, s2.register(t, "Reader"))
	r := s2.request(t, "GET", "/api/messages", "", cookie).expect(t, 200)
	msgs := r.body["messages"].([]any)
	if len(msgs) != 1 {
		t.Fatalf("messages after kill -9: %s", r.raw)
	}
	m := msgs[0].(map[string]any)
	if idOf(m) != id || m["message"] != "written in stone" || m["author"] != "Durable" {
		t.Fatalf("stored message %v", m)
	}
}

func TestMessagePages(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	cookie := s.user(t, "Pager")
	ws := s.connect(t, cookie)
	for i := range 7 {
		sendAndAck(t, ws, fmt.Sprintf("p%d", i+1))
	}
	ws.sendText("refused, not stored")
	page := func(query string) string {
		r := s.request(t, "GET", "/api/messages"+query, "", cookie).expect(t, 200)
		var ids []int64
		for _, m := range r.body["messages"].([]any) {
			ids = append(ids, idOf(m.(map[string]any)))
		}
		return fmt.Sprint(ids)
	}
	for query, want := range map[string]string{
		"":                     "[1 2 3 4 5 6 7]",
		"?limit=3":             "[5 6 7]",
		"?before=5&limit=3":    "[2 3 4]",
		"?before=3":            "[1 2]",
		"?before=1":            "[]",
		"?before=1000&limit=1": "[7]",
		"?limit=100":           "[1 2 3 4 5 6 7]",
	} {
		if got := page(query); got != want {
			t.Errorf("messages%s: %s, want %s", query, got, want)
		}
	}
	if r := s.request(t, "GET", "/api/messages?before=1", "", cookie); r.raw != "{\"messages\":[]}\n" {
		t.Errorf("empty page is %q", r.raw)
	}
	for _, bad := range []string{"limit=0", "limit=101", "limit=abc", "limit=-1", "limit=", "before=0", "before=x", "before=-5", "limit=1.5"} {
		s.request(t, "GET", "/api/messages?"+bad, "", cookie).expect(t, 400)
	}
}

func TestRetentionDeletesOnlyOldMessages(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history-keep", "1h")
	cookie := s.user(t, "Keeper")
	ws := s.connect(t, cookie)
	oldID := sendAndAck(t, ws, "old")
	s.clock.Advance(61 * time.Minute)
	newID := sendAndAck(t, ws, "new")
	deadline := time.Now().Add(5 * time.Second)
	for {
		r := s.request(t, "GET", "/api/messages", "", cookie).expect(t, 200)
		msgs := r.body["messages"].([]any)
		if len(msgs) == 1 && idOf(msgs[0].(map[string]any)) == newID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("retention did not delete exactly the old message: %s", r.raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Ids are not reused, and a replay from before the deleted one says so.
	if id := sendAndAck(t, ws, "newer"); id != newID+1 {
		t.Fatalf("id after retention %d, want %d", id, newID+1)
	}
	r := s.connect(t, s.user(t, "Back"), dialOpts{query: fmt.Sprintf("?since=%d", oldID-1)})
	if f := r.next(); f["event"] != "gap" {
		t.Fatalf("replay over deleted messages starts with %v, want gap", f)
	}
	collectIDs(t, r, newID, newID+1)
}

func TestMessagesSurviveRestartAndIDsContinue(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	s := startServer(t, "-db", db)
	w := s.connect(t, s.user(t, "W"))
	last := sendAndAck(t, w, "one")
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "-db", db)
	w = s.connect(t, s.login(t, s.register(t, "W2")))
	if f := w.next(); f["history"] != true || idOf(f) != last {
		t.Fatalf("history after restart: %v", f)
	}
	if id := sendAndAck(t, w, "two"); id != last+1 {
		t.Fatalf("id after restart %d, want %d", id, last+1)
	}
}

func TestStorageErrorIsAcked(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	ws := s.connect(t, s.user(t, "Unlucky"))
	watcher := s.connect(t, s.user(t, "Watcher"))
	ws.nextWhere(isEvent("join", "Watcher"))
	// Make every insert fail from outside, as a full disk would.
	db, err := sql.Open("sqlite", s.dbPath+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TRIGGER no_inserts BEFORE INSERT ON messages BEGIN SELECT RAISE(FAIL, 'disk full'); END`); err != nil {
		t.Fatal(err)
	}
	ws.sendMessage("lost")
	if f := ws.next(); f["status"] != false || f["code"] != "storage_error" {
		t.Fatalf("ack %v, want storage_error", f)
	}
	if _, err := db.Exec(`DROP TRIGGER no_inserts`); err != nil {
		t.Fatal(err)
	}
	sendAndAck(t, ws, "kept")
	if f := watcher.nextWhere(isChat); f["message"] != "kept" {
		t.Fatalf("watcher got %v: the failed message was broadcast", f)
	}
}

// -history-max bounds what is kept however fast messages come: the oldest
// go first, and a replay from before them says so.
func TestHistoryMaxKeepsTheNewest(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history-max", "3")
	cookie := s.user(t, "Prolific")
	ws := s.connect(t, cookie)
	var ids []int64
	for i := range 5 {
		ids = append(ids, sendAndAck(t, ws, fmt.Sprint("m", i)))
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		r := s.request(t, "GET", "/api/messages", "", cookie).expect(t, 200)
		msgs := r.body["messages"].([]any)
		if len(msgs) == 3 && idOf(msgs[0].(map[string]any)) == ids[2] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not cut to the newest 3: %s", r.raw)
		}
	}
	r := s.connect(t, s.user(t, "Later"), dialOpts{query: "?since=0"})
	if f := r.next(); f["event"] != "gap" {
		t.Fatalf("replay over deleted messages starts with %v, want gap", f)
	}
	collectIDs(t, r, ids[2], ids[4])
}

// Start-up reads what it needs, not the whole file (a full check of a large
// database after a reboot took longer than a start may); damage elsewhere
// is reported when it is read.
func TestStartsDespiteDamageItDoesNotRead(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "chat.db")
	store, err := OpenStore(path, &Metrics{})
	if err != nil {
		t.Fatal(err)
	}
	store.Close()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	tx, _ := db.Begin()
	for i := range 2000 {
		tx.Exec(`INSERT INTO messages(author, body, created_at) VALUES('old', ?, ?)`, strings.Repeat("x", 300), i)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var page, pageSize int64
	// The leaf holding the oldest messages, which start-up does not read.
	if err := db.QueryRow(`SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf' ORDER BY path LIMIT 1`).Scan(&page); err != nil {
		t.Fatal(err)
	}
	db.QueryRow(`PRAGMA page_size`).Scan(&pageSize)
	db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`)
	db.Close()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(bytes.Repeat([]byte{0xEE}, int(pageSize)), (page-1)*pageSize)
	f.Close()

	s := startServer(t, "-db", path, "-history-keep", "1000000h")
	cookie := s.user(t, "Archivist")
	s.request(t, "GET", "/api/messages", "", cookie).expect(t, 200)
	s.request(t, "GET", "/api/messages?before=3", "", cookie).expect(t, 500)
	s.waitForLog(t, "level=ERROR", "malformed")
}

// `gochat backup FILE` copies the live database while messages pour in: the
// copy opens, is intact, and holds every message acked before it began.
func TestBackupDuringAStorm(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	ch := chatter(t, s, 3)
	ch.waitPast(t, 30)
	ackedBefore := ch.last.Load()
	file := filepath.Join(t.TempDir(), "backup.db")
	var out bytes.Buffer
	if err := run(context.Background(), []string{"backup", "-db", s.dbPath, file}, &out); err != nil {
		t.Fatalf("backup: %v", err)
	}
	ch.waitPast(t, ch.last.Load()+10) // the storm went on meanwhile
	ch.finish()
	checkIntegrity(t, file)
	db, err := sql.Open("sqlite", file)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int64
	if err := db.QueryRow(`SELECT COUNT(*) FROM messages WHERE id <= ?`, ackedBefore).Scan(&n); err != nil || n != ackedBefore {
		t.Fatalf("backup holds %d of the %d messages acked before it (%v)", n, ackedBefore, err)
	}
	if err := run(context.Background(), []string{"backup", "-db", s.dbPath, file}, &out); err == nil || !strings.Contains(err.Error(), "not writing over it") {
		t.Fatalf("second backup to the same file: %v", err)
	}
	if code, out := runToExit(t, "backup", "-db", s.dbPath, file); code == 0 || !strings.Contains(out, "not writing over it") {
		t.Fatalf("backup over an existing file: exit %d, %s", code, out)
	}
	other := filepath.Join(t.TempDir(), "other.db")
	if code, out := runToExit(t, "backup", "-db", s.dbPath, other); code != 0 {
		t.Fatalf("backup command: exit %d, %s", code, out)
	}
	checkIntegrity(t, other)
}

// A backup that fails part way (here on a file size limit, as on a full
// disk) leaves no file under its name, nor a partial one beside it; a
// complete one is readable by its owner only.
func TestFailedBackupLeavesNoFile(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	store, err := OpenStore(db, &Metrics{})
	if err != nil {
		t.Fatal(err)
	}
	var msgs []*Message
	for range 2000 {
		msgs = append(msgs, &Message{Author: "Filler", Text: strings.Repeat("x", 300), Time: time.Now()})
	}
	if err := errors.Join(store.AddMessages(msgs), store.Close()); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	target := filepath.Join(dir, "backup.db")
	if code, out := runToExitEnv(t, []string{"GOCHAT_TEST_FSIZE=262144"}, "backup", "-db", db, target); code == 0 {
		t.Fatalf("backup of 600 KB within a 256 KiB file size limit succeeded: %s", out)
	}
	if left, _ := os.ReadDir(dir); len(left) > 0 {
		t.Fatalf("a failed backup left %s", left[0].Name())
	}
	if code, out := runToExit(t, "backup", "-db", db, target); code != 0 {
		t.Fatalf("backup: exit %d, %s", code, out)
	}
	if info, err := os.Stat(target); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v, %v; want mode 0600", info.Mode(), err)
	}
	checkIntegrity(t, target)
}

// A database made before the schema had a version (testdata/v0.db, made by
// that code: users Ann, Boss and Troll, Troll banned; messages 1 to 3, 2
// deleted; Ann's session "ann-session") keeps every user, message, session
// and ban through the upgrade and a restart, and ends at the last version.
func TestUpgradeKeepsEverything(t *testing.T) {
	t.Parallel()
	fixture, err := os.ReadFile("testdata/v0.db")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "chat.db")
	if err := os.WriteFile(path, fixture, 0o600); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		s := startServer(t, "-db", path, "-admins", "Boss", "-session-ttl", "100000h", "-history-keep", "100000h")
		r := s.request(t, "GET", "/api/messages", "", &http.Cookie{Name: "session", Value: "ann-session"}).expect(t, 200)
		if got := fmt.Sprint(r.body["messages"]); !strings.Contains(got, "author:Ann id:1 message:first") ||
			!strings.Contains(got, "author:Boss id:3 message:welcome") || strings.Contains(got, "id:2") {
			t.Fatalf("messages after the upgrade: %s", r.raw)
		}
		if r := s.request(t, "GET", "/api/bans", "", s.login(t, "boss-key")).expect(t, 200); fmt.Sprint(r.body["bans"]) != "[Troll]" {
			t.Fatalf("bans after the upgrade: %s", r.raw)
		}
		s.login(t, "ann-key")
		s.request(t, "POST", "/api/login", `{"key":"troll-key"}`, nil).expect(t, 403)
		s.request(t, "POST", "/api/register", `{"username":"troll"}`, nil).expect(t, 403)
		if err := s.stop(); err != nil {
			t.Fatal(err)
		}
	}
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var version int
	if err := db.QueryRow(`PRAGMA user_version`).Scan(&version); err != nil || version != len(migrations) {
		t.Fatalf("user_version %d (%v), want %d", version, err, len(migrations))
	}
}

// A database from a newer gochat (a rollback after an upgrade) is refused
// before anything in it or beside it changes.
func TestNewerDatabaseIsLeftAsItWas(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "chat.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`CREATE TABLE future (x); PRAGMA user_version = 1000`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	before, _ := os.ReadFile(path)
	if _, err := OpenStore(path, &Metrics{}); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("opened a database of a newer version: %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("the refused database file changed")
	}
	for _, suffix := range []string{"-wal", "-shm", "-journal"} {
		if _, err := os.Stat(path + suffix); err == nil {
			t.Fatalf("%s left beside the refused database", suffix)
		}
	}
}

// One server per database: a second one on the same file refuses to
// start, while a backup of the live database still works.
func TestSecondServerOnOneDatabaseRefusesToStart(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "chat.db")
	first := startProcess(t, "-db", path)
	if code, out := runToExit(t, "-addr", "127.0.0.1:0", "-db", path); code == 0 || !strings.Contains(out, "in use by another gochat server") {
		t.Fatalf("second server on one database: exit %d, %s", code, out)
	}
	if code, out := runToExit(t, "backup", "-db", path, filepath.Join(t.TempDir(), "copy.db")); code != 0 {
		t.Fatalf("backup beside the server: exit %d, %s", code, out)
	}
	first.asServer(t).request(t, "GET", "/healthz", "", nil).expect(t, 200)
}

// A page open across a restore names ids that the restored database hands
// out again: its generation tells them apart, so the page gets a gap and
// the restored history with what came after, never what the restore lost.
func TestReconnectAcrossARestoreIsAGap(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	writer := s.user(t, "Writer")
	ws := s.connect(t, writer)
	sendAndAck(t, ws, "kept")
	backup := filepath.Join(t.TempDir(), "backup.db")
	if err := run(context.Background(), []string{"backup", "-db", s.dbPath, backup}, io.Discard); err != nil {
		t.Fatal(err)
	}
	page := s.user(t, "Page")
	generation := s.request(t, "GET", "/api/user/@me", "", page).expect(t, 200).body["generation"].(string)
	lost := sendAndAck(t, ws, "lost by the restore")
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	for _, suffix := range []string{"", "-wal", "-shm"} {
		os.Remove(s.dbPath + suffix)
	}
	if err := os.Rename(backup, s.dbPath); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "-db", s.dbPath, "-session-ttl", "1000h")
	writer = s.user(t, "Writer2")
	if id := sendAndAck(t, s.connect(t, writer), "after the restore"); id != lost {
		t.Fatalf("the restored database gave id %d, want %d again", id, lost)
	}
	stale := s.connect(t, s.user(t, "Page2"), dialOpts{query: fmt.Sprintf("?since=%d&generation=%s", lost, generation)})
	gap := stale.next()
	if gap["event"] != "gap" || gap["generation"] == generation || gap["generation"] == "" {
		t.Fatalf("first frame %v, want a gap with the new generation", gap)
	}
	for _, want := range []string{"kept", "after the restore"} {
		if f := stale.next(); f["message"] != want {
			t.Fatalf("got %v, want %q", f, want)
		}
	}
	// Of this generation, the same since is a plain replay.
	current := s.connect(t, s.user(t, "Page3"), dialOpts{query: fmt.Sprintf("?since=%d&generation=%s", lost-1, gap["generation"])})
	if f := current.next(); f["message"] != "after the restore" {
		t.Fatalf("replay of this generation: %v", f)
	}
}

// Retention goes by each message's own time: one stored while the clock
// was set back is deleted alone, never the newer messages before it.
func TestRetentionSurvivesAClockSetBack(t *testing.T) {
	t.Parallel()
	s := startServer(t, "-history-keep", "1h")
	cookie := s.user(t, "Keeper")
	ws := s.connect(t, cookie)
	sendAndAck(t, ws, "recent")
	s.clock.Advance(-2 * time.Hour) // a Raspberry Pi before NTP
	sendAndAck(t, ws, "stamped two hours ago")
	s.clock.Advance(2 * time.Hour)
	sendAndAck(t, ws, "now")
	s.waitForLog(t, "retention deleted old messages", "count=1")
	r := s.request(t, "GET", "/api/messages", "", cookie).expect(t, 200)
	if got := fmt.Sprint(r.body["messages"]); !strings.Contains(got, "recent") || !strings.Contains(got, "message:now") || strings.Contains(got, "two hours") {
		t.Fatalf("after retention: %s", r.raw)
	}
}

// History reads skip tombstones through an index, not a scan, and go
// through connections of their own: with every one of them busy, the hub
// still commits and replays.
func TestHistoryReadsNeitherScanTombstonesNorWaitForTheHub(t *testing.T) {
	t.Parallel()
	store, err := OpenStore(filepath.Join(t.TempDir(), "chat.db"), &Metrics{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var id, parent, unused int
	var plan string
	if err := store.read.QueryRow(`EXPLAIN QUERY PLAN `+liveMessages, 0, 100, 50).Scan(&id, &parent, &unused, &plan); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(plan, "messages_live") {
		t.Fatalf("history query plan %q does not use messages_live", plan)
	}
	ctx := context.Background()
	for range store.read.Stats().MaxOpenConnections {
		tx, err := store.read.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		if err := tx.QueryRow(`SELECT count(*) FROM messages`).Scan(new(int)); err != nil {
			t.Fatal(err)
		}
	}
	if err := store.AddMessages([]*Message{{Author: "a", Text: "while reads hold every reader", Time: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	if msgs, err := store.Replay(0, 10, false); err != nil || len(msgs) != 1 {
		t.Fatalf("replay while reads hold every reader: %v %v", msgs, err)
	}
}

// BenchmarkAckLatencyBesideHistoryReads measures what parallel history
// reads over 10,000 tombstones do to the room: a sender's p99 ack latency
// while 8 readers fetch the page above the tombstones, against the same
// sender in a quiet room and beside 8 readers of /api/bans (a 403 from memory: what the
// readers' own CPU costs on a small machine), in one run:
// go test -run '^$' -bench AckLatency -benchtime 1x -count 3
func BenchmarkAckLatencyBesideHistoryReads(b *testing.B) {
	path := filepath.Join(b.TempDir(), "chat.db")
	store, err := OpenStore(path, &Metrics{})
	if err != nil {
		b.Fatal(err)
	}
	_, err = store.db.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10100)
		INSERT INTO messages(author, body, created_at) SELECT CASE WHEN i <= 100 THEN 'old' ELSE '' END, '', ? FROM n`, time.Now().UnixNano())
	store.Close()
	if err != nil {
		b.Fatal(err)
	}
	s := startServer(b, "-db", path)
	reader := s.user(b, "Reader")
	sender := s.connect(b, s.user(b, "Sender"))
	// p99 is the sender's p99 ack latency, in ms, while 8 readers GET path.
	p99 := func(path string) float64 {
		stop := make(chan struct{})
		var readers sync.WaitGroup
		for range 8 {
			readers.Add(1)
			go func() {
				defer readers.Done()
				for path != "" {
					select {
					case <-stop:
						return
					default:
						s.request(b, "GET", path, "", reader)
					}
				}
			}()
		}
		var took []time.Duration
		for i := range 300 {
			start := time.Now()
			sendAndAck(b, sender, fmt.Sprint("m", i))
			took = append(took, time.Since(start))
		}
		close(stop)
		readers.Wait()
		slices.Sort(took)
		return float64(took[len(took)*99/100]) / 1e6
	}
	for range b.N {
		quiet, static, history := p99(""), p99("/api/bans"), p99("/api/messages?before=10101&limit=50")
		b.ReportMetric(quiet, "quiet-p99-ms")
		b.ReportMetric(static, "static-p99-ms")
		b.ReportMetric(history, "history-p99-ms")
		b.ReportMetric(history/static, "history/static")
	}
}
