package main

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"
)

func TestSessionsExpireAndSweep(t *testing.T) {
	ctx := context.Background()
	s := NewSessions(50*time.Millisecond, nil)
	idle, _ := s.Create(ctx, "idle")
	pinned, _ := s.Create(ctx, "pinned")
	if !s.OpenSocket(pinned) {
		t.Fatal("OpenSocket on a live session failed")
	}
	time.Sleep(80 * time.Millisecond)
	if _, ok := s.Lookup(idle); ok {
		t.Fatal("idle session outlived its ttl")
	}
	if user, ok := s.Lookup(pinned); !ok || user != "pinned" {
		t.Fatal("session with an open socket expired")
	}
	s.CloseSocket(pinned)
	time.Sleep(80 * time.Millisecond)
	s.sweep(ctx, time.Now())
	if n := s.Len(); n != 0 {
		t.Fatalf("%d sessions left after sweep, want 0", n)
	}
}

// BenchmarkSessionLookup is the lookup every authenticated request makes,
// from all cores at once, among 10,000 sessions.
func BenchmarkSessionLookup(b *testing.B) {
	s := NewSessions(time.Hour, nil)
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
