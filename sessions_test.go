package main

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"
)

// newTestSessions returns sessions on a fresh database and a clock.
func newTestSessions(t testing.TB, ttl time.Duration) (*Sessions, *testClock) {
	store, err := OpenStore(filepath.Join(t.TempDir(), "chat.db"), &Metrics{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	clock := &testClock{now: time.Now()}
	s, err := NewSessions(context.Background(), ttl, clock.Now, store)
	if err != nil {
		t.Fatal(err)
	}
	return s, clock
}

func TestSessionsExpireAndSave(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, clock := newTestSessions(t, time.Minute)
	idle, _ := s.Create(ctx, "idle")
	pinned, _ := s.Create(ctx, "pinned")
	if _, ok := s.OpenSocket(pinned); !ok {
		t.Fatal("OpenSocket on a live session failed")
	}
	clock.Advance(2 * time.Minute)
	if _, ok := s.Lookup(idle); ok {
		t.Fatal("idle session outlived its ttl")
	}
	if user, ok := s.Lookup(pinned); !ok || user != "pinned" {
		t.Fatal("session with an open socket expired")
	}
	s.CloseSocket(pinned)
	clock.Advance(2 * time.Minute)
	if err := s.Save(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(s.m); n != 0 {
		t.Fatalf("%d sessions left after Save, want 0", n)
	}
	var rows int
	if err := s.store.db.QueryRow("SELECT COUNT(*) FROM sessions").Scan(&rows); err != nil || rows != 0 {
		t.Fatalf("%d session rows left after Save (%v), want 0", rows, err)
	}
}

// BenchmarkSessionLookup is the lookup every authenticated request makes,
// from all cores at once, among 10,000 sessions.
func BenchmarkSessionLookup(b *testing.B) {
	s, _ := newTestSessions(b, time.Hour)
	ids := make([]string, 10000)
	for i := range ids {
		ids[i], _ = s.Create(context.Background(), "user")
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 0))
		for pb.Next() {
			if _, ok := s.Lookup(ids[r.IntN(len(ids))]); !ok {
				b.Fatal("session lost")
			}
		}
	})
}
